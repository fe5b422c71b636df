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
    rank, n = a.shape[0], x.shape[-1]
    # Advanced indexing gathers ~3x faster than index_select for bf16 on CPU (measured, torch 2.13);
    # both halves are views of the one gathered copy, and addmm fuses the identity block's add.
    permuted = x[..., permutation].reshape(-1, n)
    z = torch.addmm(permuted[:, :rank], permuted[:, rank:], a.T)
    return z.reshape(*x.shape[:-1], rank)


def shared_lowrank_torch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, permutation: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None) -> torch.Tensor:
    """y (…, m) = B · project(x) + bias."""
    return F.linear(project(x, a, permutation), b, bias)
