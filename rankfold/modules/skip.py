"""Block skipping (SkipCat's Skip, see METHODS.md): B A = B′[I A′]·P exactly, so the r×r identity block
is neither stored nor multiplied. With the input permuted so that A = [A₁ A₂] (A₁ r×r, columns chosen by
column-pivoted QR), B A x = (B A₁)(x₁ + A₁⁻¹A₂ x₂) = B′(x₁ + A′x₂). Exact when A₁ is invertible.

Pure tensor functions in float64; the SharedProjection (modules/shared.py) runs the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


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
    order = torch.arange(n, device=matrix.device)
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
