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
from rankfold.methods.structure import Structure

if TYPE_CHECKING:
    from rankfold.methods.decompose import GroupInputs

Factors = tuple[torch.Tensor, torch.Tensor]  # (B: m×r, A: r×n), float64, largest directions first

# Calibration statistics a method may need (rankfold/methods/statistics.py collects them per input group).
STATISTICS = frozenset({"gram", "mean_abs"})


class MethodOptions(Strict):
    """Base of a method's spec options; subclasses narrow `name` to a Literal (the discriminator)."""

    name: str


@dataclass(frozen=True)
class Method:
    name: str
    options: type[MethodOptions]
    # factor(options, W (m, n), rank, the group's calibration inputs) -> (B, A), B A ≈ W
    factor: Callable[[MethodOptions, torch.Tensor, int, "GroupInputs"], Factors]
    needs: frozenset[str]   # subset of STATISTICS
    structure: Structure    # how an input group's matrices are laid out (and what a rank costs)
    version: str
    # Truncation error = the tail of the whitened spectrum: the Fisher allocator can trade it.
    whitened: bool = False


METHODS: Registry[Method] = Registry("method")


def register_method(method: Method) -> Method:
    unknown = set(method.needs) - STATISTICS
    if unknown:
        raise ValueError(f"method {method.name!r} needs unknown statistics {sorted(unknown)}")
    if method.options.model_fields["name"].annotation == str:
        raise ValueError(f"method {method.name!r}: its options must narrow `name` to Literal[{method.name!r}]")
    if method.structure.skip and "max_condition" not in method.options.model_fields:
        raise ValueError(f"method {method.name!r} skips blocks: its options need a max_condition")
    return METHODS.register(method.name, method)


def method_of(options: MethodOptions) -> Method:
    return METHODS.get(options.name)
