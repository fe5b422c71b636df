"""Shared projections (SkipCat's Cat) and block skipping (its Skip), as drop-in linears.

A group of linears that read the same input (q/k/v, or gate/up) becomes one SharedProjection
z = A x (or, with skipping, z = x[P₁] + A′ x[P₂]) registered once on the parent module, and one
SharedLowRankLinear per member computing y = B z. transformers calls q_proj, k_proj and v_proj one
after another on the same tensor; the projection caches z for that tensor until every member has
used it, so A x is computed once per token without changing transformers' attention code.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


class SharedProjection(nn.Module):
    """z = A x (skip=False) or z = x[P[:r]] + A′ x[P[r:]] (skip=True), for `consumers` members."""

    def __init__(self, in_features: int, rank: int, skip: bool, consumers: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.rank, self.skip, self.consumers = in_features, rank, skip, consumers
        if skip:
            self.A_prime = nn.Parameter(torch.empty(rank, in_features - rank, dtype=dtype, device=device))
            self.register_buffer("permutation", torch.empty(in_features, dtype=torch.int64, device=device))
        else:
            self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self._cached_input: weakref.ref | None = None
        self._cached_output: torch.Tensor | None = None
        self._uses_left = 0

    def project(self, x: torch.Tensor) -> torch.Tensor:
        if not self.skip:
            return F.linear(x, self.A)  # (..., n) -> (..., r)
        kept, rest = self.permutation[: self.rank], self.permutation[self.rank:]
        return x.index_select(-1, kept) + F.linear(x.index_select(-1, rest), self.A_prime)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cached = self._cached_input() if self._cached_input is not None else None
        if cached is not x or self._uses_left == 0:
            self._cached_output = self.project(x)
            self._cached_input = weakref.ref(x)
            self._uses_left = self.consumers
        output = self._cached_output
        self._uses_left -= 1
        if self._uses_left == 0:  # every member has its copy: drop ours
            self._cached_input, self._cached_output = None, None
        return output

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, skip={self.skip}, consumers={self.consumers}"


class SharedLowRankLinear(nn.Module):
    """y = B · shared(x) + bias; the shared projection is owned by the parent, referenced here."""

    def __init__(self, shared: SharedProjection, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = shared.in_features, out_features, shared.rank
        object.__setattr__(self, "shared", shared)  # not a submodule: its parameters live on the parent once
        self.B = nn.Parameter(torch.empty(out_features, shared.rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.shared(x), self.B, self.bias)

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def replace_group(root: nn.Module, shared_path: str, members: dict[str, int], rank: int, skip: bool,
                  dtype: torch.dtype | None = None) -> None:
    """Swap the linears at `members` (path -> out_features) for SharedLowRankLinears over one new
    SharedProjection registered at `shared_path` (all paths relative to `root`)."""
    first = root.get_submodule(next(iter(members)))
    dtype = dtype or first.weight.dtype
    shared = SharedProjection(first.in_features, rank, skip, consumers=len(members), dtype=dtype,
                              device=first.weight.device)
    parent_path, _, name = shared_path.rpartition(".")
    (root.get_submodule(parent_path) if parent_path else root).add_module(name, shared)
    for path in members:
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        dense = getattr(parent, child)
        if not isinstance(dense, nn.Linear) or dense.in_features != shared.in_features:
            raise TypeError(f"{path} is not an nn.Linear reading {shared.in_features} features")
        setattr(parent, child, SharedLowRankLinear(shared, dense.out_features, bias=dense.bias is not None,
                                                   dtype=dtype, device=dense.weight.device))
