"""ASVD (arXiv:2312.05821): activation-aware scaling before the SVD.

W D with D = diag(mean_tokens |x_j|)^α puts large-activation input channels first in the SVD's
error budget; the scaling is undone on A afterwards: W ≈ B (A D⁻¹).
"""

from __future__ import annotations

import torch

from rankfold.methods.svd import svd_factors


def asvd_factors(weight: torch.Tensor, mean_abs: torch.Tensor, rank: int, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    scale = mean_abs.to(torch.float64).clamp_min(1e-12) ** alpha  # (n,) dead channels must not divide by 0
    b, a = svd_factors(weight.to(torch.float64) * scale, rank)
    return b, a / scale
