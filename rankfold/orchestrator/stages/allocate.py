"""allocate: the ranks of every compressed matrix from the spec's allocator, on the driver; recorded in
the manifest with the allocated layout and, when the allocator gives one, progressive decoding's order.

params: model {id, dtype}, method, target, layout (the method's structure with the uniform ranks, ModelLayout JSON).
inputs: the allocator's own stages, each under its kind's name (e.g. fisher, spectra)."""

from __future__ import annotations

import functools

from rankfold.allocators.registry import ALLOCATORS, AllocationProblem
from rankfold.checkpoint import RANK_GAINS
from rankfold.methods.registry import method_of
from rankfold.orchestrator.model_layout import ModelLayout, plan_layout
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import LayerArtifacts, Ranks
from rankfold.orchestrator.stages.stage import Stage


def allocate(env: Env, stage: Stage, **upstream: LayerArtifacts) -> tuple[dict, Artifacts]:
    method, target = stage.params["method"], stage.params["target"]
    # Cached: the allocator and its decode gains read the same Fisher sums and spectra.
    read = functools.cache(lambda kind, i, part: upstream[kind].read(i, part))
    uniform = ModelLayout.from_json(stage.params["layout"])
    problem = AllocationProblem(method_of(method), uniform.by_layer, env.shapes, target.ratio,
                                env.source.architecture.layer_prefix, read)
    allocator = ALLOCATORS.get(target.allocation.kind)
    ranks = allocator.allocate(target.allocation, problem)
    layout = plan_layout(method, target.ratio, env.source.architecture, env.shapes, ranks, target.experts)
    result, artifacts = {"ranks": {str(i): r for i, r in ranks.items()}, "layout": layout.to_json()}, {}
    if allocator.gains is not None:  # the decode order progressive decoding reads from the checkpoint
        key = f"{stage.prefix('gains')}/{RANK_GAINS}"
        artifacts[key] = env.store.put_tensors(key, allocator.gains(target.allocation, problem, ranks))
        result["gains"] = key
    return result, artifacts


register_stage(StageKind("allocate", allocate, "1", Ranks,
                         producer=lambda params: ALLOCATORS.get(params["target"].allocation.kind).version))
