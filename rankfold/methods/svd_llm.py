"""SVD-LLM (arXiv:2403.07378): truncation-aware whitening.

With S Sᵀ = X Xᵀ (Cholesky), SVD(W S) = U Σ Vᵀ and B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ S⁻¹. Because S
whitens the calibration inputs, the output error on them is exactly the dropped spectrum:
‖(W − B A) X‖_F² = Σ_{i>r} σ_i².

    method: {name: svd_llm}
"""

from __future__ import annotations

from typing import Literal

import torch

from rankfold.methods.linalg import reduced_svd
from rankfold.methods.registry import Method, MethodOptions, register_method
from rankfold.methods.structure import LOWRANK
from rankfold.methods.svd import split_singular
from rankfold.methods.whitening import apply_inverse_right

VERSION = "1"


class SvdLlmOptions(MethodOptions):
    """SVD-LLM: truncation-aware whitening, SVD of W·S with S the Cholesky factor of X Xᵀ (arXiv:2403.07378)."""

    name: Literal["svd_llm"]


def whitened_spectrum(weight: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of W·S in float64: (U, σ, Vᵀ). σ² are the losses a global rank allocator trades."""
    return reduced_svd(weight.to(torch.float64) @ factor)


def svd_llm_factors(weight: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) float64 for W (m, n) and the whitening factor S (n, n), lower triangular."""
    u, s, vh = whitened_spectrum(weight, factor)
    b, a_white = split_singular(u, s, vh, rank)
    return b, apply_inverse_right(a_white, factor)


def whitened_factor(options: MethodOptions, weight: torch.Tensor, rank: int,
                    inputs) -> tuple[torch.Tensor, torch.Tensor]:
    """The `factor` of every whitened method (SVD-LLM, and SkipCat's on stacked matrices)."""
    return svd_llm_factors(weight, inputs.whitening, rank)


register_method(Method("svd_llm", SvdLlmOptions, whitened_factor, needs=frozenset({"gram"}), structure=LOWRANK,
                       version=VERSION, whitened=True))
