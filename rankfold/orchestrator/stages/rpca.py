"""rpca: CAP's robust PCA units of every compressed matrix, one task per matrix (workers/rpca_items.py).

params: model {id, dtype}, method (robust PCA's fields only), matrices [[layer, path, group], ...]. The ratio is not a param (a
sparse module's nnz follows from it): one robust PCA serves every ratio and keep rule."""

from __future__ import annotations

from rankfold.methods.cap import robust_pca_options
from rankfold.methods.registry import method_of
from rankfold.orchestrator.stages.kind import Artifacts, Env, PlanContext, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import RobustPCA, Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.rpca_items import SCORE_SUFFIX, RPCAItem, rpca_item


def rpca(env: Env, stage: Stage, *, statistics: Statistics) -> tuple[dict, Artifacts]:
    arch, ref = env.source.architecture, env.store.ref()
    items = [RPCAItem(env.source.location, stage.params["method"], arch.layer_prefix.format(i=i), path, group, ref,
                      statistics.key(i), ref, RobustPCA.key_of(stage, i, path),
                      RobustPCA.key_of(stage, i, path + SCORE_SUFFIX))
             for i, path, group in stage.params["matrices"]]
    artifacts: Artifacts = {}
    for pairs in env.executor.map(rpca_item, items, "rpca"):
        artifacts.update(pairs)
    return {}, artifacts


def matrices(context: PlanContext) -> list[list]:
    """[layer, path, input group] of every compressed matrix (one member each under CAP's structure)."""
    return [[i, module.members[0], module.group] for i, modules in context.uniform.by_layer.items()
            for module in modules]


def plan(context: PlanContext) -> tuple[dict, dict]:
    method = robust_pca_options(context.spec.method)  # so a count_indices sweep shares one robust PCA
    return ({"model": context.model, "method": method, "matrices": matrices(context)},
            {"statistics": "calibrate"})


register_stage(StageKind("rpca", rpca, "2", RobustPCA, producer=lambda params: method_of(params["method"]).version,
                         plan=plan))
