"""SVD-LLM (arXiv:2403.07378): truncation-aware whitening.

With S Sᵀ = X Xᵀ (Cholesky), SVD(W S) = U Σ Vᵀ and B = U_r Σ_r^½, A = Σ_r^½ V_rᵀ S⁻¹. Because S
whitens the calibration inputs, the output error on them is exactly the dropped spectrum:
‖(W − B A) X‖_F² = Σ_{i>r} σ_i².
"""

from __future__ import annotations

import torch

from rankfold.methods.svd import split_singular
from rankfold.methods.whitening import apply_inverse_right


def whitened_spectrum(weight: torch.Tensor, factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of W·S in float64: (U, σ, Vᵀ). σ² are the losses a global rank allocator trades."""
    return torch.linalg.svd(weight.to(torch.float64) @ factor, full_matrices=False)


def svd_llm_factors(weight: torch.Tensor, factor: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    u, s, vh = whitened_spectrum(weight, factor)
    b, a_white = split_singular(u, s, vh, rank)
    return b, apply_inverse_right(a_white, factor)
