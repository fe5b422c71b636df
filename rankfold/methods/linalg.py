"""The reduced SVD and singular values every method factorises with: one driver choice for all of them."""

from __future__ import annotations

import torch


def reduced_svd(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U (m, k), S (k,), Vᵀ (k, n)), k = min(m, n), of a float matrix (m, n), in its dtype and device.

    On CUDA with cuSOLVER's QR-based `gesvd`: torch's default there is the Jacobi `gesvdj` (falling back to
    `gesvd` only when it does not converge), which torch's documentation advises only for well-conditioned
    matrices — SVD-LLM's W·S and the whitened weights of CAP and Palu are far from that. On the CPU, LAPACK
    as torch chooses (the same call as before: CPU results unchanged)."""
    if a.is_cuda:
        return torch.linalg.svd(a, full_matrices=False, driver="gesvd")
    return torch.linalg.svd(a, full_matrices=False)


def singular_values(a: torch.Tensor) -> torch.Tensor:
    """S (k,), descending, of `a` (m, n): `reduced_svd`'s, with the same driver, without U and Vᵀ."""
    if a.is_cuda:
        return torch.linalg.svdvals(a, driver="gesvd")
    return torch.linalg.svdvals(a)
