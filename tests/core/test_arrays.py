"""Partials travel as NumPy arrays on the tensors' memory and come back as tensors on theirs."""

from __future__ import annotations

import numpy as np
import torch

from rankfold.core.arrays import as_tensor, shareable
from rankfold.workers.layer_statistics import sum_stats


def test_shareable_keeps_the_memory_and_leaves_what_numpy_lacks():
    gram, count, weights = torch.arange(6, dtype=torch.float64), torch.tensor([3]), torch.ones(2, dtype=torch.bfloat16)
    out = shareable({"g.gram_upper": gram, "g.count": count, "w": weights, "n": (gram, 4)})
    assert isinstance(out["g.gram_upper"], np.ndarray) and np.shares_memory(out["g.gram_upper"], gram.numpy())
    assert isinstance(out["g.count"], np.ndarray) and out["w"] is weights and out["n"][1] == 4
    assert isinstance(out["n"], tuple) and isinstance(out["n"][0], np.ndarray)
    back = as_tensor(out["g.gram_upper"])
    assert isinstance(back, torch.Tensor) and back.data_ptr() == gram.data_ptr()


def test_read_only_partials_are_summed_into_a_copy():
    """What a reducing shard receives from Ray's object store: read-only arrays, never written."""
    first, second = np.arange(4.0), np.full(4, 10.0)
    for array in (first, second):
        array.setflags(write=False)
    total = sum_stats([{"g.abs_sum": first}, {"g.abs_sum": second}])
    assert torch.equal(total["g.abs_sum"], torch.tensor([10.0, 11.0, 12.0, 13.0], dtype=torch.float64))
    assert first.tolist() == [0.0, 1.0, 2.0, 3.0]
