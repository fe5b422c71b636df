"""A KV cache of latents in transformers' cache interface (Palu): one `LatentLayer` per decoder layer.

A layer keeps, per token, the key latents and the value latents of every head group (r numbers per
group, all groups side by side: (batch, tokens, Σr)), never K or V. With `bits` < 16 the tokens older
than the newest `residual` are kept as packed b-bit codes with a float16 minimum and step per
`group` numbers (kernels/latent_quant.py); the newest `residual` tokens stay in the model dtype.

`update` returns what attention reads: every cached token's latents, dequantised. What a query reads
is what a decode step at its position reads: token j is quantised for query t exactly when t − j ≥
`residual` (the window holds the newest `residual` tokens, the query's own included). A decode step
reads `update`'s result; a pass over several new tokens (a prefill, a one-pass perplexity) reads both
copies from `append_views` and its attention picks per (query, token) (modules/latent_kv.py), so a
one-pass perplexity equals token-by-token decoding at any residual.

A transformers `DynamicCache` made by `generate` gets its layers swapped for LatentLayers by the
attention module on first use (`latent_layer`), so `model.generate` needs no extra argument;
`LatentCache(num_layers, cache_config)` builds one explicitly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from rankfold.kernels.latent_quant import (
    QuantizedLatents,
    check_quantization,
    concat,
    dequantize,
    quantize,
)


@dataclass(frozen=True)
class LatentCacheConfig:
    """bits: 16 keeps latents in the model dtype; 1..8 quantises (per token, asymmetric RTN) in groups
    of `group` numbers; `residual`: the newest tokens kept unquantised; `window`: a sliding-window
    layer's window W — between forwards only the newest W − 1 tokens are held (no later query can
    attend an older one), as transformers' sliding cache layer does; None: every token."""

    bits: int = 16
    group: int = 32
    residual: int = 0
    window: int | None = None

    def __post_init__(self) -> None:
        if self.bits != 16:
            check_quantization(self.bits, self.group)
        if self.residual < 0:
            raise ValueError(f"residual must be ≥ 0 tokens, got {self.residual}")

    @property
    def quantized(self) -> bool:
        return self.bits != 16


class LatentLayer(CacheLayerMixin):
    """One decoder layer's latent cache. `keys` / `values` hold the unquantised tokens (batch, t, Σr);
    `quantized_keys` / `quantized_values` the older ones (QuantizedLatents), when quantising."""

    is_croppable = False

    def __init__(self, config: LatentCacheConfig = LatentCacheConfig()):
        super().__init__()
        self.config = config
        self.quantized_keys: QuantizedLatents | None = None
        self.quantized_values: QuantizedLatents | None = None
        self.length = 0   # tokens seen
        self.dropped = 0  # the oldest of them, no longer held (a sliding window's)

    @property
    def is_sliding(self) -> bool:
        """transformers sizes a sliding-window mask by the first sliding layer's get_mask_sizes."""
        return self.config.window is not None

    def _trim(self) -> None:
        """Before new tokens arrive: hold only the newest window − 1 (quantised ones leave first)."""
        window = self.config.window
        if window is None or not self.is_initialized:
            return
        excess = (self.length - self.dropped) - (window - 1)
        if excess <= 0:
            return
        quantised = self.length - self.dropped - self.keys.shape[1]
        from_codes, from_window = min(excess, quantised), max(0, excess - quantised)
        if from_codes == quantised and quantised:
            self.quantized_keys = self.quantized_values = None
        elif from_codes:
            self.quantized_keys = self.quantized_keys.map(lambda t: t[:, from_codes:])
            self.quantized_values = self.quantized_values.map(lambda t: t[:, from_codes:])
        if from_window:
            self.keys, self.values = self.keys[:, from_window:], self.values[:, from_window:]
        self.dropped += excess

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.keys, self.values = key_states[:, :0], value_states[:, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """Append (batch, t, Σr_k) key and (batch, t, Σr_v) value latents; returns all cached latents."""
        self.append(key_states, value_states)
        return self.read_keys(), self.read_values()

    def append(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Store new latents; tokens leaving the unquantised window are quantised, tokens leaving a
        sliding window dropped."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._trim()
        self.length += key_states.shape[1]
        self.keys = torch.cat([self.keys, key_states], dim=1)
        self.values = torch.cat([self.values, value_states], dim=1)
        spill = self.keys.shape[1] - self.config.residual
        if self.config.quantized and spill > 0:  # the oldest unquantised tokens leave the window
            self.quantized_keys = self._append(self.quantized_keys, self.keys[:, :spill])
            self.quantized_values = self._append(self.quantized_values, self.values[:, :spill])
            self.keys, self.values = self.keys[:, spill:], self.values[:, spill:]

    def append_views(self, key_states: torch.Tensor, value_states: torch.Tensor
                     ) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
        """`append`, returning every cached token's latents twice — ((keys, values) as read once quantised,
        (keys, values) unquantised where the window still held them): the two copies a pass over several
        new tokens picks from per query. Quantisation is per token, so a token's quantised copy is the
        one it gets when it leaves the window later."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._trim()
        held = (self.quantized_keys, self.quantized_values)
        recent = (torch.cat([self.keys, key_states], dim=1), torch.cat([self.values, value_states], dim=1))
        self.append(key_states, value_states)
        full = tuple(self._read(store, latents) for store, latents in zip(held, recent))
        quantised = tuple(self._read(store, self._roundtrip(latents)) for store, latents in zip(held, recent))
        return quantised, full

    def _roundtrip(self, latents: torch.Tensor) -> torch.Tensor:
        if not self.config.quantized or latents.shape[1] == 0:
            return latents
        return dequantize(quantize(latents, self.config.bits, self.config.group), self.dtype)

    def read_keys(self) -> torch.Tensor:
        return self._read(self.quantized_keys, self.keys)

    def read_values(self) -> torch.Tensor:
        return self._read(self.quantized_values, self.values)

    def key_parts(self) -> list[torch.Tensor | QuantizedLatents]:
        """The stored key latents as they are held, oldest first: quantised codes, then the window."""
        return ([self.quantized_keys] if self.quantized_keys is not None else []) + \
            ([self.keys] if self.keys.shape[1] else [])

    def _append(self, store: QuantizedLatents | None, latents: torch.Tensor) -> QuantizedLatents:
        new = quantize(latents, self.config.bits, self.config.group)
        return new if store is None else concat([store, new], dim=1)

    def _read(self, store: QuantizedLatents | None, recent: torch.Tensor) -> torch.Tensor:
        return recent if store is None else torch.cat([dequantize(store, self.dtype), recent], dim=1)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """(keys the next forward of `query_length` tokens attends, cumulative index of the first)."""
        held = self.length if self.config.window is None else min(self.length, self.config.window - 1)
        return held + query_length, self.length - held

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    @property
    def nbytes(self) -> int:
        """Bytes the layer holds: latents, codes, minimums and steps."""
        if not self.is_initialized:
            return 0
        parts = [self.keys, self.values]
        total = sum(t.numel() * t.element_size() for t in parts)
        return total + sum(q.nbytes for q in (self.quantized_keys, self.quantized_values) if q is not None)

    def _map(self, fn) -> None:
        if not self.is_initialized:
            return
        self.keys, self.values = fn(self.keys), fn(self.values)
        if self.quantized_keys is not None:
            self.quantized_keys = self.quantized_keys.map(fn)
            self.quantized_values = self.quantized_values.map(fn)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        self._map(lambda t: t.to(self.device, non_blocking=True))

    def reset(self) -> None:
        self.keys = self.values = None
        self.quantized_keys = self.quantized_values = None
        self.length, self.dropped, self.is_initialized = 0, 0, False


class LatentCache(Cache):
    """A cache whose every layer is a LatentLayer (for `generate(past_key_values=...)` or a forward's `cache`)."""

    def __init__(self, num_layers: int, config: LatentCacheConfig = LatentCacheConfig()):
        super().__init__(layers=[LatentLayer(config) for _ in range(num_layers)])

    @property
    def nbytes(self) -> int:
        return cache_nbytes(self)


def latent_layer(cache: Cache, layer_idx: int, config: LatentCacheConfig) -> LatentLayer:
    """Layer `layer_idx` of any transformers Cache as a LatentLayer: an empty layer of another kind (a
    DynamicCache made by `generate`) is replaced; one already holding K/V is an error."""
    layers = cache.layers
    while len(layers) <= layer_idx:  # a cache that creates its layers lazily
        layers.append(LatentLayer(config))
    layer = layers[layer_idx]
    if isinstance(layer, LatentLayer):
        return layer
    if getattr(layer, "is_initialized", False) and layer.get_seq_length() > 0:
        raise ValueError(f"cache layer {layer_idx} ({type(layer).__name__}) already holds keys and values; a "
                         "latent-KV model needs an empty cache or a LatentCache")
    layers[layer_idx] = LatentLayer(config)
    return layers[layer_idx]


def cache_nbytes(cache: Cache) -> int:
    """Bytes held by every layer of a cache: latent layers count codes and scales, others K and V."""
    total = 0
    for layer in cache.layers:
        if isinstance(layer, LatentLayer):
            total += layer.nbytes
        else:
            total += sum(t.numel() * t.element_size() for t in _tensors(layer))
    return total


def _tensors(layer) -> list[torch.Tensor]:
    """Every tensor a non-latent cache layer holds (dynamic, or transformers' quantised layers)."""
    found = []
    for value in vars(layer).values():
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, (tuple, list)):
            found += [v for v in value if isinstance(v, torch.Tensor)]
        elif hasattr(value, "__dict__") and not isinstance(value, (torch.device, torch.dtype)):
            found += [v for v in vars(value).values() if isinstance(v, torch.Tensor)]
    return found
