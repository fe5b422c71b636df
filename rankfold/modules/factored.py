"""FactoredLinear: y = B (A x) + bias with A and B as nn.Linear children — the form serving stacks run.

vLLM's Transformers backend (and SGLang's) replaces every nn.Linear of a remote-code model with its
own linear, so a low-rank module built from two nn.Linear children runs on the serving stack's GEMMs;
LowRankLinear's raw parameters would load but run as plain F.linear. `rankfold export --form lowrank`
writes every compressed matrix in this form (tensors `{path}.A.weight` (r, n), `{path}.B.weight`
(m, r), `{path}.bias` (m,) — the dense linear's bias, where it had one).
"""

from __future__ import annotations

import torch
from torch import nn

from rankfold.modules.layout import ModuleKind, lowrank_params, register_module_kind, swap_linear


class FactoredLinear(nn.Module):
    """A: nn.Linear(in_features → rank), B: nn.Linear(rank → out_features), both without bias; `bias` (out,)."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.B(self.A(x))
        return y if self.bias is None else y + self.bias

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, rank), A (rank, in))."""
        return self.B.weight, self.A.weight

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def replace_with_factored(root: nn.Module, path: str, rank: int, dtype: torch.dtype | None = None) -> None:
    """Swap the nn.Linear at `path` under `root` for an empty FactoredLinear of rank `rank`."""
    swap_linear(root, path, lambda dense: FactoredLinear(
        dense.in_features, dense.out_features, rank, bias=dense.bias is not None,
        dtype=dtype or dense.weight.dtype, device=dense.weight.device))


def _tensors(module, stacked, rows, factorizer):
    b, a = factorizer.factor(stacked, module.rank)
    return {f"{module.members[0]}.A.weight": a, f"{module.members[0]}.B.weight": b}, {}


# kind 'factored': `members` is one linear, y = B A x + bias with A and B nn.Linear children
register_module_kind(ModuleKind(
    "factored", build=lambda root, module, dtype: replace_with_factored(root, module.members[0], module.rank, dtype),
    params=lambda module, rows, cols, cost: lowrank_params(module.rank, rows, cols), tensors=_tensors))
