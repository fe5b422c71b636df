"""The compressed modules of every layer of a job's model: its shapes, the method's structure and the
ranks (the uniform rule's or an allocator's)."""

from __future__ import annotations

from dataclasses import dataclass

from rankfold.jobs.spec import JobSpec
from rankfold.methods.registry import method_of
from rankfold.methods.structure import plan_layer
from rankfold.models.architecture import Architecture
from rankfold.models.sources import ModelSource
from rankfold.modules.layout import CompressedModule, member_ranks

Shapes = dict[int, dict[str, tuple[int, int]]]


@dataclass(frozen=True)
class ModelLayout:
    """{layer index: [CompressedModule, paths inside the layer]}."""

    by_layer: dict[int, list[CompressedModule]]

    def flat(self, arch: Architecture) -> list[dict]:
        return [module.prefixed(arch.layer_prefix.format(i=i)).to_json()
                for i, modules in self.by_layer.items() for module in modules]

    def ranks(self, arch: Architecture) -> dict[str, int]:
        return {arch.layer_prefix.format(i=i) + path: rank
                for i, modules in self.by_layer.items() for path, rank in member_ranks(modules).items()}

    def in_group(self, index: int, group: str) -> list[CompressedModule]:
        return [module for module in self.by_layer[index] if module.group == group]

    def layer_json(self, index: int) -> list[dict]:
        return [module.to_json() for module in self.by_layer[index]]


def matrix_shapes(source: ModelSource, spec: JobSpec) -> Shapes:
    """(m, n) of every compressed matrix, read from checkpoint headers."""
    arch = source.architecture
    paths = [arch.projection_path(p) for p in spec.target.matrices]
    return {i: {path: tuple(source.shape(arch.layer_prefix.format(i=i) + path + ".weight")) for path in paths}
            for i in range(source.num_layers)}


def plan_layout(spec: JobSpec, arch: Architecture, shapes: Shapes,
                ranks: dict[int, dict[str, int]] | None = None) -> ModelLayout:
    """The method's structure with the uniform rule's ranks, or with `ranks` (layer -> matrix -> rank)."""
    structure = method_of(spec.method).structure
    groups = [(group.name, group.members) for group in arch.groups]
    return ModelLayout({i: plan_layer(structure, groups, layer_shapes, spec.target.ratio,
                                      ranks=None if ranks is None else ranks.get(i, {}))
                        for i, layer_shapes in shapes.items()})
