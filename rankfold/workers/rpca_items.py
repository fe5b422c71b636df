"""CAP's stage `rpca`: the robust PCA units of one matrix, one task per matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankfold.methods.cap import CapOptions, history_metadata, rpca_units
from rankfold.methods.whitening import whitening_factor
from rankfold.storage.store import StoreRef, open_ref
from rankfold.workers.layer_statistics import read_group_stats
from rankfold.workers.shard import cached_source

SCORE_SUFFIX = "-scores"  # the small artifact beside each matrix's units: what the search's driver reads


@dataclass(frozen=True)
class RPCAItem:
    source: str
    options: CapOptions
    layer_prefix: str     # e.g. "model.layers.3."
    path: str             # the matrix inside the layer, e.g. "self_attn.q_proj"
    group: str            # the input group it reads (whose Gram scores its units)
    stats: StoreRef
    stats_key: str
    out: StoreRef
    units_key: str
    scores_key: str


def rpca_item(item: RPCAItem) -> list[tuple[str, str]]:
    """Units of one matrix into the store (skipped when both artifacts exist and verify);
    returns [(key, sha256)] of the units and their scores."""
    store, keys = open_ref(item.out), (item.units_key, item.scores_key)
    if all(store.verify(key) for key in keys):
        return [(key, store.checksum(key)) for key in keys]
    weight = cached_source(item.source).matrix(f"{item.layer_prefix}{item.path}.weight")
    stats = read_group_stats(item.stats, item.stats_key, item.group)
    gram = stats.symmetric_gram()
    whitening = whitening_factor(gram.clone()) if item.options.whiten else None
    units, history = rpca_units(item.options, weight, gram, stats.count, whitening)
    scores = {k: units.pop(k).float() for k in ("triple_score", "sparse_score")}
    scores["gram_trace"] = gram.diagonal().sum().reshape(1)  # tr G: the Fisher weight's denominator
    stored = {k: v.to(torch.int32) if k == "sparse_indices" else v.float() for k, v in units.items()}
    return [(item.units_key, store.put_tensors(item.units_key, stored, metadata=history_metadata(history))),
            (item.scores_key, store.put_tensors(item.scores_key, scores))]


rpca_item.host_only = True  # robust PCA, computed on the host: Ray gives its task no GPU
