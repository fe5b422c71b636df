"""Palu's per-layer work: G-LRD of one layer's k_proj and v_proj at full rank (the factors are nested,
so any rank is a prefix), and at assembly the latent attention's tensors at the allocated ranks."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankfold.methods.palu import GroupFactors, group_factors, group_spectra, rotate
from rankfold.methods.statistics import InputStats
from rankfold.methods.whitening import whitening_factor
from rankfold.modules.latent_kv import LatentKVShape, latent_kv_state
from rankfold.storage.store import StoreRef, open_ref
from rankfold.workers.shard import cached_source

KV_GROUP = "attn_in"       # the input group k_proj and v_proj read (its Gram whitens them)
GRAM_TRACE = "gram_trace"  # tr G of that input: FLRA's loss weight w = F / (rows · tr G)
PROJECTIONS = {"k": "self_attn.k_proj", "v": "self_attn.v_proj"}


@dataclass(frozen=True)
class KVFactorsItem:
    source: str
    layer_prefix: str
    head_dim: int
    group_heads: int
    stats: StoreRef
    stats_key: str
    out: StoreRef
    out_key: str


def kv_factors_item(item: KVFactorsItem) -> tuple[str, str]:
    """Full-rank whitened factors (float32) and spectra σ² (float64) of every head group of one layer's
    k and v into the store: `{k|v}.{group}.up|down|energy`, plus the input Gram's trace."""
    out = open_ref(item.out)
    sha = out.checksum(item.out_key)
    if sha is not None and out.actual_checksum(item.out_key) == sha:
        return item.out_key, sha
    source = cached_source(item.source)
    stats = InputStats.from_tensors(open_ref(item.stats).get_tensors(item.stats_key), KV_GROUP)
    gram = stats.symmetric_gram()
    tensors = {GRAM_TRACE: gram.diagonal().sum().reshape(1)}
    factor = whitening_factor(gram)
    for kind, path in PROJECTIONS.items():
        weight = source.tensor(f"{item.layer_prefix}{path}.weight")
        spectra = group_spectra(weight, factor, item.head_dim, item.group_heads)
        full = [min(item.head_dim * item.group_heads, weight.shape[1])] * len(spectra)
        for k, f in enumerate(group_factors(weight, factor, item.head_dim, item.group_heads, full)):
            tensors[f"{kind}.{k}.up"], tensors[f"{kind}.{k}.down"] = f.up.float(), f.down.float()
            tensors[f"{kind}.{k}.energy"] = spectra[k]
    return item.out_key, out.put_tensors(item.out_key, tensors)


def layer_kv_tensors(factors: dict[str, torch.Tensor], dense: dict[str, torch.Tensor], shape: LatentKVShape,
                     hadamard: bool) -> dict[str, torch.Tensor]:
    """One layer's latent attention tensors, paths inside the layer: prefixes of the stored full-rank
    factors at the layout's ranks, Hadamard-rotated when asked, values folded into the dense o_proj
    (`dense`: the layer's dense state) when the layout says so."""
    def cut(kind: str, ranks: tuple[int, ...]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        out = []
        for k, rank in enumerate(ranks):
            f = GroupFactors(factors[f"{kind}.{k}.up"][:, :rank].double(), factors[f"{kind}.{k}.down"][:rank].double())
            f = rotate(f) if hadamard else f
            out.append((f.up, f.down))
        return out

    def get(name: str) -> torch.Tensor | None:
        return None if name not in dense else dense[name].double()

    state = latent_kv_state(shape, cut("k", shape.key_ranks), cut("v", shape.value_ranks),
                            get("self_attn.k_proj.bias"), get("self_attn.v_proj.bias"),
                            get("self_attn.o_proj.weight") if shape.fold_values else None,
                            get("self_attn.o_proj.bias"))
    return {f"self_attn.{name}": value for name, value in state.items()}
