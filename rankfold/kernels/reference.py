"""Torch path of the shared low-rank linear: the CPU implementation and the kernels' reference.

    y = B z + bias,   z = A x                       (plain / shared projection)
                      z = x[P[:r]] + A′ x[P[r:]]     (skip: the r×r identity block is never stored)

B may stack several members' factors ([B_q; B_k; B_v]) so one call yields the whole group.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def project(x: torch.Tensor, a: torch.Tensor, permutation: torch.Tensor | None = None) -> torch.Tensor:
    """z (…, r) from x (…, n): A x, or with `permutation` the skip form x[P[:r]] + A′ x[P[r:]]."""
    if permutation is None:
        return F.linear(x, a)
    rank = a.shape[0]
    permuted = x.index_select(-1, permutation)  # one gather; both parts are views of it
    kept, rest = permuted[..., :rank], permuted[..., rank:]
    if x.dim() == 2:
        return torch.addmm(kept, rest, a.T)  # the identity block's add fused into the GEMM
    return kept + F.linear(rest, a)


def shared_lowrank_torch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, permutation: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (…, m) = B · project(x) + bias."""
    return F.linear(project(x, a, permutation), b, bias)
