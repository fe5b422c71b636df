"""Input statistics: the blocked Gram equals x xᵀ, packed or full, and shards reduce by addition."""

from __future__ import annotations

import pytest
import torch

from rankfold.methods import packed_gram
from rankfold.workers.layer_statistics import InputStats, sum_stats


@pytest.mark.parametrize("n", [1, 100, 576, 1000])
def test_blocked_gram_equals_full_product(n):
    gen = torch.Generator().manual_seed(n)
    chunks = [torch.randn(2, 37, n, generator=gen, dtype=torch.float64) for _ in range(3)]
    stats = InputStats.zeros(n)
    for chunk in chunks:
        stats.add_(chunk)
    x = torch.cat([c.reshape(-1, n) for c in chunks])
    tensors = stats.to_tensors("g")
    assert set(tensors) == {"g.gram_upper", "g.abs_sum", "g.count"}
    assert tensors["g.gram_upper"].numel() == packed_gram.packed_size(n)
    assert n < 576 or packed_gram.packed_size(n) < 0.75 * n * n  # one block (n ≤ 256) is the whole Gram
    torch.testing.assert_close(stats.diagonal(), (x * x).sum(0), rtol=1e-12, atol=1e-10)
    gram = InputStats.from_tensors(tensors, "g").gram
    torch.testing.assert_close(gram, x.T @ x, rtol=1e-12, atol=1e-10)
    assert torch.equal(gram, gram.T)
    torch.testing.assert_close(tensors["g.abs_sum"], x.abs().sum(0))
    assert int(tensors["g.count"][0]) == x.shape[0]


@pytest.mark.parametrize("n", [5, 257, 700])
def test_packing_round_trips_and_matches_a_full_accumulation(n):
    """unpack(pack(G)) = G for a symmetric G, and a packed accumulation unpacks to exactly the bits a full
    one (blocks into an n×n zero matrix, then mirrored) gives: checkpoints do not change."""
    gen = torch.Generator().manual_seed(n)
    a = torch.randn(n, n, generator=gen, dtype=torch.float64)
    symmetric = a + a.T
    assert torch.equal(packed_gram.unpack(packed_gram.pack(symmetric), n), symmetric)
    assert packed_gram.packed_size(n) == packed_gram.pack(symmetric).numel()
    x = torch.randn(50, n, generator=gen, dtype=torch.float32)
    packed = packed_gram.zeros(n)
    packed_gram.add_products_(packed, x)
    full = torch.zeros(n, n, dtype=torch.float64)
    for start, stop in packed_gram.row_blocks(n):
        full[start:stop, start:].add_(x[:, start:stop].T @ x[:, start:])
    from rankfold.methods.whitening import mirror_upper_

    assert torch.equal(packed_gram.unpack(packed, n), mirror_upper_(full))
    with pytest.raises(ValueError, match=f"packed {n + 1}×{n + 1} Gram"):
        packed_gram.unpack(packed, n + 1)


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
    summed = InputStats.sum([first, second])
    assert summed.upper is not None and torch.equal(summed.upper, total["g.gram_upper"])
    with pytest.raises(ValueError, match="different groups"):
        sum_stats([first.to_tensors("g"), second.to_tensors("h")])


def test_a_groups_statistics_are_read_alone(tmp_path):
    """A decomposition task reads its group's tensors of a layer's artifact, not every group's."""
    from rankfold.storage.store import LocalStore
    from rankfold.workers.layer_statistics import read_group_stats

    store = LocalStore(tmp_path)
    parts = {name: InputStats.zeros(n) for name, n in (("attn_in", 6), ("mlp_out", 300), ("mlp_in_0", 4),
                                                       ("mlp_in_1", 4))}
    for n, stats in enumerate(parts.values()):
        stats.add_(torch.randn(3, stats.width, generator=torch.Generator().manual_seed(n)))
    store.put_tensors("stats", {k: v for name, stats in parts.items() for k, v in stats.to_tensors(name).items()})
    for group in ("attn_in", "mlp_out"):  # one row block; two (unpacked from the file a block at a time)
        read = read_group_stats(store.ref(), "stats", group)
        assert torch.equal(read.gram, parts[group].gram) and read.count == 3
    union = read_group_stats(store.ref(), "stats", "mlp_in_experts")
    assert union.count == 6 and torch.equal(union.gram, parts["mlp_in_0"].gram + parts["mlp_in_1"].gram)


def test_summing_holds_one_partial_at_a_time():
    """The reduce fetches partials one at a time (Ray's object store): the previous one is dropped before
    the next arrives, so a reducing shard holds the sum and one partial, not two."""
    import weakref

    alive = []

    def partials():
        for k in range(3):
            assert not any(ref() is not None for ref in alive), f"partial {k - 1} still held when {k} is fetched"
            tensor = torch.full((4,), float(k))
            alive.append(weakref.ref(tensor))
            yield {"g.abs_sum": tensor}
            del tensor

    assert torch.equal(sum_stats(partials())["g.abs_sum"], torch.full((4,), 3.0))


def test_a_packed_gram_of_the_wrong_length_is_named(tmp_path):
    from rankfold.storage.store import LocalStore
    from rankfold.workers.layer_statistics import read_group_stats

    store = LocalStore(tmp_path)
    tensors = InputStats.zeros(300).to_tensors("mlp_out")
    tensors["mlp_out.gram_upper"] = tensors["mlp_out.gram_upper"][:-1]
    store.put_tensors("stats", tensors)
    with pytest.raises(ValueError, match="mlp_out.gram_upper holds"):
        read_group_stats(store.ref(), "stats", "mlp_out")


def test_statistics_stored_before_packing_still_load(tmp_path):
    """Stores written before the Grams were packed hold GROUP.gram (full): tasks read them as they were."""
    from rankfold.storage.store import LocalStore
    from rankfold.workers.layer_statistics import read_group_stats

    x = torch.randn(20, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    store = LocalStore(tmp_path)
    store.put_tensors("stats", {k: v for group in ("attn_in", "mlp_in_0", "mlp_in_1")
                                for k, v in InputStats(x.T @ x, x.abs().sum(0), 20).to_tensors(group).items()})
    assert "attn_in.gram" in store.get_tensors("stats")
    gram = InputStats(x.T @ x, x.abs().sum(0), 20).symmetric_gram()  # as stored: exactly symmetric
    assert torch.equal(read_group_stats(store.ref(), "stats", "attn_in").gram, gram)
    assert torch.equal(read_group_stats(store.ref(), "stats", "mlp_in_experts").gram, 2 * gram)


def test_a_packed_gram_that_is_not_finite_is_named():
    from rankfold.core.errors import NumericalError
    from rankfold.workers.reduce import check_statistics

    stats = InputStats.zeros(300)
    stats.add_(torch.randn(4, 300, generator=torch.Generator().manual_seed(0)))
    tensors = stats.to_tensors("mlp_out")
    check_statistics(2, tensors, "float32")
    diagonal_entry = packed_gram.block_views(tensors["mlp_out.gram_upper"], 300)[1][1]  # the second row block
    diagonal_entry[0, 0] = float("inf")
    with pytest.raises(NumericalError, match="layer 2: calibration statistic mlp_out's Gram is not finite"):
        check_statistics(2, tensors, "float32")
