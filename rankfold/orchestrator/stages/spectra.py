"""spectra: whitened spectra of every module of the method's structure, one task per (layer, input
group) — what FLRA's allocator trades.

params: structure {layer: [module JSON without ranks]} (so every ratio shares one pass)."""

from __future__ import annotations

from rankfold.allocators.flra import spectra_bytes, spectra_flops
from rankfold.allocators.registry import ALLOCATORS
from rankfold.orchestrator.stages.kind import Artifacts, Env, PlanContext, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Spectra, Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.tasks import SpectrumItem, spectrum_item


def spectra(env: Env, stage: Stage, *, statistics: Statistics) -> tuple[dict, Artifacts]:
    arch, ref = env.source.architecture, env.store.ref()
    items, work, memory = [], [], []
    for layer, modules in stage.params["structure"].items():
        i = int(layer)
        for group in dict.fromkeys(module["group"] for module in modules):
            members = tuple({**module, "rank": 0} for module in modules if module["group"] == group)
            items.append(SpectrumItem(env.source.location, arch.layer_prefix.format(i=i), group, members, ref,
                                      statistics.key(i), ref, Spectra.key_of(stage, i, group)))
            shapes = env.shapes[i]
            width, rows = shapes[members[0]["members"][0]][1], [sum(shapes[p][0] for p in m["members"]) for m in members]
            work.append(spectra_flops(width, rows))
            memory.append(spectra_bytes(width, rows))
    # the largest first; each reserves its estimated memory (two 70B down_proj groups do not share 24 GB)
    return {}, dict(env.executor.map(spectrum_item, items, "spectra", work, memory))


def plan(context: PlanContext) -> tuple[dict, dict]:
    structure = {str(i): [{k: v for k, v in module.to_json().items() if k != "rank"} for module in modules]
                 for i, modules in context.uniform.by_layer.items()}
    return {"structure": structure}, {"statistics": "calibrate"}


# The spectra are FLRA's (allocators/flra.py: group_spectra): its VERSION is theirs.
register_stage(StageKind("spectra", spectra, "1", Spectra, producer=lambda params: ALLOCATORS.get("flra").version,
                         plan=plan))
