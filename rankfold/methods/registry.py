"""The method registry: each method file declares, in one `register_method(Method(...))` call, its
spec options, the statistics it needs, the structure it gives each input group, its factorisation
and its VERSION. The spec's method union, layout planning, the decompose dispatch, the allocators'
costs and the benchmarks' method lists are all read from here.

A method's VERSION is part of the digest of everything it produces: bump it whenever a change to the
file could change a number, and re-runs recompute its factors (and reuse the calibration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from rankfold.core.options import Strict
from rankfold.core.registry import Registry
from rankfold.methods.structure import Structure, entry_cost
from rankfold.modules.layout import CompressedModule

if TYPE_CHECKING:
    from rankfold.methods.group_inputs import GroupInputs

Factors = tuple[torch.Tensor, torch.Tensor]  # (B: m×r, A: r×n), float64, largest directions first
# (B: m×r, A: r×n, S values: (nnz,), S flat row-major indices: (nnz,) int32 ascending); floats float64
SparseFactors = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]

# Calibration statistics a method may need (rankfold/methods/statistics.py collects them per input group).
STATISTICS = frozenset({"gram", "mean_abs"})


class MethodOptions(Strict):
    """Base of a method's spec options; subclasses narrow `name` to a Literal (the discriminator)."""

    name: str


@dataclass(frozen=True)
class Method:
    name: str
    options: type[MethodOptions]
    # factor(options, W (m, n), rank, the group's calibration inputs) -> (B, A), B A ≈ W; None for a
    # sparse structure, which has `sparse_factor` instead
    factor: Callable[[MethodOptions, torch.Tensor, int, "GroupInputs"], Factors] | None
    needs: frozenset[str]   # subset of STATISTICS
    structure: Structure    # how an input group's matrices are laid out (and what a rank costs)
    version: str
    # Truncation error = the tail of the whitened spectrum: the Fisher allocator can trade it.
    whitened: bool = False
    # sparse_factor(options, W (m, n), its lowrank_sparse module, inputs) -> (B, A, S values, S indices)
    # with the module's rank and options["nnz"] entries
    sparse_factor: Callable[[MethodOptions, torch.Tensor, CompressedModule, "GroupInputs"], SparseFactors] | None = None
    # stage kinds whose per-matrix artifacts `GroupInputs.artifact` serves the factorisation (CAP: rpca, search)
    reads: tuple[str, ...] = ()
    # allocation kinds the method works with (None: any the allocator itself accepts)
    allocations: tuple[str, ...] | None = None


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    unknown = set(method.needs) - STATISTICS
    if unknown:
        raise ValueError(f"method {method.name!r} needs unknown statistics {sorted(unknown)}")
    if method.options.model_fields["name"].annotation is str:
        raise ValueError(f"method {method.name!r}: its options must narrow `name` to Literal[{method.name!r}]")
    if method.structure.sparse != (method.sparse_factor is not None) or (method.factor is None) == (
            method.sparse_factor is None):
        raise ValueError(f"method {method.name!r}: a sparse structure needs sparse_factor (and no factor); "
                         "any other structure needs factor")
    if method.structure.sparse and "count_indices" not in method.options.model_fields:
        raise ValueError(f"method {method.name!r} stores sparse entries: its options need count_indices")
    if method.structure.skip and "max_condition" not in method.options.model_fields:
        raise ValueError(f"method {method.name!r} skips blocks: its options need a max_condition")
    return METHODS.register(method.name, method)


def method_of(options: MethodOptions) -> Method:
    return METHODS.get(options.name)


def sparse_entry_cost(options: MethodOptions) -> int:
    """Parameters a sparse entry counts as under the method's options (2 when it stores none)."""
    return entry_cost(bool(getattr(options, "count_indices", True)))
