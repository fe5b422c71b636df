"""Architecture adapters: what a decoder layer is made of, read by `config.model_type`.

Methods and stages never match module names themselves: they ask the adapter which linears read the
same input (one calibration statistic, one whitening factor per group) and how to build one layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input tensor, e.g. q/k/v. `members` are paths inside one layer."""

    name: str
    members: tuple[str, ...]


@dataclass(frozen=True)
class Architecture:
    model_type: str
    groups: tuple[LinearGroup, ...]
    layer_prefix: str  # format string with {i}: where layer i's tensors live in a checkpoint
    embedding_key: str
    final_norm_key: str
    lm_head_key: str

    def projection_path(self, projection: str) -> str:
        """'q_proj' -> 'self_attn.q_proj' (the path inside a layer)."""
        for group in self.groups:
            for member in group.members:
                if member.rsplit(".", 1)[-1] == projection:
                    return member
        raise KeyError(f"{self.model_type} has no projection named {projection!r}")

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        """An empty (meta-device) decoder layer; fill it with `load_state_dict(..., assign=True)`."""
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer

        with torch.device("meta"):
            return LlamaDecoderLayer(config, layer_idx=index)

    def rebuild_buffers(self, model: nn.Module, config: PretrainedConfig) -> None:
        """Recreate a meta-built model's non-persistent buffers (RoPE tables) on the CPU."""
        model.model.rotary_emb = self.build_rotary(config)

    def build_final_norm(self, config: PretrainedConfig) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm

        return LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def build_rotary(self, config: PretrainedConfig) -> nn.Module:
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

        return LlamaRotaryEmbedding(config)


_LLAMA = Architecture(
    model_type="llama",
    groups=(
        LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        LinearGroup("attn_out", ("self_attn.o_proj",)),
        LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
        LinearGroup("mlp_out", ("mlp.down_proj",)),
    ),
    layer_prefix="model.layers.{i}.",
    embedding_key="model.embed_tokens.weight",
    final_norm_key="model.norm.weight",
    lm_head_key="lm_head.weight",
)

_ARCHITECTURES: dict[str, Architecture] = {"llama": _LLAMA}


def architecture_for(config: PretrainedConfig) -> Architecture:
    model_type = getattr(config, "model_type", None)
    try:
        return _ARCHITECTURES[model_type]
    except KeyError:
        raise ValueError(
            f"model_type {model_type!r} is not supported (supported: {', '.join(sorted(_ARCHITECTURES))})"
        ) from None
