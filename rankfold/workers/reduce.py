"""Shards' partial statistics summed where they are, not in the driver.

Each shard of a walk returns its partial sums of a layer's statistics (calibration's packed Grams: 4.1 GB of
float64 per shard and layer at Llama-3-70B's widths; the anchored walk's paired statistics, three n×n
per group). The executor hands the partials — never fetched by the driver — to one of the shards, in
turn, which adds them in shard order (the same order, hence the same bits, as a sum in the driver),
checks them and writes the sum to the artifact store; the driver receives the key's sha256 and a small
summary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import torch

from rankfold.core.errors import NumericalError
from rankfold.methods.statistics import InputStats
from rankfold.storage.store import ArtifactStore, StoreError, StoreRef, open_ref
from rankfold.workers.layer_statistics import sum_stats


@dataclass(frozen=True)
class ReduceItem:
    """Where one layer's summed statistics go, and how they are checked."""

    store: StoreRef
    key: str
    layer: int
    product_dtype: str | None = None  # calibration's Gram product dtype: the statistics are checked (named in errors)
    summary_key: str | None = None    # where the small result goes too, once the sum is stored (a resumed stage reads it)


def reduce_statistics(item: ReduceItem, partials: Iterable[dict[str, torch.Tensor]]) -> tuple[str, dict[str, int]]:
    """The partials (in shard order, handed over one at a time) summed and stored under `item.key`. Returns
    (sha256, the groups that saw fewer tokens than their width: {"layer.group": tokens}). With
    `item.product_dtype`, NumericalError when a Gram's diagonal or Σ|x| is not finite (nothing is stored
    then); ValueError when the partials hold different statistics."""
    tensors = sum_stats(partials)
    if item.product_dtype is not None:
        check_statistics(item.layer, tensors, item.product_dtype)
    store = open_ref(item.store)
    sha, few = store.put_tensors(item.key, tensors), few_tokens(item.layer, tensors)
    if item.summary_key is not None:  # written last: its presence says the layer's sum is whole
        version = store.version(item.key)
        store.put_json(item.summary_key, {"sha256": sha, "version": version and version[1], "few_tokens": few})
    return sha, few


def stored_result(store: ArtifactStore, item: ReduceItem) -> tuple[str, dict[str, int]] | None:
    """The (sha256, few tokens) `reduce_statistics` returned for `item` in an earlier, interrupted run of
    the same stage: its summary written, and the statistics still the bytes it names — the recorded
    sha256 and version token unchanged, or, where the token moved, the bytes hashed again (as the
    manifest decides a stage is done). None when the layer must be reduced again."""
    if item.summary_key is None or not store.exists(item.summary_key):
        return None
    try:
        summary = store.get_json(item.summary_key)
        sha, few = summary["sha256"], {str(k): int(v) for k, v in summary["few_tokens"].items()}
    except (StoreError, ValueError, KeyError, TypeError, AttributeError):  # damaged: reduce the layer again
        return None
    return (sha, few) if store.unchanged(item.key, sha, summary.get("version")) is not None else None


def few_tokens(layer: int, tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """{"layer.group": tokens} of the groups whose token count is below their input width (calibration's
    statistics, packed or full, and the anchored walk's paired ones)."""
    out = {}
    for group in (name.removesuffix(".count") for name in tensors if name.endswith(".count")):
        width = tensors.get(f"{group}.abs_sum", tensors.get(f"{group}.gram"))
        count = int(tensors[f"{group}.count"][0])
        if width is not None and count < width.shape[0]:
            out[f"{layer}.{group}"] = count
    return out


def check_statistics(layer: int, tensors: dict[str, torch.Tensor], product_dtype: str) -> None:
    """Σ|x| and the Gram's diagonal bound every entry (|G_ij| ≤ √(G_ii G_jj)): cheap to check."""
    for name, value in tensors.items():
        if name.endswith(".abs_sum"):
            group = name.removesuffix(".abs_sum")
            diagonal = InputStats.from_tensors(tensors, group).diagonal() if f"{group}.count" in tensors else None
            for checked, what in ((value, name), (diagonal, f"{group}'s Gram")):
                if checked is not None and not bool(torch.isfinite(checked).all()):
                    raise NumericalError(f"layer {layer}: calibration statistic {what} is not finite (products "
                                         f"in calibration.gram_product_dtype {product_dtype}); try float64 "
                                         "products or model.dtype bfloat16 / float32")


def summed(_item: object, partials: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The partials added in shard order and returned, not stored: for small per-step sums (the anchored
    refinement's gradients, one layer's factors' size) the driver needs at once."""
    return sum_stats(partials)
