"""decompose: the method's factors of every compressed module, one task per (layer, input group).

params: model {id, dtype}, method. inputs: ranks (the allocated layout), statistics (when the method
needs them), and the method's own stages under their kinds' names (Method.reads, e.g. CAP's rpca, search)."""

from __future__ import annotations

from rankfold.methods.registry import method_of
from rankfold.orchestrator.stages.kind import Artifacts, Env, StageKind, register_stage
from rankfold.orchestrator.stages.outputs import Factors, LayerArtifacts, Ranks, Statistics
from rankfold.orchestrator.stages.stage import Stage
from rankfold.workers.tasks import DecomposeItem, decompose_item


def decompose(env: Env, stage: Stage, *, ranks: Ranks, statistics: Statistics | None = None,
              **reads: LayerArtifacts) -> tuple[dict, Artifacts]:
    """The result holds the method's diagnostics ({quantity: {module path: value}}, e.g. cond(A₁))."""
    arch, layout, ref, method = env.source.architecture, ranks.layout, env.store.ref(), stage.params["method"]
    items = [DecomposeItem(env.source.location, method, arch.layer_prefix.format(i=i), group,
                           tuple(m.to_json() for m in layout.in_group(i, group)), ref,
                           statistics.key(i) if statistics is not None else None, ref,
                           Factors.key_of(stage, i, group),
                           tuple((kind, m, reads[kind].key(i, m)) for kind in method_of(method).reads
                                 for module in layout.in_group(i, group) for m in module.members))
             for i, group in layer_groups(env, layout)]
    diagnostics: dict[str, dict[str, float]] = {}
    artifacts: Artifacts = {}
    groups = [(env.shapes[i], layout.in_group(i, group)) for i, group in layer_groups(env, layout)]
    work, memory = [group_work(*group) for group in groups], [group_memory(*group) for group in groups]
    for part, key, sha in env.executor.map(decompose_item, items, "decompose", work, memory):
        for quantity, values in part.items():
            diagnostics.setdefault(quantity, {}).update(values)
        artifacts[key] = sha
    return {"diagnostics": diagnostics}, artifacts


def layer_groups(env: Env, layout) -> list[tuple[int, str]]:
    """(layer, input group) pairs that hold compressed modules, in layer then layout order (the
    planned groups: the family's, or a mixture's experts as one group)."""
    return [(i, group) for i in range(env.source.num_layers)
            for group in dict.fromkeys(module.group for module in layout.by_layer.get(i, []))]


register_stage(StageKind("decompose", decompose, "1", Factors, producer=lambda params: method_of(params["method"]).version))


def group_work(shapes: dict[str, tuple[int, int]], modules) -> float:
    """Estimated floating-point operations of factorising one input group: the n × n Gram's
    factorisation (n³) and each module's SVD (m n min(m, n), m its members' rows stacked). The
    executor picks threads by it (execution/local.py)."""
    n = shapes[modules[0].members[0]][1]
    rows = [sum(shapes[member][0] for member in module.members) for module in modules]
    return float(n ** 3 + sum(m * n * min(m, n) for m in rows))


def group_memory(shapes: dict[str, tuple[int, int]], modules) -> int:
    """Estimated peak host bytes of factorising one input group: the n × n Gram, its whitening factor and
    that factor's inverse in float64, and each module's stacked (m × n) weight with one working copy
    (W·S) in float64. Llama-3-70B's down_proj group (n = 28672): 24 GB."""
    n = shapes[modules[0].members[0]][1]
    rows = sum(sum(shapes[member][0] for member in module.members) for module in modules)
    return 8 * (3 * n * n + 2 * rows * n)
