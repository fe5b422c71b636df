"""One decoder layer as a runnable module: built from a state dict, run on a batch of hidden states."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig

from rankfold.models.architecture import Architecture, architecture_for
from rankfold.modules.layout import CompressedModule, apply_layout
from rankfold.modules.sparse import dense_products


def runtime_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy that runs attention as the family's adapter says (SDPA: with no mask it is causal, so a
    layer runs standalone; eager for families SDPA would change, given an explicit causal mask)."""
    config = copy.deepcopy(config)
    config._attn_implementation = architecture_for(config).attention
    return config


def materialize_layer(arch: Architecture, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor],
                      dtype: torch.dtype, layout: list[CompressedModule] | None = None,
                      device: torch.device | None = None) -> nn.Module:
    """Layer `index` holding exactly `state`, on `device` (None: where the state is); `layout` names the
    linears stored as low-rank modules."""
    layer = arch.build_layer(config, index)
    if layout:
        apply_layout(layer, layout, dtype=dtype)
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"layer {index}: state does not fit the architecture "
                         f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    if device is not None:
        layer.to(device)
    dense_products(layer)  # one layer at a time: a dense W̃ costs little and beats the CSR product
    return layer.eval()


def causal_mask(length: int, window: int | None, device: torch.device | None = None) -> torch.Tensor:
    """(1, 1, length, length) bool, True where query i attends key j: j ≤ i, and i − j < window for a
    sliding-window layer (transformers' rule: a window of `window` tokens including the query's own)."""
    i, j = torch.arange(length, device=device)[:, None], torch.arange(length, device=device)[None]
    allowed = j <= i
    return (allowed & (i - j < window) if window else allowed)[None, None]


def additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as eager attention takes it: 0 where allowed, the dtype's minimum elsewhere."""
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


class LayerRunner:
    """Runs decoder layers on (batch, seq, hidden) inputs; caches RoPE tables per sequence length. Full
    causal attention is SDPA's own (no mask); a sliding-window layer (the architecture says which) gets
    its window as a mask once the sequence is longer than it; eager attention always gets its mask."""

    def __init__(self, arch: Architecture, config: PretrainedConfig):
        self.arch, self.config = arch, config
        self.rotary = arch.build_rotary(config)
        self._tables: dict[tuple, object] = {}  # RoPE (cos, sin) and masks, by what they depend on

    def position_embeddings(self, hidden: torch.Tensor, rope: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions 0 … seq − 1; `rope`: the layer's RoPE kind where a family has several
        (Gemma 3: local for sliding layers, global otherwise)."""
        key = (hidden.shape[1], hidden.dtype, hidden.device, rope)
        if key not in self._tables:
            positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
            self.rotary.to(hidden.device)  # its inverse frequencies, where the layer runs
            self._tables[key] = self.rotary(hidden, positions) if rope is None else self.rotary(hidden, positions, rope)
        return self._tables[key]

    @torch.no_grad()
    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.run(layer, hidden)

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output under the caller's grad mode (the Fisher stage backpropagates through it)."""
        positions = torch.arange(hidden.shape[1], device=hidden.device)[None]
        with torch.no_grad():
            tables = self.position_embeddings(hidden, self.arch.rope_kind(self.config, layer.self_attn.layer_idx))
        return layer(hidden, attention_mask=self.mask(layer, hidden), position_ids=positions,
                     position_embeddings=tables)

    def mask(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor | None:
        """The layer's attention mask for this sequence length (None: SDPA's own causal rule), made once
        per (length, window, dtype) like the RoPE tables: every chunk of every layer asks for it."""
        length = hidden.shape[1]
        window = self.arch.sliding_window(self.config, layer.self_attn.layer_idx)
        window = window if window and length > window else None
        eager = self.config._attn_implementation == "eager"
        if not (eager or window):
            return None
        key = ("mask", length, window, hidden.dtype if eager else None, hidden.device)
        if key not in self._tables:
            allowed = causal_mask(length, window, hidden.device)
            self._tables[key] = additive(allowed, hidden.dtype) if eager else allowed
        return self._tables[key]
