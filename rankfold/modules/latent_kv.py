"""Palu's attention (arXiv:2407.21118): a decoder layer's self-attention whose cache holds latents.

Per head group k (g KV heads of head_dim d; rank r_k):
    key latent    h_k = R_k x              (k_down, all groups in one linear)
    keys          K_k = RoPE(L_k h_k + b)  rebuilt from the cache at every step — RoPE depends on the
                                           position, so L_k cannot be folded into the query
    value latent  u_k = Q_k x              (v_down)
    output        o_h = (p_h · u_k) L_v,h  for each query head h of the group: the attention weights act
                                           on the latents; L_v (d × r_k per head) is applied after
Folding rule for values: when o_proj is a dense linear and Σ_h r_(group of h) ≤ H·d (the folded
o_proj is no larger than the original), L_v is folded into o_proj offline, o_proj′ = [W_o,h L_v,h]_h,
and the value bias into its bias; otherwise L_v is applied per head after the weighted sum (r·d per
head and token — V is never rebuilt over the cached tokens either way).

Keys of cached token j sit at position j + (p − past) with p the first new token's position and past
the cached length: positions are contiguous in a sequence, so the cache needs no position record
(left padding shifts p per row; pad keys are masked).

The family's attention is honoured as transformers' own class runs it (read from that module when the
latent attention replaces it): its score scaling (Gemma's query_pre_attn_scalar, Granite's
attention_multiplier), its logit soft cap (Gemma 2: cap · tanh(s / cap) before the mask, eager), its
q_norm / k_norm (per head: Qwen3, Gemma 3; over the whole projection: OLMo 2 — a key is rebuilt from its
latent, normalised, then rotated), its RoPE tables (Gemma 3's local and global; Phi-3's partial rotary).
A sliding-window layer's window comes in the mask the model (or the streamed runner) passes; between
forwards its cache holds only the newest W − 1 tokens' latents (the layout's `window`), and the held
tokens' positions start after the dropped ones (LatentLayer.dropped).

Attention runs through torch's SDPA with the model's mask (boolean or additive); without a mask it is
causal; with a soft cap the scores are computed explicitly (SDPA has none). The cache is a LatentLayer
(modules/latent_cache.py); without one (a plain forward, the streamed perplexity), the layer uses a
fresh LatentLayer, so its numbers are the cache's.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rankfold.kernels import choose_backend
from rankfold.modules.latent_cache import LatentCacheConfig, LatentLayer, latent_layer
from rankfold.modules.layout import ModuleKind, register_module_kind


def head_dim(config) -> int:
    """Width of one attention head: the config's head_dim, else hidden_size / num_attention_heads."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


@dataclass(frozen=True)
class LatentKVShape:
    """Head layout and ranks of one layer's latent KV: ranks per head group, k then v."""

    num_heads: int
    num_kv_heads: int
    head_dim: int
    group_heads: int
    key_ranks: tuple[int, ...]
    value_ranks: tuple[int, ...]
    fold_values: bool

    @property
    def groups(self) -> int:
        return self.num_kv_heads // self.group_heads

    @property
    def heads_per_group(self) -> int:
        """Query heads reading one group."""
        return self.num_heads // self.groups

    def folded_width(self) -> int:
        """o_proj's input width with L_v folded in: Σ over query heads of their group's rank."""
        return self.heads_per_group * sum(self.value_ranks)

    @classmethod
    def from_options(cls, config, options: dict) -> LatentKVShape:
        return cls(config.num_attention_heads, config.num_key_value_heads, head_dim(config),
                   int(options["group_heads"]), tuple(options["key_ranks"]), tuple(options["value_ranks"]), bool(options["fold_values"]))


def fold_allowed(shape: LatentKVShape, o_proj: nn.Module) -> bool:
    """The folding rule (module docstring): a dense o_proj that does not grow."""
    return isinstance(o_proj, nn.Linear) and shape.folded_width() <= shape.num_heads * shape.head_dim


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


@dataclass(frozen=True)
class AttentionTraits:
    """What a family's attention does besides Llama's, read from its transformers module: the score
    scaling, the logit soft cap (or None), and its rotary embedding class (the tables of cached keys'
    positions come from it, called with the layer's type where the family has several)."""

    scaling: float
    softcap: float | None
    rotary: type
    layer_type: str | None

    @classmethod
    def of(cls, attention: nn.Module, head_dim: int) -> AttentionTraits:
        module = sys.modules[type(attention).__module__]
        family = type(attention).__name__.removesuffix("Attention")
        rotary = getattr(module, f"{family}RotaryEmbedding", None)
        if rotary is None:
            from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding as rotary
        types = getattr(attention.config, "layer_types", None)
        takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
        return cls(float(getattr(attention, "scaling", head_dim ** -0.5)),
                   getattr(attention, "attn_logit_softcapping", None) or None, rotary,
                   types[attention.layer_idx] if takes_type and types else None)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on (batch, heads, seq, d) with (batch, seq, r) tables, r ≤ d: the first r dimensions rotate
    (rotate-half convention), the rest pass (Phi-3's partial rotary)."""
    cos, sin, r = cos[:, None], sin[:, None], cos.shape[-1]
    if r == x.shape[-1]:
        return x * cos + rotate_half(x) * sin
    rotated, passed = x[..., :r], x[..., r:]
    return torch.cat([rotated * cos + rotate_half(rotated) * sin, passed], dim=-1)


class LatentKVAttention(nn.Module):
    """Drop-in for a Llama-style attention (same forward signature), q_proj and o_proj kept (dense
    or compressed by the weight method; o_proj folded per the rule). Parameters: k_down (Σr_k, n),
    k_up.{k} (g·d, r_k), v_down (Σr_v, n), v_up.{k} (g·d, r_v) unless folded; k_bias / v_bias
    (num_kv_heads·d) when the model has q/k/v biases (a folded v_bias lives in o_proj's bias); q_norm /
    k_norm when the family has them (added by replace_attention with the other modules it keeps)."""

    def __init__(self, config, layer_idx: int, shape: LatentKVShape, q_proj: nn.Module, o_proj: nn.Module,
                 bias: bool, cache_config: LatentCacheConfig, dtype: torch.dtype, device, traits: AttentionTraits):
        super().__init__()
        self.config, self.layer_idx, self.shape, self.cache_config = config, layer_idx, shape, cache_config
        self.traits = traits
        self.head_dim, self.scaling = shape.head_dim, traits.scaling
        hidden, width = config.hidden_size, shape.group_heads * shape.head_dim
        self.q_proj, self.o_proj = q_proj, o_proj
        kw = {"dtype": dtype, "device": device}
        self.k_down = nn.Linear(hidden, sum(shape.key_ranks), bias=False, **kw)
        self.k_up = nn.ParameterList([nn.Parameter(torch.empty(width, r, **kw)) for r in shape.key_ranks])
        self.v_down = nn.Linear(hidden, sum(shape.value_ranks), bias=False, **kw)
        if not shape.fold_values:
            self.v_up = nn.ParameterList([nn.Parameter(torch.empty(width, r, **kw)) for r in shape.value_ranks])
        self.k_bias = nn.Parameter(torch.empty(shape.num_kv_heads * shape.head_dim, **kw)) if bias else None
        self.v_bias = nn.Parameter(torch.empty(shape.num_kv_heads * shape.head_dim, **kw)) \
            if bias and not shape.fold_values else None
        self._rope = None  # built on first use (the model may be built on the meta device)

    def projection_factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
        """{"k_proj": (B, A, bias), "v_proj": (B, A, bias)}: the dense K and V projections this attention
        computes, as B A x + bias with A = the down projection (Σr, n) and B = the groups' up projections
        block-diagonal (num_kv_heads·d, Σr). ValueError when L_v is folded into o_proj (the values then
        have no projection of their own)."""
        if self.shape.fold_values:
            raise ValueError("values are folded into o_proj (o_proj′ = W_o L_v): there is no dense v_proj to write")
        return {"k_proj": (torch.block_diag(*self.k_up), self.k_down.weight, self.k_bias),
                "v_proj": (torch.block_diag(*self.v_up), self.v_down.weight, self.v_bias)}

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._rope is None:
            object.__setattr__(self, "_rope", self.traits.rotary(self.config).to(x.device))
        if self.traits.layer_type is None:
            return self._rope(x, positions)
        return self._rope(x, positions, self.traits.layer_type)

    def _norm(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """(batch, S, heads, d) through the family's q_norm / k_norm, if any: per head, or over the whole
        projection (OLMo 2: the norm's width is heads·d)."""
        norm = getattr(self, name, None)
        if norm is None:
            return x
        if norm.weight.numel() == x.shape[-1]:
            return norm(x)
        return norm(x.flatten(-2)).view(x.shape)

    def _kernel_applies(self) -> bool:
        """The fused decode kernel rebuilds and rotates keys itself: plain RoPE over the whole head, no
        key norm, no soft cap."""
        rope = self._rotary_module(self.k_down.weight)
        return (self.traits.softcap is None and getattr(self, "k_norm", None) is None and hasattr(rope, "inv_freq")
                and rope.inv_freq.numel() * 2 == self.head_dim)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                attention_mask: torch.Tensor | None = None, cache=None, position_ids: torch.Tensor | None = None,
                **kwargs) -> tuple[torch.Tensor, None]:
        batch, length, _ = hidden_states.shape
        cos, sin = position_embeddings
        query = self._norm("q_norm", self.q_proj(hidden_states).view(batch, length, -1, self.head_dim))
        query = apply_rope(query.transpose(1, 2), cos, sin)
        layer = latent_layer(cache, self.layer_idx, self.cache_config) if cache is not None \
            else LatentLayer(self.cache_config)
        past = layer.get_seq_length()
        first = position_ids[:, :1] if position_ids is not None else torch.full((batch, 1), past)
        offsets = first.to(query.device).expand(batch, 1)[:, 0] - past  # position of cache index 0, per row
        config = layer.config
        if length > 1 and config.quantized and config.residual > 0:  # each query reads what its decode step would
            return self.o_proj(self._attend_per_query_window(query, hidden_states, cos, sin, layer, past, offsets,
                                                             attention_mask)), None
        layer.append(self.k_down(hidden_states), self.v_down(hidden_states))
        offsets = offsets + layer.dropped  # position of the first token held (a sliding window drops old ones)
        if length == 1 and past > 0 and choose_backend(query) == "triton" and self._kernel_applies():
            return self.o_proj(self._decode_with_kernel(query, layer, offsets, attention_mask)), None
        keys = self._rotated_keys(layer.read_keys(), cos, sin, past, offsets)
        heads = self._attend(query, keys, layer.read_values(), attention_mask)
        return self.o_proj(heads), None

    def _rotated_keys(self, latents: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, past: int,
                      offsets: torch.Tensor) -> torch.Tensor:
        """Keys (batch, num_kv_heads, S, d) of the S cached tokens' latents, RoPE at their positions."""
        keys = self._keys(latents)
        if past == 0:
            key_cos, key_sin = cos, sin
        else:
            positions = torch.arange(keys.shape[2], device=keys.device)[None] + offsets[:, None]
            key_cos, key_sin = self._rotary(keys, positions.clamp_min(0))
        return apply_rope(keys, key_cos, key_sin)

    def _attend_per_query_window(self, query: torch.Tensor, hidden_states: torch.Tensor, cos: torch.Tensor,
                                 sin: torch.Tensor, layer: LatentLayer, past: int, offsets: torch.Tensor,
                                 mask: torch.Tensor | None) -> torch.Tensor:
        """Attention over [quantised copies | unquantised copies] of the cached tokens, the mask letting
        query t read token j's quantised copy exactly when (past + t) − j ≥ residual (latent_cache.py)."""
        (key_q, value_q), (key_f, value_f) = layer.append_views(self.k_down(hidden_states), self.v_down(hidden_states))
        offsets, held_past = offsets + layer.dropped, past - layer.dropped  # the held tokens only
        keys = torch.cat([self._rotated_keys(key_q, cos, sin, past, offsets),
                          self._rotated_keys(key_f, cos, sin, past, offsets)], dim=2)
        both = _window_mask(mask, query.shape[2], key_q.shape[1], held_past, layer.config.residual, query.device)
        return self._attend(query, keys, torch.cat([value_q, value_f], dim=1), both)

    def _decode_with_kernel(self, query: torch.Tensor, layer: LatentLayer, offsets: torch.Tensor,
                            mask: torch.Tensor | None) -> torch.Tensor:
        """One decode step with scores from the fused kernel (kernels/latent_scores.py): keys are rebuilt
        and rotated tile by tile from the stored latents (codes dequantised on load), never materialised."""
        from rankfold.kernels.latent_scores import latent_key_scores

        shape, rope = self.shape, self._rotary_module(query)
        up, ranks, starts = self._kernel_factors()
        scores, start = [], 0
        for part in layer.key_parts():
            scores.append(latent_key_scores(query[:, :, 0], part, up, ranks, starts, shape.group_heads,
                                            offsets + start, rope.inv_freq, self.scaling, self.k_bias,
                                            float(rope.attention_scaling), backend="triton"))
            start += scores[-1].shape[-1]
        scores = torch.cat(scores, dim=-1)[:, :, None]  # (B, H, 1, S)
        if mask is not None:
            mask = mask[..., :scores.shape[-1]]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        probs = torch.softmax(scores.float(), dim=-1).to(query.dtype)
        outputs = []
        for k, latents in enumerate(layer.read_values().split(list(shape.value_ranks), dim=-1)):
            heads = slice(k * shape.heads_per_group, (k + 1) * shape.heads_per_group)
            outputs.append(self._values_out(probs[:, heads] @ latents[:, None], k))
        return torch.cat(outputs, dim=-1)

    def _rotary_module(self, x: torch.Tensor):
        self._rotary(x, torch.zeros(1, 1, dtype=torch.long, device=x.device))
        return self._rope

    def _kernel_factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """k_up as the kernel reads it: (num_kv_heads·d, max rank), each group's rows zero-padded; ranks, starts."""
        if getattr(self, "_kernel_cache", None) is None:
            width = max(self.shape.key_ranks)
            up = torch.cat([F.pad(u.detach(), (0, width - u.shape[1])) for u in self.k_up])
            ranks = torch.tensor(self.shape.key_ranks, device=up.device)
            starts = torch.cumsum(ranks, 0) - ranks
            object.__setattr__(self, "_kernel_cache", (up, ranks, starts))
        return self._kernel_cache

    def _keys(self, latents: torch.Tensor) -> torch.Tensor:
        """(batch, S, Σr_k) latents -> (batch, num_kv_heads, S, d) keys before RoPE."""
        parts = [h @ up.T for h, up in zip(latents.split(list(self.shape.key_ranks), dim=-1), self.k_up)]
        keys = torch.cat(parts, dim=-1)
        if self.k_bias is not None:
            keys = keys + self.k_bias
        return self._norm("k_norm", keys.view(*keys.shape[:2], -1, self.head_dim)).transpose(1, 2)

    def _attend(self, query: torch.Tensor, keys: torch.Tensor, value_latents: torch.Tensor,
                mask: torch.Tensor | None) -> torch.Tensor:
        """Per group: SDPA of its query heads on its keys with the value latents as values; returns
        (batch, T, o_proj's input width)."""
        shape, length = self.shape, query.shape[2]
        causal, mask = _mask(mask, length, keys.shape[2], query.device)
        rep = shape.num_heads // shape.num_kv_heads
        outputs = []
        for k, latents in enumerate(value_latents.split(list(shape.value_ranks), dim=-1)):
            heads = slice(k * shape.heads_per_group, (k + 1) * shape.heads_per_group)
            group_keys = keys[:, k * shape.group_heads:(k + 1) * shape.group_heads].repeat_interleave(rep, dim=1)
            values = latents[:, None].expand(-1, shape.heads_per_group, -1, -1)
            if self.traits.softcap is None:
                out = F.scaled_dot_product_attention(query[:, heads], group_keys, values, attn_mask=mask,
                                                     is_causal=causal, scale=self.scaling)  # (B, h, T, r)
            else:
                out = _softcapped_attention(query[:, heads], group_keys, values, mask, self.scaling,
                                            self.traits.softcap)
            outputs.append(self._values_out(out, k))
        return torch.cat(outputs, dim=-1)

    def _values_out(self, out: torch.Tensor, k: int) -> torch.Tensor:
        """Group k's attention-weighted value latents (B, h, T, r) -> its part of o_proj's input (B, T, ·):
        as they are when L_v is folded into o_proj, else through L_v (and the value bias) per head."""
        shape, (batch, _, length, _) = self.shape, out.shape
        rep = shape.num_heads // shape.num_kv_heads
        if not shape.fold_values:
            up = self.v_up[k].view(shape.group_heads, self.head_dim, -1).repeat_interleave(rep, dim=0)
            out = torch.einsum("bhtr,hdr->bhtd", out, up)
            if self.v_bias is not None:
                bias = self.v_bias.view(-1, self.head_dim)[k * shape.group_heads:(k + 1) * shape.group_heads]
                out = out + bias.repeat_interleave(rep, dim=0)[None, :, None]
        return out.transpose(1, 2).reshape(batch, length, -1)


def _softcapped_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None,
                          scaling: float, softcap: float) -> torch.Tensor:
    """Gemma 2's eager attention: scores · scaling, cap · tanh(scores / cap), then the mask (bool, additive,
    or None: causal, bottom-right aligned), softmax in float32. (B, h, T, d) x (B, h, S, d) -> (B, h, T, r)."""
    scores = query @ keys.transpose(-1, -2) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is None:
        length, total = scores.shape[-2:]
        mask = torch.arange(length, device=scores.device)[:, None] + (total - length) >= \
            torch.arange(total, device=scores.device)[None]
    scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(query.dtype) @ values


def _mask(mask: torch.Tensor | None, length: int, keys: int, device) -> tuple[bool, torch.Tensor | None]:
    """(is_causal, attn_mask) for SDPA: the model's mask as given; none: causal, bottom-right aligned."""
    if mask is not None:
        return False, mask[..., :keys]
    if length == 1:
        return False, None
    if length == keys:
        return True, None
    rows = torch.arange(length, device=device)[:, None] + (keys - length)
    return False, rows >= torch.arange(keys, device=device)[None]


def _window_mask(mask: torch.Tensor | None, length: int, keys: int, past: int, residual: int,
                 device) -> torch.Tensor:
    """The mask over [quantised | unquantised] copies of `keys` cached tokens for `length` queries at
    cache indices past … past + length − 1: the model's mask (or causal) on both halves, token j read
    quantised by query t when (past + t) − j ≥ `residual`, unquantised otherwise."""
    _, base = _mask(mask, length, keys, device)
    if base is None:  # causal, bottom-right aligned
        base = torch.arange(length, device=device)[:, None] + (keys - length) >= torch.arange(keys, device=device)[None]
    age = torch.arange(length, device=device)[:, None] + past - torch.arange(keys, device=device)[None]
    old = age >= residual
    if base.dtype == torch.bool:
        return torch.cat([base & old, base & ~old], dim=-1)
    blocked = torch.finfo(base.dtype).min
    return torch.cat([base.masked_fill(~old, blocked), base.masked_fill(old, blocked)], dim=-1)


Factor = tuple[torch.Tensor, torch.Tensor]  # (up (g·d, r), down (r, n)) of one head group


def latent_kv_state(shape: LatentKVShape, keys: list[Factor], values: list[Factor], k_bias: torch.Tensor | None,
                    v_bias: torch.Tensor | None, o_weight: torch.Tensor | None = None,
                    o_bias: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The attention's tensors (names relative to it) from the groups' factors; with `shape.fold_values`,
    L_v and the value bias go into o_proj (`o_weight` (hidden, H·d) dense, `o_bias` or None)."""
    state = {"k_down.weight": torch.cat([down for _, down in keys]),
             "v_down.weight": torch.cat([down for _, down in values])}
    state.update({f"k_up.{k}": up for k, (up, _) in enumerate(keys)})
    if k_bias is not None:
        state["k_bias"] = k_bias
    if not shape.fold_values:
        state.update({f"v_up.{k}": up for k, (up, _) in enumerate(values)})
        if v_bias is not None:
            state["v_bias"] = v_bias
        return state
    if o_weight is None:
        raise ValueError("folding values into o_proj needs its dense weight")
    state["o_proj.weight"], bias = fold_values(shape, [up for up, _ in values], o_weight, v_bias)
    if o_bias is not None or bias is not None:
        state["o_proj.bias"] = (o_bias if o_bias is not None else 0) + (bias if bias is not None else 0)
    return state


def fold_values(shape: LatentKVShape, ups: list[torch.Tensor], o_weight: torch.Tensor,
                v_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """o_proj′ = [W_o,h L_v,h] over query heads h (hidden, Σ_h r), and Σ_h W_o,h b_v,h (or None)."""
    d, rep = shape.head_dim, shape.num_heads // shape.num_kv_heads
    columns, bias = [], None
    for h in range(shape.num_heads):
        kv = h // rep
        k, j = divmod(kv, shape.group_heads)
        block = o_weight[:, h * d:(h + 1) * d]
        columns.append(block @ ups[k][j * d:(j + 1) * d])
        if v_bias is not None:
            term = block @ v_bias[kv * d:(kv + 1) * d]
            bias = term if bias is None else bias + term
    return torch.cat(columns, dim=1), bias


def replace_attention(root: nn.Module, path: str, options: dict, dtype: torch.dtype | None = None) -> None:
    """Swap the Llama-style attention at `path` for an empty LatentKVAttention described by `options`
    (the layout's JSON: group_heads, key_ranks, value_ranks, fold_values, bits, group, residual); its
    q_proj and o_proj (whatever the weight method made them) are kept, o_proj resized when folded, and
    so are the other modules registered on it (a skip layout's shared projections)."""
    parent_path, _, name = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    dense = getattr(parent, name)
    shape = LatentKVShape.from_options(dense.config, options)
    q_proj, kv_bias = _query_projection(dense, shape)
    weight = (dense.k_proj if hasattr(dense, "k_proj") else dense.qkv_proj).weight  # still dense: its dtype, device
    dtype = dtype or weight.dtype
    o_proj = dense.o_proj
    if shape.fold_values:
        if not fold_allowed(shape, o_proj):
            raise ValueError(f"{path}: values cannot be folded into a {type(o_proj).__name__} o_proj of "
                             f"{shape.num_heads * shape.head_dim} inputs (folded width {shape.folded_width()})")
        o_proj = nn.Linear(shape.folded_width(), o_proj.out_features, bias=_has_bias(options, o_proj),
                           dtype=dtype, device=weight.device)
    cache = LatentCacheConfig(int(options.get("bits", 16)), int(options.get("group", 32)),
                              int(options.get("residual", 0)), options.get("window"))
    latent = LatentKVAttention(dense.config, dense.layer_idx, shape, q_proj, o_proj, kv_bias, cache, dtype,
                               weight.device, AttentionTraits.of(dense, shape.head_dim))
    for child, module in dense.named_children():  # e.g. a skip layout's q_proj_in / o_proj_in projections
        if child not in ("q_proj", "k_proj", "v_proj", "qkv_proj", "o_proj"):
            latent.add_module(child, module)
    setattr(parent, name, latent)


def _query_projection(dense: nn.Module, shape: LatentKVShape) -> tuple[nn.Module, bool]:
    """(the query projection the latent attention keeps, whether k/v carry biases). A fused qkv_proj
    (Phi-3) gives an empty dense q_proj of its query rows (its tensors come from layer_kv_tensors)."""
    if hasattr(dense, "q_proj"):
        return dense.q_proj, dense.k_proj.bias is not None
    fused = dense.qkv_proj
    if not isinstance(fused, nn.Linear):
        raise ValueError(f"a latent KV cache splits a dense qkv_proj; this one is a {type(fused).__name__} "
                         "(leave qkv_proj out of target.matrices)")
    q_proj = nn.Linear(fused.in_features, shape.num_heads * shape.head_dim, bias=fused.bias is not None,
                       dtype=fused.weight.dtype, device=fused.weight.device)
    return q_proj, fused.bias is not None


def _has_bias(options: dict, o_proj: nn.Linear) -> bool:
    return o_proj.bias is not None or bool(options.get("value_bias", False))


# kind 'latent_kv': the attention at `shared_path` keeps a latent KV cache; `members` are its k_proj and
# v_proj, `options` its per-group ranks and cache settings. Built last: it takes over whatever q_proj and
# o_proj became; its tensors (biases included) come from its KV method's factors.
register_module_kind(ModuleKind(
    "latent_kv", build=lambda root, module, dtype: replace_attention(root, module.shared_path, module.options, dtype),
    params=None, linear=False, build_last=True, keeps_biases=False))
