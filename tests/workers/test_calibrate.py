"""Input statistics: the blocked Gram equals x xᵀ, and shards reduce by addition."""

from __future__ import annotations

import pytest
import torch

from rankfold.workers.layer_statistics import InputStats, sum_stats


@pytest.mark.parametrize("n", [100, 576, 1000])
def test_blocked_gram_equals_full_product(n):
    gen = torch.Generator().manual_seed(n)
    chunks = [torch.randn(2, 37, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    stats = InputStats.zeros(n)
    for chunk in chunks:
        stats.add_(chunk)
    x = torch.cat([c.reshape(-1, n) for c in chunks])
    tensors = stats.to_tensors("g")
    torch.testing.assert_close(tensors["g.gram"], x.T @ x, rtol=1e-12, atol=1e-10)
    assert torch.equal(tensors["g.gram"], tensors["g.gram"].T)
    torch.testing.assert_close(tensors["g.abs_sum"], x.abs().sum(0))
    assert int(tensors["g.count"][0]) == x.shape[0]


def test_shard_statistics_add_up():
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(90, 300, generator=gen, dtype=torch.float64)
    whole, first, second = InputStats.zeros(300), InputStats.zeros(300), InputStats.zeros(300)
    whole.add_(x)
    first.add_(x[:40])
    second.add_(x[40:])
    total = sum_stats([first.to_tensors("g"), second.to_tensors("g")])
    for name, value in whole.to_tensors("g").items():
        torch.testing.assert_close(total[name], value, rtol=1e-12, atol=1e-10)
    with pytest.raises(ValueError, match="different groups"):
        sum_stats([first.to_tensors("g"), second.to_tensors("h")])
