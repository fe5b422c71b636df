"""Whitening from calibration statistics: the Cholesky factor S of the Gram matrix G = X Xᵀ."""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def mirror_upper_(matrix: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """Make a square matrix exactly symmetric from its upper triangle, in place, block by block:
    no n×n temporaries (a 70B down_proj Gram is 28672² float64 = 6.6 GB)."""
    n = matrix.shape[0]
    for start in range(0, n, block):
        stop = min(start + block, n)
        diagonal = matrix[start:stop, start:stop]
        diagonal.copy_(torch.triu(diagonal) + torch.triu(diagonal, 1).T)
        if start:
            matrix[start:stop, :start].copy_(matrix[:start, start:stop].T)
    return matrix


def whitening_factor(gram: torch.Tensor, rel_eps: float = 1e-8) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = G (float64). A float64 `gram` is made exactly symmetric in
    place (from its upper triangle) rather than copied.

    G from real activations is often singular (dead channels, fewer tokens than channels). Then shift
    by (-λ_min + ε)·I and retry, as SVD-LLM does; never fall back to an unwhitened SVD silently.
    """
    gram = gram.to(torch.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    if not torch.isfinite(gram).all():
        raise ValueError("Gram matrix has non-finite entries: calibration activations overflowed")
    gram = mirror_upper_(gram)
    factor, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0:
        return factor
    eps = rel_eps * float(gram.diagonal().abs().mean().clamp_min(1e-300))
    lambda_min = float(torch.linalg.eigvalsh(gram)[0])
    shift = max(-lambda_min, 0.0) + eps
    log.info("Gram matrix not positive definite (λ_min=%.3e): adding %.3e·I before Cholesky", lambda_min, shift)
    factor, info = torch.linalg.cholesky_ex(gram + shift * torch.eye(gram.shape[0], dtype=gram.dtype))
    if info.item() != 0:
        raise ValueError(f"Cholesky failed even after shifting the Gram matrix by {shift:.3e}")
    return factor


def apply_inverse_right(matrix: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """matrix · S⁻¹ by a triangular solve (never forms the inverse): solves Y S = matrix."""
    return torch.linalg.solve_triangular(factor, matrix, upper=False, left=False)
