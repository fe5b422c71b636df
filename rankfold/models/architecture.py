"""Architecture adapters: what a decoder layer is made of, read by `config.model_type`.

Methods and stages never match module names themselves: they ask the adapter which linears read the
same input (one calibration statistic, one whitening factor per group), how to build one layer (with
transformers' own class for the family: no re-implemented attention or MLP), and what a latent KV
cache must honour. Each family is one file in `models/architectures/` with one
`register_architecture(...)` call; `architecture_for` refuses any other model_type, naming the known.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from rankfold.core.registry import Registry
from rankfold.modules.transformers_hook import register_compressed


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input tensor, e.g. q/k/v. `members` are paths inside one layer."""

    name: str
    members: tuple[str, ...]


# The Llama layout every dense decoder of this kind shares (Llama, Mistral, Qwen2/3, ...).
LLAMA_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup("attn_out", ("self_attn.o_proj",)),
    LinearGroup("mlp_in", ("mlp.gate_proj", "mlp.up_proj")),
    LinearGroup("mlp_out", ("mlp.down_proj",)),
)


def _no_sliding(config: PretrainedConfig, index: int) -> int | None:
    return None


def _attention_bias(config: PretrainedConfig) -> bool:
    return bool(getattr(config, "attention_bias", False))


def _none(config: PretrainedConfig) -> None:
    return None


class OutputHead(nn.Module):
    """What follows the last decoder layer: final norm, head, and the family's logit soft-capping
    (Gemma 2: cap · tanh(logits / cap)). (…, hidden) -> (…, vocab) float32 logits."""

    def __init__(self, norm: nn.Module, head: torch.Tensor, softcap: float | None):
        super().__init__()
        self.norm, self.head, self.softcap = norm, head, softcap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(self.norm(hidden), self.head).float()
        return logits if self.softcap is None else torch.tanh(logits / self.softcap) * self.softcap


@dataclass(frozen=True)
class Architecture:
    """One family. `classes`: transformers' module and class-name prefix (e.g. ("qwen2", "Qwen2")), from
    which the decoder layer, RMSNorm and rotary embedding classes are taken."""

    model_type: str
    classes: tuple[str, str]
    groups: tuple[LinearGroup, ...] = LLAMA_GROUPS
    layer_prefix: str = "model.layers.{i}."  # format string with {i}: where layer i's tensors live
    embedding_key: str = "model.embed_tokens.weight"
    final_norm_key: str = "model.norm.weight"
    lm_head_key: str = "lm_head.weight"
    # sliding_window(config, layer index) -> the window in tokens, or None for full causal attention
    sliding_window: Callable[[PretrainedConfig, int], int | None] = _no_sliding
    # kv_bias(config): k_proj and v_proj carry biases (a latent KV cache keeps them)
    kv_bias: Callable[[PretrainedConfig], bool] = _attention_bias
    # Why a latent KV cache (Palu) cannot run on this family yet; None: it can.
    latent_kv_unsupported: str | None = None
    # transformers' attention implementation the layers run with: "sdpa" (causal without a mask), or
    # "eager" where sdpa would drop part of the family's attention (Gemma 2's logit soft-capping)
    attention: str = "sdpa"
    # embed_scale(config): the factor the family multiplies its embeddings by (Gemma: √hidden), or None
    embed_scale: Callable[[PretrainedConfig], float | None] = _none
    # logit_softcap(config): the final logits' soft cap (Gemma 2: final_logit_softcapping), or None
    logit_softcap: Callable[[PretrainedConfig], float | None] = _none
    # Fused projections: {fused name: the projection names it holds, in row order}, e.g. Phi-3's
    # {"qkv_proj": ("q_proj", "k_proj", "v_proj")}; a spec may name the parts (all of them) or the fused one.
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def projection_path(self, projection: str) -> str:
        """'q_proj' -> 'self_attn.q_proj' (the path inside a layer); KeyError naming the family's own."""
        for group in self.groups:
            for member in group.members:
                if member.rsplit(".", 1)[-1] == projection:
                    return member
        known = ", ".join(m.rsplit(".", 1)[-1] for g in self.groups for m in g.members)
        raise KeyError(f"{self.model_type} has no projection named {projection!r} (it has: {known})")

    def matrix_paths(self, projections: tuple[str, ...]) -> list[str]:
        """The layer paths of `projections` (a spec's target.matrices), in the family's group order: a
        fused projection stands for its parts, named all together or by its own name. KeyError naming
        the projection for one the family lacks, or for part of a fused projection named alone."""
        wanted = set(projections)
        for fused, parts in self.fused.items():
            named = wanted & set(parts)
            if named and named != set(parts):
                raise KeyError(f"{self.model_type} fuses {', '.join(parts)} into {fused}: name all of them "
                               f"(or {fused}), not {', '.join(sorted(named))} alone")
            if named:
                wanted = (wanted - named) | {fused}
        paths = {self.projection_path(p) for p in wanted}
        return [m for g in self.groups for m in g.members if m in paths]

    def _class(self, suffix: str) -> type:
        module, prefix = self.classes
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), prefix + suffix)

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        """An empty (meta-device) decoder layer; fill it with `load_state_dict(..., assign=True)`."""
        with torch.device("meta"):
            return self._class("DecoderLayer")(config, layer_idx=index)

    def rebuild_buffers(self, model: nn.Module, config: PretrainedConfig) -> None:
        """Recreate a meta-built model's non-persistent buffers (RoPE tables, a scaled embedding's
        factor) on the CPU; RuntimeError naming any the family's adapter does not know."""
        model.model.rotary_emb = self.build_rotary(config)
        scale = self.embed_scale(config)
        if scale is not None:
            model.model.embed_tokens.register_buffer("embed_scale", torch.tensor(scale), persistent=False)
        left = [name for name, buffer in model.named_buffers() if buffer.is_meta]
        if left:
            raise RuntimeError(f"{self.model_type}: buffers {left[:4]} were not rebuilt after loading")

    def build_final_norm(self, config: PretrainedConfig) -> nn.Module:
        return self._class("RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)

    def build_rotary(self, config: PretrainedConfig) -> nn.Module:
        return self._class("RotaryEmbedding")(config)

    def build_output_head(self, config: PretrainedConfig, norm_weight: torch.Tensor, head: torch.Tensor) -> OutputHead:
        """The final norm (holding `norm_weight`), the head matrix and the family's soft cap, without gradients."""
        norm = self.build_final_norm(config).requires_grad_(False)
        norm.weight.data = norm_weight
        return OutputHead(norm, head, self.logit_softcap(config))

    def embed(self, tokens: torch.Tensor, table: torch.Tensor, config: PretrainedConfig,
              dtype: torch.dtype) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, hidden) input of layer 0, scaled as the family's model does."""
        hidden = nn.functional.embedding(tokens, table).to(dtype)
        scale = self.embed_scale(config)
        return hidden if scale is None else hidden * torch.tensor(scale, dtype=dtype)


ARCHITECTURES: Registry[Architecture] = Registry("model_type")


def register_architecture(architecture: Architecture) -> Architecture:
    """Register the family, and its compressed model type (`rankfold_<model_type>`) with transformers."""
    register_compressed(architecture.model_type)
    return ARCHITECTURES.register(architecture.model_type, architecture)


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The adapter of `config.model_type`; ValueError naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES.names())})")
    return ARCHITECTURES.get(model_type)


# Every family registers itself on import; its file imports the names above, so this comes last.
import rankfold.models.architectures  # noqa: E402, F401
