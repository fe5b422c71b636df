"""SkipCat (see METHODS.md, "SkipCat"): a shared low-rank projection and block skipping.

Cat   — linears that read the same input are stacked, W_cat = [W_q; W_k; W_v], whitened with the
        group's S and factorised once: W_cat ≈ B A. A (r×n) is shared; B is split back per matrix.
        Parameters r(n + M), M = Σ rows.
Skip  — with the input permuted so that A = [A₁ A₂] (A₁ r×r, columns chosen by column-pivoted QR),
        B A x = (B A₁)(x₁ + A₁⁻¹A₂ x₂) = B′(x₁ + A′x₂): the r×r block becomes the identity, never
        stored nor multiplied. Parameters r(n + M − r). Exact when A₁ is invertible.

Pure tensor functions; factors in float64, largest singular directions first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from rankfold.methods.svd_llm import svd_llm_factors


@dataclass(frozen=True)
class SkipFactors:
    """y = B′ (x[P[:r]] + A′ x[P[r:]]) for one matrix or (with B′ split per member) a shared group."""

    permutation: torch.Tensor  # (n,) int64: input channels, the r kept-identity ones first
    a_prime: torch.Tensor      # (r, n − r) = A₁⁻¹ A₂
    b_prime: torch.Tensor      # (M, r) = B A₁
    condition: float           # cond₂(A₁): how much the reparameterisation amplifies rounding


def cat_rank(n: int, rows: int, ratio: float) -> int:
    """Largest r with r(n + M) ≤ (1 − ratio)·M·n: the shared projection without skipping."""
    _check_ratio(ratio)
    return max(1, min(n, rows, math.floor((1 - ratio) * rows * n / (n + rows) + 1e-9)))


def skip_rank(n: int, rows: int, ratio: float) -> int:
    """Largest r ≤ min(n, M) with r(n + M − r) ≤ (1 − ratio)·M·n (the smaller root of the quadratic)."""
    _check_ratio(ratio)
    total, budget = n + rows, (1 - ratio) * rows * n
    rank = math.floor((total - math.sqrt(total * total - 4 * budget)) / 2 + 1e-9)
    while rank + 1 <= min(n, rows) and skip_params(n, rows, rank + 1) <= budget:  # float rounding at the edge
        rank += 1
    while rank > 1 and skip_params(n, rows, rank) > budget:
        rank -= 1
    return max(1, min(rank, n, rows))


def skip_params(n: int, rows: int, rank: int) -> int:
    return rank * (n + rows - rank)


def _check_ratio(ratio: float) -> None:
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"compression ratio must lie in (0, 1), got {ratio}")


def cat_factors(weights: list[torch.Tensor], factor: torch.Tensor, rank: int) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Joint whitened factorisation of the stacked weights: ([B_1, …, B_C], shared A)."""
    stacked = torch.cat([w.to(torch.float64) for w in weights], dim=0)  # (M, n)
    b, a = svd_llm_factors(stacked, factor, rank)
    return list(b.split([w.shape[0] for w in weights], dim=0)), a


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
