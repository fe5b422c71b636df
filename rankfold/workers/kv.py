"""Palu's per-layer work: G-LRD of one layer's k_proj and v_proj at full rank (the factors are nested,
so any rank is a prefix; methods/palu_cache.py cuts them at the searched ranks when assembling)."""

from __future__ import annotations

from dataclasses import dataclass

from rankfold.methods.palu import group_factors, group_spectra
from rankfold.methods.palu_cache import PROJECTIONS
from rankfold.methods.whitening import whitening_factor
from rankfold.storage.store import StoreRef, open_ref
from rankfold.workers.layer_statistics import read_group_stats
from rankfold.workers.shard import cached_source

KV_GROUP = "attn_in"       # the input group k_proj and v_proj read (its Gram whitens them)
GRAM_TRACE = "gram_trace"  # tr G of that input: FLRA's loss weight w = F / (rows · tr G)


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
    stats = read_group_stats(item.stats, item.stats_key, KV_GROUP)
    gram = stats.symmetric_gram()
    tensors = {GRAM_TRACE: gram.diagonal().sum().reshape(1)}
    factor = whitening_factor(gram)
    for kind, path in PROJECTIONS.items():
        weight = source.matrix(f"{item.layer_prefix}{path}.weight")
        spectra = group_spectra(weight, factor, item.head_dim, item.group_heads)
        full = [min(item.head_dim * item.group_heads, weight.shape[1])] * len(spectra)
        for k, f in enumerate(group_factors(weight, factor, item.head_dim, item.group_heads, full)):
            tensors[f"{kind}.{k}.up"], tensors[f"{kind}.{k}.down"] = f.up.float(), f.down.float()
            tensors[f"{kind}.{k}.energy"] = spectra[k]
    return item.out_key, out.put_tensors(item.out_key, tensors)


kv_factors_item.host_only = True  # Palu's factors, computed on the host: Ray gives its task no GPU
