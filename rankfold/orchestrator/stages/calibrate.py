"""calibrate: input statistics (Gram, Σ|x|) of every layer's input groups, streamed over the shards.

Each layer's statistics are summed over the shards where their partials are and stored by one of the
shards (workers/reduce.py): the driver receives the artifact's sha256 and the groups that saw few tokens.
Resumable per layer: a stage stopped at layer k (a lost node's partial, a killed driver) runs again
passing through the layers already stored — a forward, no statistics — and reduces from layer k on.

params: model {id, dtype}, calibration (CalibrationSpec), sample (CalibrationSample)."""

from __future__ import annotations

from rankfold.execution.streaming import stream_shards
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.reduce import ReduceItem, stored_result
from rankfold.workers.shard import ShardConfig


def calibrate(env: Env, stage: Stage) -> tuple[dict, Artifacts]:
    """One artifact per layer; the result counts the calibration tokens, and names every input group
    that saw fewer tokens than its width (a mixture's rarely chosen experts: their Gram is singular, so
    whitening adds a ridge, or is the identity for an expert no token reached). NumericalError when a
    layer's statistics are not finite."""
    cal, artifacts, few = stage.params["calibration"], {}, {}
    samples = stage.params["sample"].ids(env.source.tokenizer())
    ref = env.store.ref()

    def target(i: int) -> ReduceItem:
        key = Statistics.key_of(stage, i)
        return ReduceItem(ref, key, i, cal.gram_product_dtype, summary_key=key.removesuffix(".safetensors") + ".json")

    def saved(i: int, result: tuple[str, dict[str, int]]) -> None:
        sha, few_in_layer = result
        artifacts[Statistics.key_of(stage, i)] = sha
        few.update(few_in_layer)

    config = ShardConfig(env.source.location, stage.params["model"]["dtype"], env.max_resident_mb << 20,
                         str(env.scratch), cal.gram_product_dtype)
    stream_shards(env.executor, config, samples, cal.batch_size, "calibrate", env.source.num_layers,
                  reduce_into=target, on_reduced=saved,
                  stored=lambda item: stored_result(env.store, item)).release()
    return {"tokens": samples.numel(), "few_tokens": few}, artifacts


register_stage(StageKind("calibrate", calibrate, "1", Statistics))
