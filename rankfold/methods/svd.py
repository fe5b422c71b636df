"""Plain truncated SVD: W ≈ (U_r Σ_r^½)(Σ_r^½ V_rᵀ). The baseline that ignores activations.

    method: {name: svd}
"""

from __future__ import annotations

from typing import Literal

import torch

from rankfold.methods.linalg import reduced_svd
from rankfold.methods.registry import Method, MethodOptions, register_method
from rankfold.methods.structure import LOWRANK

VERSION = "1"


class SvdOptions(MethodOptions):
    """Plain truncated SVD of W (no calibration data used)."""

    name: Literal["svd"]


def split_singular(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-`rank` triplets as B = U_r Σ_r^½ (m×r) and A = Σ_r^½ V_rᵀ (r×n), largest σ first (nested)."""
    root = s[:rank].sqrt()
    return u[:, :rank] * root, root[:, None] * vh[:rank]


def svd_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) in float64 with B A the best rank-`rank` approximation of W in Frobenius norm."""
    u, s, vh = reduced_svd(weight.to(torch.float64))
    return split_singular(u, s, vh, rank)


register_method(Method("svd", SvdOptions, lambda options, weight, rank, inputs: svd_factors(weight, rank),
                       needs=frozenset(), structure=LOWRANK, version=VERSION))
