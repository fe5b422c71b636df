"""Robust PCA (CAP, seed 001; METHODS.md "CAP"): W = L + S with L low rank and S sparse, by the inexact
augmented Lagrangian method (Lin, Chen & Ma 2010, arXiv:1009.5055, Algorithm 5):

    min ‖L‖_* + λ‖S‖₁  s.t.  W = L + S,        λ = 1/√max(m, n) by default
    L ← SVT_{1/μ}(W − S + Y/μ)                  singular-value thresholding
    S ← shrink_{λ/μ}(W − L + Y/μ)               entrywise soft thresholding
    Y ← Y + μ (W − L − S),  μ ← min(ρ μ, μ_max)

with Y₀ = W / max(‖W‖₂, ‖W‖_∞/λ), μ₀ = 1.25/‖W‖₂, ρ = 1.5 (the paper's and METHODS.md's defaults).
CAP reports 3 iterations as enough for LLM weights (1 → ppl 32,497; 3 → 5.18; 10 → 5.13), so the
iteration count is an option and the result carries a convergence record.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rankfold.methods.linalg import reduced_svd


@dataclass
class RPCAResult:
    """L = U diag(σ) Vᵀ (U (m, k), σ (k,) descending, Vᵀ (k, n), float64) and S (m, n) float64 dense;
    `history`: per iteration, the relative constraint residual ‖W − L − S‖_F/‖W‖_F, rank(L), nnz(S), μ."""

    u: torch.Tensor
    sigma: torch.Tensor
    vh: torch.Tensor
    sparse: torch.Tensor
    history: list[dict] = field(default_factory=list)

    @property
    def low_rank(self) -> torch.Tensor:
        return (self.u * self.sigma) @ self.vh


def shrink(x: torch.Tensor, threshold: float) -> torch.Tensor:
    """Entrywise soft thresholding sign(x)·max(|x| − τ, 0)."""
    return x.sign() * (x.abs() - threshold).clamp_min(0.0)


def singular_value_threshold(x: torch.Tensor, threshold: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, σ − τ, Vᵀ) of the singular values above τ: the proximal map of τ‖·‖_*."""
    u, s, vh = reduced_svd(x)
    keep = int((s > threshold).sum())
    return u[:, :keep], s[:keep] - threshold, vh[:keep]


def robust_pca(weight: torch.Tensor, lam: float | None = None, iterations: int = 3, mu: float | None = None,
               rho: float = 1.5, tol: float = 1e-7) -> RPCAResult:
    """Inexact-ALM robust PCA of `weight` (m, n), computed in float64. Stops after `iterations` or once
    the relative residual is below `tol`. Raises ValueError for a non-finite or all-zero weight, or
    non-positive options."""
    w = weight.to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise ValueError("robust PCA needs a finite weight matrix")
    if iterations < 1 or rho <= 1.0 or (lam is not None and lam <= 0) or (mu is not None and mu <= 0):
        raise ValueError(f"robust PCA options out of range: iterations {iterations} ≥ 1, rho {rho} > 1, "
                         f"lam {lam} > 0, mu {mu} > 0")
    norm_two = float(torch.linalg.matrix_norm(w, ord=2))
    norm_fro = float(torch.linalg.matrix_norm(w))
    if norm_fro == 0.0:
        raise ValueError("robust PCA of an all-zero matrix")
    lam = lam if lam is not None else 1.0 / math.sqrt(max(w.shape))
    y = w / max(norm_two, float(w.abs().max()) / lam)
    mu = mu if mu is not None else 1.25 / norm_two
    mu_max = mu * 1e7
    sparse = torch.zeros_like(w)
    result = RPCAResult(w[:, :0], w.new_zeros(0), w[:0], sparse)
    for k in range(iterations):
        u, s, vh = singular_value_threshold(w - sparse + y / mu, 1.0 / mu)
        low = (u * s) @ vh
        sparse = shrink(w - low + y / mu, lam / mu)
        gap = w - low - sparse
        y = y + mu * gap
        residual = float(torch.linalg.matrix_norm(gap)) / norm_fro
        result = RPCAResult(u, s, vh, sparse, result.history + [
            {"iteration": k + 1, "residual": residual, "rank": s.numel(), "nnz": int((sparse != 0).sum()), "mu": mu}])
        mu = min(mu * rho, mu_max)
        if residual < tol:
            break
    return result
