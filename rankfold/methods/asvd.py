"""ASVD (arXiv:2312.05821): activation-aware scaling before the SVD.

W D with D = diag(mean_tokens |x_j|)^α puts large-activation input channels first in the SVD's
error budget; the scaling is undone on A afterwards: W ≈ B (A D⁻¹).

    method: {name: asvd, alpha: 0.5}
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from rankfold.methods.registry import Method, MethodOptions, register_method
from rankfold.methods.structure import LOWRANK
from rankfold.methods.svd import svd_factors

VERSION = "1"


class AsvdOptions(MethodOptions):
    """ASVD: SVD of W·D with D = diag(mean|x|)^alpha (arXiv:2312.05821)."""

    name: Literal["asvd"]
    alpha: float = Field(0.5, gt=0.0, le=2.0)


def asvd_factors(weight: torch.Tensor, mean_abs: torch.Tensor, rank: int, alpha: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) float64 for W (m, n), `mean_abs` (n,): the scaled SVD's factors with the scaling undone."""
    scale = mean_abs.to(torch.float64).clamp_min(1e-12) ** alpha  # (n,) dead channels must not divide by 0
    b, a = svd_factors(weight.to(torch.float64) * scale, rank)
    return b, a / scale


register_method(Method("asvd", AsvdOptions,
                       lambda options, weight, rank, inputs: asvd_factors(weight, inputs.mean_abs, rank, options.alpha),
                       needs=frozenset({"mean_abs"}), structure=LOWRANK, version=VERSION))
