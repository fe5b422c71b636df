"""Shards' partial statistics summed in a tree past `fan_in` shards (execution/streaming.py): the sum
in the tree's order, exactly, in-process and on Ray — where the driver never fetches a partial."""

from __future__ import annotations

import pytest
import torch

from rankfold.execution.local import LocalExecutor
from rankfold.execution.streaming import ShardGroup
from rankfold.workers.layer_statistics import sum_stats


def _partial_shard_class() -> type:
    """Defined in a function: Ray ships such a class by value (this test module is not importable on its
    workers)."""

    class PartialShard:
        """A stand-in shard: after `load(seed)` its partial is a float64 Gram-like tensor of that seed, at a
        scale that makes the order of additions show in the bits."""

        def __init__(self, config):
            self.partial = None

        def load(self, seed: int) -> int:
            generator = torch.Generator().manual_seed(seed)
            self.partial = {"g.gram": torch.randn(6, 6, dtype=torch.float64, generator=generator) * 10.0 ** (seed % 3),
                            "g.count": torch.tensor([seed + 1], dtype=torch.float64)}
            return seed

        def split(self, method: str, *args):
            return 0, getattr(self, method)(*args)

        def stats(self) -> dict[str, torch.Tensor]:
            return self.partial

        def apply(self, fn, *args):
            return fn(*args)

        def release(self) -> float:
            return 0.0

    return PartialShard


PartialShard = _partial_shard_class()


def _reduced(executor, parts: int, fan_in: int) -> dict[str, torch.Tensor]:
    group = ShardGroup(executor, "tree", None, parts, shard_class=PartialShard, fan_in=fan_in)
    try:
        group.call_each("load", [(k,) for k in range(parts)])
        summed = lambda item, partials: sum_stats(partials)  # noqa: E731  (by value to Ray's workers)
        return group.call_reduced("stats", reduce=summed, item=None, record=False)
    finally:
        group.release()


def _partials(parts: int) -> list[dict[str, torch.Tensor]]:
    shards = [PartialShard(None) for _ in range(parts)]
    return [shard.partial for k, shard in enumerate(shards) if shard.load(k) is not None]


def test_past_the_fan_in_partials_are_summed_in_the_trees_order():
    p = _partials(5)
    chain = sum_stats(p)
    tree = sum_stats([sum_stats([sum_stats(p[0:2]), sum_stats(p[2:4])]), p[4]])  # fan-in 2: 5 → 3 → 2 → 1
    assert not torch.equal(chain["g.gram"], tree["g.gram"])  # the order shows in the bits
    for fan_in, want in ((2, tree), (5, chain), (8, chain)):
        got = _reduced(LocalExecutor(workers=5), 5, fan_in)
        assert all(torch.equal(got[name], want[name]) for name in want), fan_in


@pytest.mark.parametrize("parts, fan_in", [(5, 2), (7, 3)])
def test_on_ray_the_tree_sums_where_the_partials_are(ray_cluster, monkeypatch, parts, fan_in):
    """Stand-in shards needing no CPU (the test cluster has 2): the same bits as in-process, and nothing
    the driver fetches holds a partial (only statuses and the final sum)."""
    import ray

    from rankfold.execution.ray import RayExecutor

    executor = RayExecutor(address=ray_cluster["address"], workers=parts, cpus_per_worker=0)
    fetched, get = [], ray.get

    def spying_get(refs, *args, **kwargs):
        values = get(refs, *args, **kwargs)
        fetched.append(values)
        return values

    monkeypatch.setattr(ray, "get", spying_get)
    try:
        got = _reduced(executor, parts, fan_in)
    finally:
        monkeypatch.setattr(ray, "get", get)
        executor.close()
    want = _reduced(LocalExecutor(workers=parts), parts, fan_in)
    assert all(torch.equal(got[name], want[name]) for name in want)
    held = [gram for value in fetched for gram in _grams(value)]
    assert len(held) == 1 and torch.equal(held[0], want["g.gram"])  # the final sum, the reduce's result


def _grams(value) -> list[torch.Tensor]:
    if isinstance(value, dict):
        return [value["g.gram"]] if "g.gram" in value else []
    if isinstance(value, (list, tuple)):
        return [gram for item in value for gram in _grams(item)]
    return []
