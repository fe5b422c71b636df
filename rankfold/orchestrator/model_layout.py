"""The compressed modules of every layer of a job's model: its shapes, the method's structure and the
ranks (the uniform rule's or an allocator's)."""

from __future__ import annotations

from dataclasses import dataclass, field

from rankfold.methods.registry import MethodOptions, method_of, sparse_entry_cost
from rankfold.methods.structure import plan_layer
from rankfold.models.architecture import Architecture
from rankfold.models.sources import ModelSource
from rankfold.modules.layout import CompressedModule, member_ranks

Shapes = dict[int, dict[str, tuple[int, int]]]


@dataclass(frozen=True)
class ModelLayout:
    """{layer index: [CompressedModule, paths inside the layer]}: the weight method's modules, and
    `kv` the layers' latent-KV attentions (kept apart: they are not part of the weight ratio)."""

    by_layer: dict[int, list[CompressedModule]]
    kv: dict[int, CompressedModule] = field(default_factory=dict)

    def flat(self, arch: Architecture) -> list[dict]:
        return [module.prefixed(arch.layer_prefix.format(i=i)).to_json()
                for i in self.by_layer for module in self._all(i)]

    def _all(self, index: int) -> list[CompressedModule]:
        return self.by_layer[index] + ([self.kv[index]] if index in self.kv else [])

    def ranks(self, arch: Architecture) -> dict[str, int]:
        return {arch.layer_prefix.format(i=i) + path: rank
                for i, modules in self.by_layer.items() for path, rank in member_ranks(modules).items()}

    def in_group(self, index: int, group: str) -> list[CompressedModule]:
        return [module for module in self.by_layer[index] if module.group == group]

    def layer_json(self, index: int) -> list[dict]:
        return [module.to_json() for module in self._all(index)]

    def to_json(self) -> dict[str, list[dict]]:
        """The weight method's modules per layer (layer-relative paths): what `allocate` records."""
        return {str(i): [module.to_json() for module in modules] for i, modules in self.by_layer.items()}

    @classmethod
    def from_json(cls, data: dict[str, list[dict]]) -> "ModelLayout":
        return cls({int(i): [CompressedModule.from_json(m) for m in modules] for i, modules in data.items()})


def matrix_shapes(source: ModelSource, matrices: tuple[str, ...]) -> Shapes:
    """(m, n) of every compressed matrix (`matrices`: projection names, target.matrices), read from
    checkpoint headers."""
    arch = source.architecture
    paths = arch.matrix_paths(matrices)
    return {i: {path: source.matrix_shape(arch.layer_prefix.format(i=i) + path + ".weight") for path in paths}
            for i in range(source.num_layers)}


def plan_layout(method: MethodOptions, ratio: float, arch: Architecture, shapes: Shapes,
                ranks: dict[int, dict[str, int]] | None = None, experts: str | None = None) -> ModelLayout:
    """The method's structure with the uniform rule's ranks at `ratio` (target.ratio), or with `ranks`
    (layer -> matrix -> rank); `experts` (target.experts): a mixture's gate/up grouped per expert or shared."""
    structure = method_of(method).structure
    groups = arch.plan_groups(experts)
    cost = sparse_entry_cost(method)
    return ModelLayout({i: plan_layer(structure, groups, layer_shapes, ratio,
                                      ranks=None if ranks is None else ranks.get(i, {}), cost=cost)
                        for i, layer_shapes in shapes.items()})
