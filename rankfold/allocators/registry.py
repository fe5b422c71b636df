"""The allocator registry: each allocator file declares its spec options, the stages it needs before
the `allocate` stage (e.g. Fisher scores, spectra), its checks and its solver, in one
`register_allocator(Allocator(...))` call.
"""

from __future__ import annotations

import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
from pydantic import model_validator

from rankfold.core.options import Strict
from rankfold.core.registry import Registry
from rankfold.methods.registry import Method
from rankfold.methods.structure import dense_params
from rankfold.modules.layout import CompressedModule

Shapes = dict[int, dict[str, tuple[int, int]]]  # layer -> matrix path -> (out, in)
Ranks = dict[int, dict[str, int | list[int]]]   # layer -> matrix path -> rank, or [rank, nnz] when sparse


class AllocationOptions(Strict):
    """Base of an allocator's spec options; subclasses narrow `kind` to a Literal. `renamed_from`: former
    names of that kind, still read (with a FutureWarning naming the new one)."""

    kind: str
    renamed_from: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="before")
    @classmethod
    def _former_kind(cls, data: object) -> object:
        if isinstance(data, dict) and data.get("kind") in cls.renamed_from:
            kind = typing.get_args(cls.model_fields["kind"].annotation)[0]
            warnings.warn(f"target.allocation.kind {data['kind']!r} is now {kind!r}; the old name will be "
                          "removed", FutureWarning, stacklevel=2)
            data = {**data, "kind": kind}
        return data


@dataclass(frozen=True)
class AllocationProblem:
    """What every allocator sees: the method's structure (`layout`, with the uniform rule's ranks),
    the dense shapes, the target ratio, and `read(stage, layer, group)` for its stages' artifacts."""

    method: Method
    layout: dict[int, list[CompressedModule]]
    shapes: Shapes
    ratio: float
    layer_prefix: str
    read: Callable[[str, int, str | None], dict[str, torch.Tensor]] = field(repr=False, default=None)

    @property
    def budget(self) -> int:
        """(1 − ratio) × the dense parameters of every compressed matrix."""
        return int((1.0 - self.ratio) * dense_params(self.shapes))


@dataclass(frozen=True)
class Allocator:
    kind: str
    options: type[AllocationOptions]
    # allocate(options, problem) -> ranks of every compressed matrix; ValueError when infeasible
    allocate: Callable[[AllocationOptions, AllocationProblem], Ranks]
    version: str
    # stage kinds whose artifacts `read` serves, run before `allocate` — or a function of the options
    # giving them (use `stages_for`)
    stages: tuple[str, ...] | Callable[[AllocationOptions], tuple[str, ...]] = ()
    # check_spec(options, method, calibration sample count): what the spec alone decides (at parsing);
    # check(options, problem without `read`): what the shapes decide (in preflight). Both raise
    # ValueError naming the spec field.
    check_spec: Callable[[AllocationOptions, Method, int], None] = lambda options, method, samples: None
    check: Callable[[AllocationOptions, AllocationProblem], None] = lambda options, problem: None
    # gains(options, problem, ranks) -> {module path: loss removed per parameter of each kept direction},
    # the order progressive decoding keeps directions in; recorded in the checkpoint (rank_gains.safetensors)
    gains: Callable[[AllocationOptions, AllocationProblem, Ranks], dict[str, torch.Tensor]] | None = None


    def stages_for(self, options: AllocationOptions) -> tuple[str, ...]:
        return self.stages(options) if callable(self.stages) else self.stages


ALLOCATORS: Registry[Allocator] = Registry("allocation kind")


def current_kind(kind: object) -> object:
    """A former allocation kind's current name (AllocationOptions.renamed_from); any other value as is."""
    for allocator in ALLOCATORS:
        if kind in allocator.options.renamed_from:
            return allocator.kind
    return kind


def register_allocator(allocator: Allocator) -> Allocator:
    if allocator.options.model_fields["kind"].annotation is str:
        raise ValueError(f"allocator {allocator.kind!r}: its options must narrow `kind` to a Literal")
    return ALLOCATORS.register(allocator.kind, allocator)


def ranks_of(layout: dict[int, list[CompressedModule]]) -> Ranks:
    """What an allocator answers for this layout: every member's value by its module's kind (a rank, or
    [rank, nnz] of a sparse module)."""
    return {i: {m: module.handler.allocation(module) for module in modules for m in module.members}
            for i, modules in layout.items()}
