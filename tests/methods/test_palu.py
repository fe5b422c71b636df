"""Palu's math: G-LRD, the KV rank search, the Hadamard rotation; the latent quantiser's bound."""

from __future__ import annotations

import pytest
import torch

from rankfold.kernels.latent_quant import dequantize, pack_bits, quantize, unpack_bits
from rankfold.methods.palu import (
    RankUnit,
    check_group_heads,
    group_factors,
    group_spectra,
    hadamard,
    kv_budget,
    rotate,
    search_ranks,
    uniform_ranks,
)


def _whitening(n: int, seed: int = 0) -> torch.Tensor:
    x = torch.randn(n, 3 * n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x[0] *= 30  # an outlier channel: whitening matters
    return torch.linalg.cholesky(x @ x.T), x


@pytest.mark.parametrize("group_heads", [1, 3])
def test_glrd_at_full_rank_reproduces_k_exactly_and_truncation_error_is_the_spectrum_tail(group_heads):
    weight = torch.randn(3 * 16, 56, dtype=torch.float64)
    factor, x = _whitening(56)
    full = group_factors(weight, factor, 16, group_heads, [16 * group_heads] * (3 // group_heads))
    torch.testing.assert_close(torch.cat([f.up @ f.down for f in full]), weight)
    spectra = group_spectra(weight, factor, 16, group_heads)
    rank = 5
    cut = group_factors(weight, factor, 16, group_heads, [rank] * len(spectra))
    rows = weight.split(16 * group_heads)
    for f, w, s in zip(cut, rows, spectra):
        error = ((w - f.up @ f.down) @ x).square().sum()
        torch.testing.assert_close(error, s[rank:].sum(), rtol=1e-8, atol=1e-8)


def test_group_heads_must_divide_the_kv_heads():
    check_group_heads(3, 3)
    with pytest.raises(ValueError, match="allowed: 1, 3"):
        check_group_heads(2, 3)


def test_hadamard_is_orthonormal_and_rotation_keeps_the_product():
    h = hadamard(16)
    torch.testing.assert_close(h @ h.T, torch.eye(16, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard(12)
    weight = torch.randn(32, 40, dtype=torch.float64)
    factor, _ = _whitening(40)
    (f,) = group_factors(weight, factor, 16, 2, [24])  # 24 = 3 blocks of 8
    g = rotate(f)
    torch.testing.assert_close(g.up @ g.down, f.up @ f.down)
    assert not torch.allclose(g.down, f.down)


def _units(seed: int = 0) -> list[RankUnit]:
    gen = torch.Generator().manual_seed(seed)
    units = []
    for layer in range(4):
        for kind in ("k", "v"):
            for group in range(3):
                energy = torch.rand(64, generator=gen, dtype=torch.float64).sort(descending=True).values ** 4
                units.append(RankUnit((layer, kind, group), energy, float(torch.rand(1, generator=gen)) + 0.1))
    return units


@pytest.mark.parametrize("ratio,multiple", [(0.3, 8), (0.5, 8), (0.5, 16), (0.7, 4), (0.5, 24)])
def test_search_never_exceeds_the_budget_rounds_and_lands_within_one_chunk(ratio, multiple):
    units = _units()
    budget = kv_budget(sum(u.full for u in units), ratio)
    ranks = search_ranks(units, budget, multiple)
    assert sum(ranks.values()) <= budget
    assert all(r % multiple == 0 or r == 64 for r in ranks.values())
    assert budget - sum(ranks.values()) < multiple  # no further chunk fits
    assert all(r >= min(multiple, 64) for r in ranks.values())


def test_search_beats_uniform_on_the_weighted_loss_it_models():
    units = _units(1)
    budget = kv_budget(sum(u.full for u in units), 0.5)
    loss = lambda ranks: sum(u.weight * float(u.energy[ranks[u.key]:].sum()) for u in units)  # noqa: E731
    searched, uniform = search_ranks(units, budget, 8), uniform_ranks(units, budget, 8)
    assert budget - 8 < sum(uniform.values()) <= budget
    assert loss(searched) < loss(uniform)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.65])
def test_uniform_split_fills_the_same_budget_and_differs_by_at_most_one_chunk(ratio):
    units = _units()
    budget = kv_budget(sum(u.full for u in units), ratio)
    ranks = uniform_ranks(units, budget, 8)
    assert budget - 8 < sum(ranks.values()) <= budget
    assert max(ranks.values()) - min(ranks.values()) <= 8 and all(r % 8 == 0 for r in ranks.values())


def test_search_budget_below_one_chunk_each_is_an_error():
    with pytest.raises(ValueError, match="below one rank multiple"):
        search_ranks(_units(), 8 * 23, 8)


def test_bit_planes_round_trip_and_quantisation_error_is_within_half_a_step():
    codes = torch.randint(0, 8, (5, 24), dtype=torch.uint8)
    planes = pack_bits(codes, 3)
    assert planes.shape == (5, 3, 3) and torch.equal(unpack_bits(planes), codes)
    x = torch.randn(4, 7, 64) * torch.logspace(-1, 1, 64)
    for bits in (2, 3, 4):
        q = quantize(x, bits, 32)
        error = (x - dequantize(q, torch.float32)).abs().reshape(4, 7, 2, 32)
        bound = q.step.float()[..., None] / 2 + 2e-3 * x.abs().amax()  # + float16 rounding of min and step
        assert bool((error <= bound).all())
        assert q.nbytes == x[..., 0].numel() * (64 * bits // 8 + 2 * 2 * 2)


def test_a_width_off_the_group_is_padded_with_the_last_number_and_trimmed_on_read():
    x = torch.randn(3, 28)
    q = quantize(x, 4, 8)
    assert q.planes.shape == (3, 4, 4) and q.minimum.shape == (3, 4)  # 32 codes, 4 groups
    y = dequantize(q, torch.float32)
    assert y.shape == (3, 28)
    assert bool(((x - y).abs() <= q.step.float().repeat_interleave(8, dim=-1)[:, :28] / 2 + 1e-2).all())
