"""One decoder layer as a runnable module: built from a state dict, run on a batch of hidden states."""

from __future__ import annotations

import copy

import torch
from torch import nn
from transformers import PretrainedConfig

from rankfold.models.architecture import Architecture
from rankfold.modules.layout import CompressedModule, apply_layout
from rankfold.modules.sparse import dense_products


def runtime_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy that runs attention through SDPA: with no mask it is causal, so a layer runs standalone."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    return config


def materialize_layer(arch: Architecture, config: PretrainedConfig, index: int, state: dict[str, torch.Tensor],
                      dtype: torch.dtype, layout: list[CompressedModule] | None = None) -> nn.Module:
    """Layer `index` holding exactly `state`; `layout` names the linears stored as low-rank modules."""
    layer = arch.build_layer(config, index)
    if layout:
        apply_layout(layer, layout, dtype=dtype)
    state = {key: value.to(dtype) if value.is_floating_point() else value for key, value in state.items()}
    missing, unexpected = layer.load_state_dict(state, strict=False, assign=True)
    if missing or unexpected:
        raise ValueError(f"layer {index}: state does not fit the architecture "
                         f"(missing {sorted(missing)}, unexpected {sorted(unexpected)})")
    dense_products(layer)  # one layer at a time: a dense W̃ costs little and beats the CSR product
    return layer.eval()


def embed(tokens: torch.Tensor, embedding: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(batch, seq) token ids -> (batch, seq, hidden) input of layer 0."""
    return torch.nn.functional.embedding(tokens, embedding).to(dtype)


def sliding_mask(length: int, window: int) -> torch.Tensor:
    """(1, 1, length, length) bool, True where query i attends key j: i − window < j ≤ i (transformers'
    sliding-window rule, a window of `window` tokens including the query's own)."""
    i, j = torch.arange(length)[:, None], torch.arange(length)[None]
    return ((j <= i) & (i - j < window))[None, None]


class LayerRunner:
    """Runs decoder layers on (batch, seq, hidden) inputs; caches RoPE tables per sequence length. Full
    causal attention is SDPA's own (no mask); a sliding-window layer (the architecture says which) gets
    its window as a mask once the sequence is longer than it."""

    def __init__(self, arch: Architecture, config: PretrainedConfig):
        self.arch, self.config = arch, config
        self.rotary = arch.build_rotary(config)
        self._tables: dict[tuple[int, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    def position_embeddings(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        key = (hidden.shape[1], hidden.dtype)
        if key not in self._tables:
            positions = torch.arange(hidden.shape[1])[None]
            self._tables[key] = self.rotary(hidden, positions)
        return self._tables[key]

    @torch.no_grad()
    def __call__(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return self.run(layer, hidden)

    def run(self, layer: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        """The layer's output under the caller's grad mode (the Fisher stage backpropagates through it)."""
        positions = torch.arange(hidden.shape[1])[None]
        with torch.no_grad():
            tables = self.position_embeddings(hidden)
        window = self.arch.sliding_window(self.config, layer.self_attn.layer_idx)
        mask = sliding_mask(hidden.shape[1], window) if window and hidden.shape[1] > window else None
        return layer(hidden, attention_mask=mask, position_ids=positions, position_embeddings=tables)
