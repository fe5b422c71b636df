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


MAX_SHIFT_STEPS = 8  # up to 0.1 × mean diagonal: a Gram (PSD by construction) never needs more


def whitening_factor(gram: torch.Tensor, rel_eps: float = 1e-8) -> torch.Tensor:
    """Lower-triangular S with S Sᵀ = G (float64). A float64 `gram` is consumed: made exactly
    symmetric in place (from its upper triangle) and, if singular, shifted in place — no n×n copies.

    G from real activations can be singular (dead channels, fewer tokens than channels). Then add
    ε·mean(diag G)·I, ε = rel_eps, 10·rel_eps, ... until Cholesky succeeds — a ridge like SVD-LLM's
    shift, found with Cholesky attempts (n³/3 each) instead of an eigendecomposition, which for a
    70B down_proj (n = 28672) would take hours on a CPU. A zero Gram (no tokens: an expert the router
    never chose) gives the identity — every factorisation has zero error on no inputs, and the plain
    SVD's is the one that serves unseen tokens best; otherwise never an unwhitened SVD.
    """
    gram = gram.to(torch.float64)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"Gram matrix must be square, got shape {tuple(gram.shape)}")
    if not all(torch.isfinite(rows).all() for rows in gram.split(1024)):  # by blocks: no n×n temporary
        raise ValueError("Gram matrix has non-finite entries: calibration activations overflowed")
    gram = mirror_upper_(gram)
    if not gram.diagonal().any():  # no calibration input at all (an expert no token was routed to)
        log.info("Gram matrix is zero (no calibration tokens): whitening with the identity")
        return torch.eye(gram.shape[0], dtype=torch.float64, device=gram.device)
    factor, info = torch.linalg.cholesky_ex(gram)
    if info.item() == 0:
        return factor
    scale = float(gram.diagonal().abs().mean().clamp_min(1e-300))
    shifted = 0.0
    for step in range(MAX_SHIFT_STEPS):
        shift = rel_eps * 10.0 ** step * scale
        gram.diagonal().add_(shift - shifted)
        shifted = shift
        del factor  # the failed attempt's n×n output, before the next one allocates its own
        factor, info = torch.linalg.cholesky_ex(gram)
        if info.item() == 0:
            log.info("Gram matrix not positive definite: added %.3e·I (%.0e of its mean diagonal)", shift,
                     shift / scale)
            return factor
    raise ValueError(f"Cholesky failed even after shifting the Gram matrix by {shifted:.3e} "
                     f"({shifted / scale:.0e} of its mean diagonal): the statistics are degenerate")


def apply_inverse_right(matrix: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """matrix · S⁻¹ by a triangular solve (never forms the inverse): solves Y S = matrix."""
    return torch.linalg.solve_triangular(factor, matrix, upper=False, left=False)
