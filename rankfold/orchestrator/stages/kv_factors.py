"""kv_factors: Palu's full-rank G-LRD factors and spectra of every layer's k/v, one task per layer.

params: model {id, dtype}, group_heads. inputs: statistics (the whitening). Planned for Palu's
kv_cache (methods/palu_cache.py lists it among its stages)."""

from __future__ import annotations

from rankfold.methods.palu import VERSION as PALU_VERSION
from rankfold.modules.latent_kv import head_dim
from rankfold.orchestrator.stages.kind import Artifacts, Env, PlanContext, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import KVFactors, Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.kv import KVFactorsItem, kv_factors_item


def kv_factors(env: Env, stage: Stage, *, statistics: Statistics) -> tuple[dict, Artifacts]:
    arch, ref = env.source.architecture, env.store.ref()
    items = [KVFactorsItem(env.source.location, arch.layer_prefix.format(i=i), head_dim(env.source.config),
                           stage.params["group_heads"], ref, statistics.key(i), ref, KVFactors.key_of(stage, i))
             for i in range(env.source.num_layers)]
    return {}, dict(env.executor.map(kv_factors_item, items, "kv_factors"))


def plan(context: PlanContext) -> tuple[dict, dict]:
    return {"model": context.model, "group_heads": context.spec.kv_cache.group_heads}, {"statistics": "calibrate"}


register_stage(StageKind("kv_factors", kv_factors, "1", KVFactors, producer=lambda params: PALU_VERSION, plan=plan))
