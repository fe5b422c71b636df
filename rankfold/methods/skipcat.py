"""SkipCat (see METHODS.md, "SkipCat"): a shared low-rank projection and block skipping.

Cat   — linears that read the same input are stacked, W_cat = [W_q; W_k; W_v], whitened with the
        group's S and factorised once: W_cat ≈ B A. A (r×n) is shared; B is split back per matrix.
        Parameters r(n + M), M = Σ rows.
Skip  — with the input permuted so that A = [A₁ A₂] (A₁ r×r, columns chosen by column-pivoted QR),
        B A x = (B A₁)(x₁ + A₁⁻¹A₂ x₂) = B′(x₁ + A′x₂): the r×r block becomes the identity, never
        stored nor multiplied. Parameters r(n + M − r). Exact when A₁ is invertible.

Pure tensor functions; factors in float64, largest singular directions first. Three methods share
this file: `skipcat`, and its ablations `cat` (sharing only) and `skip` (skipping only).

    method: {name: skipcat, max_condition: 1e4}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from rankfold.methods.registry import Method, MethodOptions, register_method
from rankfold.methods.structure import SHARED, SHARED_SKIP, SKIP
from rankfold.methods.svd_llm import whitened_factor

VERSION = "1"


@dataclass(frozen=True)
class SkipFactors:
    """y = B′ (x[P[:r]] + A′ x[P[r:]]) for one matrix or (with B′ split per member) a shared group."""

    permutation: torch.Tensor  # (n,) int64: input channels, the r kept-identity ones first
    a_prime: torch.Tensor      # (r, n − r) = A₁⁻¹ A₂
    b_prime: torch.Tensor      # (M, r) = B A₁
    condition: float           # cond₂(A₁): how much the reparameterisation amplifies rounding


def pivoted_columns(matrix: torch.Tensor, count: int) -> torch.Tensor:
    """Column order of a column-pivoted QR (Businger–Golub): the first `count` columns are the
    best-conditioned choice greedily; returns a full permutation of range(n)."""
    residual = matrix.to(torch.float64).clone()  # (r, n)
    n = residual.shape[1]
    order = torch.arange(n)
    for step in range(count):
        norms = residual[:, step:].pow(2).sum(0)
        pick = step + int(torch.argmax(norms))
        if pick != step:  # swap the chosen column into place
            residual[:, [step, pick]] = residual[:, [pick, step]]
            order[[step, pick]] = order[[pick, step]]
        q = residual[:, step] / residual[:, step].norm().clamp_min(1e-300)
        residual[:, step + 1:] -= torch.outer(q, q @ residual[:, step + 1:])  # project the rest off q
    return order


def skip_reparameterize(b: torch.Tensor, a: torch.Tensor) -> SkipFactors:
    """B A = B′[I A′]·P exactly, with A₁ = A[:, P[:r]] chosen by pivoted QR."""
    rank = a.shape[0]
    permutation = pivoted_columns(a, rank)
    a1, a2 = a[:, permutation[:rank]], a[:, permutation[rank:]]
    condition = float(torch.linalg.cond(a1))
    if not math.isfinite(condition):
        raise ValueError("the selected r×r block of A is singular: A does not have full row rank")
    return SkipFactors(permutation, torch.linalg.solve(a1, a2), b @ a1, condition)


def skip_apply(factors: SkipFactors, x: torch.Tensor) -> torch.Tensor:
    """Reference forward y = B′(x₁ + A′x₂) for x (…, n); the kernels are tested against this."""
    rank = factors.b_prime.shape[1]
    x = x.to(factors.a_prime.dtype)
    inner = x[..., factors.permutation[:rank]] + x[..., factors.permutation[rank:]] @ factors.a_prime.T
    return inner @ factors.b_prime.T


class _SkipCatOptions(MethodOptions):
    # Guard on cond₂(A₁) of every skip block: above it the job stops with an error naming the matrix
    # (column-pivoted QR keeps it small; a large value means fp16/bf16 forward would lose accuracy).
    max_condition: float = Field(1e4, gt=1.0)


class SkipCatOptions(_SkipCatOptions):
    """SkipCat: whitened shared projection per input group (q/k/v; gate/up) + block skipping."""

    name: Literal["skipcat"]


class CatOptions(_SkipCatOptions):
    """Ablation: the shared projection only (no skipping)."""

    name: Literal["cat"]


class SkipOptions(_SkipCatOptions):
    """Ablation: block skipping on each matrix alone (no sharing)."""

    name: Literal["skip"]


for _options, _structure in ((SkipCatOptions, SHARED_SKIP), (CatOptions, SHARED), (SkipOptions, SKIP)):
    register_method(Method(_options.model_fields["name"].annotation.__args__[0], _options, whitened_factor,
                           needs=frozenset({"gram"}), structure=_structure, version=VERSION, whitened=True))
