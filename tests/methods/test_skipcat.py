"""SkipCat math: exact reparameterisation, well-conditioned pivoting, rank solver, shared projection."""

from __future__ import annotations

import pytest
import torch

from rankfold.methods.group_decomposition import decompose_group
from rankfold.methods.skipcat import CatOptions
from rankfold.methods.statistics import InputStats
from rankfold.methods.structure import rank_for_ratio
from rankfold.methods.svd_llm import svd_llm_factors, whitened_spectrum
from rankfold.methods.whitening import whitening_factor
from rankfold.modules.layout import CompressedModule, lowrank_params
from rankfold.modules.skip import pivoted_columns, skip_apply, skip_reparameterize
from tests.methods.test_decompositions import _correlated_inputs


def _random(shape, seed):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("m, n, r", [(40, 30, 12), (20, 50, 20), (33, 33, 32)])
def test_skip_is_an_exact_reparameterisation(m, n, r):
    b, a = _random((m, r), 0), _random((r, n), 1)
    factors = skip_reparameterize(b, a)
    x = _random((7, n), 2)
    torch.testing.assert_close(skip_apply(factors, x), x @ (b @ a).T, rtol=1e-9, atol=1e-9)
    assert sorted(factors.permutation.tolist()) == list(range(n))
    assert factors.a_prime.shape == (r, n - r) and factors.b_prime.shape == (m, r)


def test_pivoting_picks_a_well_conditioned_block():
    """Columns 0..r-1 nearly collinear: unpivoted A₁ is ill-conditioned, pivoted QR avoids them."""
    r, n = 8, 40
    a = _random((r, n), 3)
    a[:, :r] = a[:, :1] + 1e-7 * _random((r, r), 4)
    naive = float(torch.linalg.cond(a[:, :r]))
    factors = skip_reparameterize(_random((10, r), 5), a)
    assert naive > 1e6 and factors.condition < 100


def test_pivoted_columns_match_greedy_volume_choice():
    a = _random((3, 10), 6)
    order = pivoted_columns(a, 3)
    first = int(torch.argmax(a.pow(2).sum(0)))
    assert int(order[0]) == first


@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.4, 0.7])
@pytest.mark.parametrize("n, rows", [(576, 960), (576, 3072), (1536, 576), (4096, 3 * 4096)])
def test_skip_rank_is_largest_within_budget(n, rows, ratio):
    rank = rank_for_ratio(rows, n, ratio, skip=True)
    budget = (1 - ratio) * rows * n
    assert lowrank_params(rank, rows, n, True) <= budget
    assert rank == min(n, rows) or lowrank_params(rank + 1, rows, n, True) > budget
    assert rank > rank_for_ratio(rows, n, ratio)  # skipping keeps more rank at the same budget


def test_cat_rank_fits_budget():
    assert rank_for_ratio(960, 576, 0.2) * (576 + 960) <= 0.8 * 576 * 960 < (rank_for_ratio(960, 576, 0.2) + 1) * (576 + 960)


def test_cat_shares_one_projection_and_its_loss_is_the_joint_dropped_spectrum():
    n = 32
    x = _correlated_inputs(n, 300)
    factor = whitening_factor(x @ x.T)
    weights = [_random((24, n), 7), _random((8, n), 8), _random((8, n), 9)]
    stats = InputStats.zeros(n)
    stats.add_(x.T)
    module = CompressedModule("shared", ("q", "k", "v"), 10, "qkv", group="attn_in")
    tensors = decompose_group(CatOptions(name="cat"), dict(zip("qkv", weights)), stats, [module]).tensors
    parts, shared = [tensors[f"{m}.B"] for m in "qkv"], tensors["qkv.A"]
    assert [p.shape for p in parts] == [(24, 10), (8, 10), (8, 10)] and shared.shape == (10, n)
    stacked = torch.cat(weights)
    error = float(((stacked - torch.cat(parts) @ shared) @ x).pow(2).sum())
    _, sigma, _ = whitened_spectrum(stacked, factor)
    assert error == pytest.approx(float(sigma[10:].pow(2).sum()), rel=1e-8)
    # Equal to SVD-LLM of the stacked matrix: Cat is SVD-LLM over the group.
    b, a = svd_llm_factors(stacked, factor, 10)
    torch.testing.assert_close(torch.cat(parts) @ shared, b @ a)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 2e-4), (torch.bfloat16, 3e-2), (torch.float16, 5e-3)])
def test_skip_forward_in_low_precision_tracks_fp64(dtype, tol):
    """With pivoting, low-precision skip forward stays close to the fp64 reference (METHODS: without
    pivoting half precision overflows)."""
    n, m = 64, 48
    x = _correlated_inputs(n, 200).T.contiguous()  # (tokens, n)
    factor = whitening_factor(x.T @ x)
    b, a = svd_llm_factors(_random((m, n), 10), factor, 40)
    factors = skip_reparameterize(b, a)
    reference = skip_apply(factors, x)
    low = type(factors)(factors.permutation, factors.a_prime.to(dtype), factors.b_prime.to(dtype), factors.condition)
    got = skip_apply(low, x.to(dtype)).double()
    relative = float((got - reference).norm() / reference.norm())
    assert relative < tol
