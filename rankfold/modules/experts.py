"""Mixture-of-experts weights as one linear per expert, so every method, statistic and allocator sees
an expert's matrices as it sees any other linear.

transformers 5 holds a layer's experts fused, as 3D parameters (`gate_up_proj` (E, 2·ffn, hidden),
`down_proj` (E, hidden, ffn); MixtralExperts, Qwen3MoeExperts), while checkpoints on disk keep one
matrix per expert (Mixtral's `w1`/`w3`/`w2`, Qwen3-MoE's `gate_proj`/`up_proj`/`down_proj`). Low-rank
factors of one expert cannot live in a slice of a 3D parameter, so the layer's experts module becomes
a LinearExperts — E modules with `gate_proj`, `up_proj` and `down_proj` nn.Linears at `experts.{e}.…`
— whose forward is transformers' own routing loop over those linears. Gate and up read one input
(an input group per expert: SkipCat shares a projection per expert), and a forward hook on
`experts.{e}.gate_proj` sees exactly the tokens routed to expert e.
"""

from __future__ import annotations

import torch
from torch import nn


class ExpertMLP(nn.Module):
    """One expert: gate_proj and up_proj (hidden -> ffn), down_proj (ffn -> hidden), no biases."""

    def __init__(self, hidden: int, ffn: int, dtype: torch.dtype | None = None, device=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, ffn, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, ffn, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(ffn, hidden, bias=False, dtype=dtype, device=device)


class LinearExperts(nn.ModuleList):
    """E experts; called as transformers' experts module: (tokens, hidden), top-k indices and weights."""

    def __init__(self, num_experts: int, hidden: int, ffn: int, act_fn: nn.Module,
                 dtype: torch.dtype | None = None, device=None):
        super().__init__(ExpertMLP(hidden, ffn, dtype, device) for _ in range(num_experts))
        self.act_fn = act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        final = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = nn.functional.one_hot(top_k_index, num_classes=len(self) + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for index in hit:
            e = int(index[0])
            if e == len(self):
                continue
            position, token = torch.where(mask[e])
            x, expert = hidden_states[token], self[e]
            out = expert.down_proj(self.act_fn(expert.gate_proj(x)) * expert.up_proj(x))
            out = out * top_k_weights[token, position, None]
            final.index_add_(0, token, out.to(final.dtype))
        return final


def unfuse_experts(parent: nn.Module, name: str = "experts") -> LinearExperts:
    """Replace the fused experts module `parent.<name>` by an empty LinearExperts on the same device."""
    fused = getattr(parent, name)
    experts, ffn2, hidden = fused.gate_up_proj.shape
    linear = LinearExperts(experts, hidden, ffn2 // 2, fused.act_fn, fused.gate_up_proj.dtype, fused.gate_up_proj.device)
    setattr(parent, name, linear)
    return linear


def unfuse_all_experts(root: nn.Module, path: str) -> None:
    """Unfuse every experts module at layer path `path` (e.g. "mlp.experts") under `root` (a layer or
    a whole model) into a LinearExperts; ones already unfused are left as they are."""
    parent, _, name = path.rpartition(".")
    for module_path, module in list(root.named_modules()):
        if module_path == parent or module_path.endswith("." + parent):
            if not isinstance(getattr(module, name), LinearExperts):
                unfuse_experts(module, name)


def split_fused_experts(state: dict[str, torch.Tensor], path: str) -> dict[str, torch.Tensor]:
    """A layer state holding transformers 5's fused `{path}.gate_up_proj` (E, 2·ffn, in) and
    `{path}.down_proj` (E, out, ffn) with one `{path}.{e}.{gate_proj|up_proj|down_proj}.weight` per
    expert instead (views, no copies); so is GGUF's stack per projection (`{path}.gate_proj.weight` (E,
    ffn, in), up and down likewise). A state without them is returned as is."""
    out = dict(state)
    stacks = {name: out.pop(f"{path}.{name}.weight", None) for name in ("gate_proj", "up_proj", "down_proj")}
    if all(stack is not None for stack in stacks.values()):
        for e in range(stacks["gate_proj"].shape[0]):
            out.update({f"{path}.{e}.{name}.weight": stack[e] for name, stack in stacks.items()})
        return out
    gate_up, down = out.pop(f"{path}.gate_up_proj", None), out.pop(f"{path}.down_proj", None)
    if gate_up is not None:
        for e in range(gate_up.shape[0]):
            gate, up = gate_up[e].chunk(2, dim=0)
            out.update({f"{path}.{e}.gate_proj.weight": gate, f"{path}.{e}.up_proj.weight": up,
                        f"{path}.{e}.down_proj.weight": down[e]})
    return out


def fuse_split_experts(state: dict[str, torch.Tensor], path: str, experts: int) -> dict[str, torch.Tensor]:
    """The inverse of split_fused_experts: `{path}.{e}.{gate_proj|up_proj|down_proj}.weight` of `experts`
    experts stacked into transformers 5's `{path}.gate_up_proj` (E, 2·ffn, in) and `{path}.down_proj`."""
    out = dict(state)
    parts = [[out.pop(f"{path}.{e}.{name}.weight") for name in ("gate_proj", "up_proj", "down_proj")]
             for e in range(experts)]
    out[f"{path}.gate_up_proj"] = torch.stack([torch.cat([gate, up]) for gate, up, _ in parts])
    out[f"{path}.down_proj"] = torch.stack([down for _, _, down in parts])
    return out
