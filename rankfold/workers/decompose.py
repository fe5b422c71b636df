"""Decompose stage: one group of linears that share an input -> the compressed layer's tensors for it.

The group is the unit because the methods share per-input work: the whitening factor is computed
once per group, and Cat factorises the group's matrices jointly. The result is a fragment of the
compressed layer's state dict (keys relative to the layer), plus diagnostics for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from rankfold.jobs.spec import MethodSpec
from rankfold.methods.asvd import asvd_factors
from rankfold.methods.flrc import needs_factor, whitened_energy
from rankfold.methods.skipcat import cat_factors, skip_reparameterize
from rankfold.methods.svd import svd_factors
from rankfold.methods.svd_llm import svd_llm_factors
from rankfold.methods.whitening import whitening_factor
from rankfold.modules.layout import CompressedModule
from rankfold.workers.calibrate import InputStats

Factors = tuple[torch.Tensor, torch.Tensor]  # (B: m×r, A: r×n), float64


class DecompositionError(ValueError):
    """A decomposition that would give an inaccurate model: names the module and the quantity."""


@dataclass
class GroupResult:
    tensors: dict[str, torch.Tensor]                            # compressed-layer state fragment
    diagnostics: dict[str, float] = field(default_factory=dict)  # e.g. cond(A₁) of each skip block


class _GroupMath:
    """Per-group quantities computed at most once (the whitening factor)."""

    def __init__(self, stats: InputStats):
        self.stats = stats
        self._factor: torch.Tensor | None = None

    @property
    def whitening(self) -> torch.Tensor:
        if self._factor is None:
            self._factor = whitening_factor(self.stats.symmetric_gram())
            # The Gram was consumed in place (symmetrised, maybe shifted) and is not read again: drop
            # it before the SVD (a 70B down_proj's is 6.6 GB) — callers pass stats they do not keep.
            self.stats = InputStats(torch.empty(0, 0, dtype=torch.float64), self.stats.abs_sum, self.stats.count)
        return self._factor


def _single_matrix(method: MethodSpec, math: _GroupMath) -> Callable[[torch.Tensor, int], Factors]:
    if method.name == "svd":
        return svd_factors
    if method.name == "asvd":
        return lambda weight, rank: asvd_factors(weight, math.stats.mean_abs, rank, method.alpha)
    return lambda weight, rank: svd_llm_factors(weight, math.whitening, rank)  # svd_llm, cat, skip, skipcat


def _shared(method: MethodSpec, module: CompressedModule, weights: dict[str, torch.Tensor],
            math: _GroupMath, result: GroupResult) -> None:
    parts, shared = cat_factors([weights[m] for m in module.members], math.whitening, module.rank)
    if not module.skip:
        result.tensors[f"{module.shared_path}.A"] = shared
        result.tensors.update({f"{m}.B": b for m, b in zip(module.members, parts)})
        return
    skip = skip_reparameterize(torch.cat(parts), shared)
    if skip.condition > method.max_condition:
        raise DecompositionError(f"{module.shared_path}: cond(A₁) = {skip.condition:.3g} exceeds "
                         f"method.max_condition = {method.max_condition:g}; low-precision forward would be inaccurate")
    result.diagnostics[f"{module.shared_path}.condition"] = skip.condition
    result.tensors[f"{module.shared_path}.A_prime"] = skip.a_prime
    result.tensors[f"{module.shared_path}.permutation"] = skip.permutation
    rows = [weights[m].shape[0] for m in module.members]
    result.tensors.update({f"{m}.B": b for m, b in zip(module.members, skip.b_prime.split(rows))})


def decompose_group(method: MethodSpec, weights: dict[str, torch.Tensor], stats: InputStats,
                    modules: list[CompressedModule]) -> GroupResult:
    """Tensors of `modules` (all reading this group's input); `weights` keyed by member path."""
    math, result = _GroupMath(stats), GroupResult({})
    del stats  # only `math` holds the statistics now, so it can drop the Gram after factorising it
    for module in modules:
        if module.kind == "lowrank":
            (member,) = module.members
            b, a = _single_matrix(method, math)(weights[member], module.rank)
            result.tensors.update({f"{member}.A": a, f"{member}.B": b})
        elif module.kind == "shared":
            _shared(method, module, weights, math, result)
        else:
            raise ValueError(f"unknown compressed module kind {module.kind!r}")
    return result


def unit_name(module: CompressedModule) -> str:
    """A compressed module's name for allocation: its members, joined (paths inside the layer)."""
    return "+".join(module.members)


GRAM_TRACE_KEY = "gram_trace"


def group_spectra(weights: dict[str, torch.Tensor], stats: InputStats,
                  modules: list[CompressedModule]) -> dict[str, torch.Tensor]:
    """Whitened spectra σ² of this group's modules (members stacked, as Cat factorises them) and the
    trace of the input Gram: what the global allocator trades (methods/flrc.py)."""
    gram = stats.symmetric_gram()
    stacked = {unit_name(m): torch.cat([weights[p] for p in m.members]) for m in modules}
    factor = whitening_factor(gram.clone()) if any(map(needs_factor, stacked.values())) else None  # once a group
    spectra = {f"{name}.energy": whitened_energy(weight, gram, factor) for name, weight in stacked.items()}
    spectra[GRAM_TRACE_KEY] = gram.diagonal().sum().reshape(1)
    return spectra
