"""LowRankLinear: y = B (A x) + bias — a dense linear replaced by two thin matmuls.

Factors are ordered by singular value, so the first r′ ≤ r directions are again a rank-r′ model:
`active_rank` runs the module at r′ on views A[:r′], B[:, :r′] (no copy) — FLRC's progressive
low-rank decoding sets it per decode step (modules/progressive.py).
"""

from __future__ import annotations

import torch
from torch import nn

from rankfold.kernels import shared_lowrank
from rankfold.modules.layout import ModuleKind, lowrank_params, register_module_kind, swap_linear


class LowRankLinear(nn.Module):
    """Holds the factors only; A: (rank, in_features), B: (out_features, rank)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.active_rank: int | None = None      # None: the stored rank
        self.rank_log: list[int] | None = None   # when a list, every forward appends the rank it ran at

    def set_active_rank(self, rank: int | None) -> None:
        self.active_rank = check_active_rank(rank, self.rank, type(self).__name__)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rank = self.active_rank or self.rank
        if self.rank_log is not None:
            self.rank_log.append(rank)
        # (..., n) -> (..., r′) -> (..., m); prefixes are views of the stored factors
        return shared_lowrank(x, self.A[:rank], [self.B[:, :rank]], biases=[self.bias])[0]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, rank), A (rank, in)) at the stored rank: the module is B A x + bias."""
        return self.B, self.A

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def check_active_rank(rank: int | None, stored: int, what: str) -> int | None:
    """`rank` if 1 ≤ rank ≤ stored (None: the stored rank); ValueError otherwise."""
    if rank is not None and not 1 <= rank <= stored:
        raise ValueError(f"{what}: active rank {rank} outside [1, {stored}] (its stored rank)")
    return rank


def replace_linears(root: nn.Module, ranks: dict[str, int], dtype: torch.dtype | None = None) -> None:
    """Swap each named nn.Linear under `root` for an empty (same-device) LowRankLinear of the given rank."""
    for path, rank in ranks.items():
        swap_linear(root, path, lambda dense, rank=rank: LowRankLinear(
            dense.in_features, dense.out_features, rank, bias=dense.bias is not None,
            dtype=dtype or dense.weight.dtype, device=dense.weight.device))


def _tensors(module, stacked, rows, factorizer):
    """One matrix: its B and A."""
    b, a = factorizer.factor(stacked, module.rank)
    return {f"{module.members[0]}.A": a, f"{module.members[0]}.B": b}, {}


# kind 'lowrank': `members` is one linear, y = B A x
register_module_kind(ModuleKind(
    "lowrank", build=lambda root, module, dtype: replace_linears(root, {module.members[0]: module.rank}, dtype),
    params=lambda module, rows, cols, cost: lowrank_params(module.rank, rows, cols), tensors=_tensors))
