"""Calibration stage (and the forward pass it shares with streamed evaluation): run one layer on its inputs, accumulate per-group input statistics in float64.

For every group of linears that read the same input (q/k/v; o; gate/up; down) the statistics are
the Gram matrix Σ x xᵀ, Σ|x| and the token count. They are sums, so shards reduce by addition.
"""

from __future__ import annotations

import time
from typing import Iterable

import torch
from safetensors import safe_open
from torch import nn

from rankfold.core.arrays import as_tensor
from rankfold.core.errors import NumericalError
from rankfold.methods import packed_gram
from rankfold.methods.statistics import InputStats
from rankfold.models.architecture import LinearGroup
from rankfold.storage.store import StoreRef, open_ref
from rankfold.workers.activations import Activations
from rankfold.workers.layers import LayerRunner


def propagate_layer(layer: nn.Module, runner: LayerRunner, inputs: Activations, outputs: Activations | None,
                    groups: tuple[LinearGroup, ...] = (), product_dtype: torch.dtype = torch.float64,
                    where: str = "layer", gram_seconds: dict[str, float] | None = None) -> dict[str, InputStats]:
    """Run the layer on every chunk of `inputs`, appending to `outputs` (None: last layer of
    calibration, nothing downstream); returns the input statistics of each group in `groups`.
    `gram_seconds`: when given, each group's time in its statistics updates is added to it (profiling:
    the rest of the call is the forward). Raises NumericalError (naming `where`) when an output is not finite."""
    stats: dict[str, InputStats] = {}
    handles = []
    for group in groups:
        reader = layer.get_submodule(group.members[0])  # all members see this same tensor
        device = next(reader.parameters()).device  # the layer's: the Gram is summed where x is
        stats[group.name] = InputStats.zeros(reader.in_features, device)  # an expert no token reaches keeps zeros

        def hook(_module, args, name=group.name):
            x = args[0]
            timed = gram_seconds is not None
            if timed and x.is_cuda:  # time the products, not their launch (profiling only)
                torch.cuda.synchronize(x.device)
            started = time.perf_counter()
            stats[name].add_(x, product_dtype)
            if timed:
                if x.is_cuda:
                    torch.cuda.synchronize(x.device)
                gram_seconds[name] = gram_seconds.get(name, 0.0) + time.perf_counter() - started

        handles.append(reader.register_forward_pre_hook(hook))
    try:
        for chunk in inputs:
            hidden = runner(layer, chunk)
            check_finite(hidden, where)
            if outputs is not None:
                outputs.append(hidden)
    finally:
        for handle in handles:
            handle.remove()
    return stats


def read_group_stats(store: StoreRef, key: str, group: str) -> InputStats:
    """One input group's statistics from a layer's stored ones, reading only that group's tensors; a
    packed Gram is unpacked straight from the file a row block at a time (the task holds the n×n Gram,
    not the packed copy beside it). The union of a mixture's experts (EXPERTS_UNION) sums the experts'
    packed Grams one at a time, in `InputStats.from_tensors`' order (the same bits), and stays packed.
    ValueError when a packed Gram's length does not match its width."""
    with open_ref(store).open_file(key) as path, safe_open(path, framework="pt") as handle:
        names = list(filter(InputStats.names_of(group), handle.keys()))
        parts = sorted({name.rsplit(".", 1)[0] for name in names})
        if parts and parts != [group]:
            total = None
            for part in parts:
                stats = InputStats.from_tensors({name: handle.get_tensor(name) for name in names
                                                 if name.rsplit(".", 1)[0] == part}, part)
                total = stats if total is None else InputStats.sum([total, stats])
            return total
        tensors = dict(_read_unpacked(handle, key, name) for name in names)
    return InputStats.from_tensors(tensors, group)


def _read_unpacked(handle, key: str, name: str) -> tuple[str, torch.Tensor]:
    """(name, tensor) of one stored statistic; a packed Gram as (GROUP.gram, the full matrix)."""
    if not name.endswith(".gram_upper"):
        return name, handle.get_tensor(name)
    width = handle.get_slice(name.replace(".gram_upper", ".abs_sum")).get_shape()[0]
    piece = handle.get_slice(name)
    if piece.get_shape() != [packed_gram.packed_size(width)]:
        raise ValueError(f"{key}: {name} holds {piece.get_shape()} entries, a packed {width}×{width} "
                         f"Gram {packed_gram.packed_size(width)}")
    return name.removesuffix("_upper"), packed_gram.unpack_from(lambda start, stop: piece[start:stop], width)


def check_finite(hidden: torch.Tensor, where: str) -> None:
    if not bool(torch.isfinite(hidden).all()):
        raise NumericalError(f"{where}: the layer's output has non-finite values ({hidden.dtype} overflowed); "
                             "run with model.dtype bfloat16 or float32")


def sum_stats(partials: Iterable[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Statistics tensors (or NumPy arrays: core/arrays.py) of several shards of the same layer, added in
    the given (shard) order into one running copy: the sum and one partial in memory when they are handed
    over one at a time (workers/reduce.py). ValueError when the partials hold different statistics, or
    none are given."""
    total: dict[str, torch.Tensor] | None = None
    for partial in partials:
        partial = {name: as_tensor(value) for name, value in partial.items()}  # NumPy from the object store
        if total is None:  # a copy: a partial read from Ray's object store may be read-only
            total = {name: value.clone() for name, value in partial.items()}
        elif partial.keys() != total.keys():
            raise ValueError("shards returned statistics of different groups")
        else:
            for name in partial:
                total[name].add_(partial[name])
        del partial  # not held while the next one is fetched (4.1 GB a shard at Llama-3-70B's widths)
    if total is None:
        raise ValueError("no partial statistics to sum")
    return total
