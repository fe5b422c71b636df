"""LowRankLinear: y = B (A x) + bias — a dense linear replaced by two thin matmuls."""

from __future__ import annotations

import torch
from torch import nn

from rankfold.kernels import shared_lowrank


class LowRankLinear(nn.Module):
    """Holds the factors only; A: (rank, in_features), B: (out_features, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shared_lowrank(x, self.A, [self.B], biases=[self.bias])[0]  # (..., n) -> (..., r) -> (..., m)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def replace_linears(root: nn.Module, ranks: dict[str, int], dtype: torch.dtype | None = None) -> None:
    """Swap each named nn.Linear under `root` for an empty (same-device) LowRankLinear of the given rank."""
    for path, rank in ranks.items():
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        dense = getattr(parent, child)
        if not isinstance(dense, nn.Linear):
            raise TypeError(f"{path} is {type(dense).__name__}, not nn.Linear")
        replacement = LowRankLinear(dense.in_features, dense.out_features, rank, bias=dense.bias is not None,
                                    dtype=dtype or dense.weight.dtype, device=dense.weight.device)
        setattr(parent, child, replacement)
