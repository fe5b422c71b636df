"""evaluate: one evaluation entry on one model — a checkpoint input (a job's compressed model, the
artifact as written and, on a cluster, read from the store) or, without one, the environment's source
(a job's dense model, or the model `rankfold eval` was given). The model's compressed layout is read
from its own config, so a checkpoint evaluates the same in a job and in `rankfold eval`.

params: evaluator, options (its entry; `name` is a label, not hashed), data (its files' fingerprints),
dtype, and model {id} when it reads the source."""

from __future__ import annotations

from rankfold.checkpoint import layer_layouts
from rankfold.evaluation.registry import EVALUATORS, EvaluationContext
from rankfold.models.sources import open_source
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Checkpoint, Rows
from rankfold.orchestrator.stages.stage import Stage
from rankfold.storage.stored_model import stored_location


def evaluate(env: Env, stage: Stage, *, checkpoint: Checkpoint | None = None) -> tuple[dict, Artifacts]:
    evaluator = EVALUATORS.get(stage.params["evaluator"])
    if checkpoint is None:
        location, config = env.source.location, env.source.config
    else:
        # This job's placed copy (restored by assemble's reuse check), never a folder named in a shared
        # record: another job with the same digest placed its own elsewhere.
        stored = stored_location(env.store.ref(), checkpoint.prefix)
        location = env.executor.model_location(str(env.checkpoint), stored)
        config = open_source(str(env.checkpoint)).config
    layouts = layer_layouts(config)
    context = EvaluationContext(env.executor, location, env.source.num_layers, lambda i: layouts.get(i) or None,
                                env.source.tokenizer(), stage.params["dtype"], env.scratch, stage.name)
    return {"rows": evaluator.evaluate(stage.params["options"], context)}, {}


register_stage(StageKind("evaluate", evaluate, "1", Rows,
                         producer=lambda params: EVALUATORS.get(params["evaluator"]).version))
