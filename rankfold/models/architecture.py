"""Architecture adapters: what a decoder layer is made of, read by `config.model_type`.

Methods and stages never match module names themselves: they ask the adapter which linears read the
same input (one calibration statistic, one whitening factor per group), how to build one layer (with
transformers' own class for the family: no re-implemented attention or MLP), and what a latent KV
cache must honour. Each family is one file in `models/architectures/` with one
`register_architecture(...)` call; `architecture_for` refuses any other model_type, naming the known.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
from torch import nn
from transformers import PretrainedConfig

from rankfold.core.registry import Registry
from rankfold.modules.experts import split_fused_experts, unfuse_all_experts
from rankfold.modules.transformers_hook import PREFIX, register_compressed


@dataclass(frozen=True)
class LinearGroup:
    """Linears that read the same input tensor, e.g. q/k/v. `members` are paths inside one layer."""

    name: str
    members: tuple[str, ...]


# A mixture's expert e's gate/up is input group "mlp_in_<e>"; all experts' gate/up of one layer as one
# group (target.experts: shared) is EXPERTS_UNION, whose statistic is the sum of theirs (InputStats.from_tensors)
EXPERT_INPUT = re.compile(r"mlp_in_\d+")
EXPERTS_UNION = "mlp_in_experts"

ATTENTION_OUTPUT = "attn_out"  # the input group of attention's output projection, in every family

# The Llama layout every dense decoder of this kind shares (Llama, Mistral, Qwen2/3, ...).
LLAMA_GROUPS = (
    LinearGroup("attn_in", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    LinearGroup(ATTENTION_OUTPUT, ("self_attn.o_proj",)),
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
    """What follows the last decoder layer: final norm, head, and the family's logit scaling (Granite:
    logits / logits_scaling) and soft-capping (Gemma 2: cap · tanh(logits / cap)), as transformers'
    model applies them. (…, hidden) -> (…, vocab) float32 logits."""

    def __init__(self, norm: nn.Module, head: torch.Tensor, softcap: float | None, divisor: float | None = None):
        super().__init__()
        self.norm, self.head, self.softcap, self.divisor = norm, head, softcap, divisor

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = nn.functional.linear(self.norm(hidden), self.head)
        logits = (logits if self.divisor is None else logits / self.divisor).float()
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
    # rope_kind(config, layer index): which of the rotary embedding's tables the layer uses, for families
    # with several (Gemma 3: its layer type); None: the one table
    rope_kind: Callable[[PretrainedConfig, int], str | None] = _no_sliding
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
    # logit_divisor(config): what the final logits are divided by (Granite: logits_scaling), or None
    logit_divisor: Callable[[PretrainedConfig], float | None] = _none
    # Fused projections: {fused name: the projection names it holds, in row order}, e.g. Phi-3's
    # {"qkv_proj": ("q_proj", "k_proj", "v_proj")}; a spec may name the parts (all of them) or the fused one.
    fused: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # fused_rows(config): {fused name: each part's row count, in order}; for_config binds it to fused_sizes,
    # so a part's weight (Palu's k_proj inside Phi-3's qkv_proj) is located as rows of the fused one
    fused_rows: Callable[[PretrainedConfig], dict[str, tuple[int, ...]]] | None = None
    fused_sizes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    # Mixture of experts: the path of each layer's fused experts module (e.g. "mlp.experts"), and
    # num_experts(config). Each expert's gate/up (one input group) and down become linears of their
    # own (modules/experts.py); the router stays dense.
    experts: str | None = None
    num_experts: Callable[[PretrainedConfig], int] | None = None
    # GGUF files of this family read (gguf's tensor map, llama.cpp's q/k row permutation undone) and tested
    gguf: bool = False
    # Layer keys as checkpoints store them -> as the built layer names them, "{e}" an expert's index
    # (Mixtral on disk: "block_sparse_moe.experts.{e}.w1" is "mlp.experts.{e}.gate_proj").
    stored_names: dict[str, str] = field(default_factory=dict)
    # The layer's module whose input is the residual stream after attention (the anchored walk's output
    # correction of o_proj fits the dense residual there); whether o_proj's output reaches it unchanged
    # (not behind a post-norm or a scaled residual) is checked when the walk runs. None: no such module.
    attention_residual: str | None = "post_attention_layernorm"

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
        members = [m for g in self.groups for m in g.members]
        known = list(dict.fromkeys(m.rsplit(".", 1)[-1] for m in members))  # in order, once per name
        missing = sorted(wanted - set(known))
        if missing:
            raise KeyError(f"{self.model_type} has no projection named {missing[0]!r} (it has: {', '.join(known)})")
        return [m for m in members if m.rsplit(".", 1)[-1] in wanted]

    def part_rows(self, path: str) -> tuple[str, slice]:
        """Where the projection at layer path `path` (e.g. "self_attn.k_proj") lives: (its own path, all rows),
        or (the fused projection's path, its rows there) — Phi-3's k_proj is rows H·d … H·d + kv·d of qkv_proj."""
        parent, _, name = path.rpartition(".")
        for fused, parts in self.fused.items():
            if name in parts and fused in self.fused_sizes:
                sizes, index = self.fused_sizes[fused], parts.index(name)
                start = sum(sizes[:index])
                return f"{parent}.{fused}" if parent else fused, slice(start, start + sizes[index])
        return path, slice(None)

    def _class(self, suffix: str) -> type:
        module, prefix = self.classes
        return getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), prefix + suffix)

    def for_config(self, config: PretrainedConfig) -> "Architecture":
        """This family as one model has it: fused projections' row sizes bound, a mixture of experts gets an
        input group per expert."""
        if self.fused_rows is not None and not self.fused_sizes:
            return replace(self, fused_sizes=self.fused_rows(config)).for_config(config)
        if self.experts is None:
            return self
        dense = tuple(g for g in self.groups if not g.name.startswith("mlp"))  # a shared expert stays
        experts = tuple(group for e in range(self.num_experts(config)) for group in (
            LinearGroup(f"mlp_in_{e}", (f"{self.experts}.{e}.gate_proj", f"{self.experts}.{e}.up_proj")),
            LinearGroup(f"mlp_out_{e}", (f"{self.experts}.{e}.down_proj",))))
        return replace(self, groups=dense + experts)

    def plan_groups(self, experts: str | None = None) -> list[tuple[str, tuple[str, ...]]]:
        """(name, members) of the input groups a layout is planned over: the family's groups, or with
        `experts="shared"` every expert's gate/up in one group (EXPERTS_UNION) instead of one per expert.
        ValueError naming target.experts for a family without experts."""
        groups = [(group.name, group.members) for group in self.groups]
        if experts is None:
            return groups
        if self.experts is None:
            raise ValueError(f"target.experts: {self.model_type} has no mixture of experts to share a projection across")
        per_expert = [(name, members) for name, members in groups if EXPERT_INPUT.fullmatch(name)]
        union = (EXPERTS_UNION, tuple(m for _, members in per_expert for m in members))
        return [union if g == per_expert[0] else g for g in groups if g not in per_expert[1:]]

    def build_layer(self, config: PretrainedConfig, index: int) -> nn.Module:
        """An empty (meta-device) decoder layer; fill it with `load_state_dict(..., assign=True)`. A
        mixture of experts' fused experts are one linear per expert here (split_state's keys)."""
        with torch.device("meta"):
            layer = self._class("DecoderLayer")(config, layer_idx=index)
        self.prepare(layer)
        return layer

    def prepare(self, root: nn.Module) -> None:
        """Unfuse every experts module under `root` (a layer or a whole model) into LinearExperts."""
        if self.experts is not None:
            unfuse_all_experts(root, self.experts)

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
        return OutputHead(norm, head, self.logit_softcap(config), self.logit_divisor(config))

    def embed(self, tokens: torch.Tensor, table: torch.Tensor, config: PretrainedConfig,
              dtype: torch.dtype) -> torch.Tensor:
        """(batch, seq) token ids -> (batch, seq, hidden) input of layer 0, scaled as the family's model does."""
        hidden = nn.functional.embedding(tokens, table).to(dtype)
        scale = self.embed_scale(config)
        return hidden if scale is None else hidden * torch.tensor(scale, dtype=dtype)

    def split_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A layer's stored tensors (layer-relative keys) as build_layer's layer names them: stored names
        renamed, transformers 5's fused experts split per expert."""
        if self.experts is None and not self.stored_names:
            return state
        renamed = {self._ours(key): value for key, value in state.items()}
        return renamed if self.experts is None else split_fused_experts(renamed, self.experts)

    def locate(self, key: str, stored: Callable[[str], bool]) -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
        """Where the weight `key` (a layer path's key, as build_layer names it) is stored: (stored key,
        how to cut it from that tensor). `stored(k)`: whether the checkpoint holds k. KeyError if nowhere."""
        if stored(key):
            return key, lambda tensor: tensor
        for theirs, ours in self.stored_names.items():
            candidate = _renamed(key, ours, theirs)
            if candidate is not None and stored(candidate):
                return candidate, lambda tensor: tensor
        base = key.removesuffix(".weight").removesuffix(".bias")
        path, rows = self.part_rows(base)
        suffix = key[len(base):]
        if rows != slice(None) and stored(path + suffix):  # a part of a fused projection
            return path + suffix, lambda tensor: tensor[rows]
        if self.experts is not None:  # transformers 5's fused layout, or GGUF's stack per projection
            match = re.search(rf"{re.escape(self.experts)}\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", key)
            if match:
                e, name = int(match.group(1)), match.group(2)
                stacked = key[:match.start()] + f"{self.experts}.{name}.weight"  # (E, rows, cols)
                if stored(stacked):
                    return stacked, lambda tensor: tensor[e]
                fused = key[:match.start()] + f"{self.experts}.{'down_proj' if name == 'down_proj' else 'gate_up_proj'}"
                if stored(fused):
                    half = {"gate_proj": 0, "up_proj": 1}.get(name)
                    return fused, lambda tensor: tensor[e] if half is None else tensor[e].chunk(2, dim=0)[half]
        raise KeyError(f"{self.model_type}: no stored tensor for {key}")

    def _ours(self, key: str) -> str:
        for theirs, ours in self.stored_names.items():
            renamed = _renamed(key, theirs, ours)
            if renamed is not None:
                return renamed
        return key


def _renamed(key: str, source: str, target: str) -> str | None:
    """`key` with the stored_names entry `source` replaced by `target` (the expert index carried over),
    or None when `source` does not occur in it."""
    match = _pattern(source).search(key)
    return None if match is None else key[:match.start()] + target.format(**match.groupdict()) + key[match.end():]


@functools.lru_cache(maxsize=None)
def _pattern(name: str) -> re.Pattern:
    """A stored_names entry as a regex: dots literal, "{e}" an expert index, anchored at a key's start
    or after a dot (compiled once per entry: every tensor key of a layer passes through it)."""
    return re.compile(r"(?:^|(?<=\.))" + re.escape(name).replace(r"\{e\}", r"(?P<e>\d+)") + r"(?=\.|$)")


ARCHITECTURES: Registry[Architecture] = Registry("model_type")


def register_architecture(architecture: Architecture) -> Architecture:
    """Register the family, and its compressed model type (`rankfold_<model_type>`) with transformers."""
    register_compressed(architecture.model_type, prepare=architecture.prepare)
    return ARCHITECTURES.register(architecture.model_type, architecture)


def architecture_for(config: PretrainedConfig) -> Architecture:
    """The adapter of `config.model_type` (a compressed model's `rankfold_<type>`: its family's); ValueError
    naming the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if isinstance(model_type, str):
        model_type = model_type.removeprefix(PREFIX)
    if model_type not in ARCHITECTURES:
        raise ValueError(f"model_type {model_type!r} is not supported (supported: {', '.join(ARCHITECTURES.names())})")
    return ARCHITECTURES.get(model_type).for_config(config)


# Every family registers itself on import; its file imports the names above, so this comes last.
import rankfold.models.architectures  # noqa: E402, F401
