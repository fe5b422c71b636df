"""Robust PCA by inexact ALM: a planted low-rank + sparse pair is recovered; the record converges."""

from __future__ import annotations

import pytest
import torch

from rankfold.methods.robust_pca import robust_pca, shrink, singular_value_threshold


def _planted(m=60, n=80, rank=4, density=0.05, seed=0):
    gen = torch.Generator().manual_seed(seed)
    low = torch.randn(m, rank, generator=gen, dtype=torch.float64) @ torch.randn(rank, n, generator=gen,
                                                                                dtype=torch.float64)
    mask = torch.rand(m, n, generator=gen) < density
    sparse = torch.where(mask, 10 * (torch.rand(m, n, generator=gen, dtype=torch.float64) - 0.5), 0.0)
    return low, sparse


def test_planted_low_rank_and_sparse_are_both_recovered():
    low, sparse = _planted()
    result = robust_pca(low + sparse, iterations=200, tol=1e-9)
    assert result.history[-1]["residual"] < 1e-8
    assert torch.linalg.matrix_norm(result.low_rank - low) / torch.linalg.matrix_norm(low) < 1e-5
    assert torch.linalg.matrix_norm(result.sparse - sparse) / torch.linalg.matrix_norm(sparse) < 1e-5
    assert result.sigma.numel() == 4
    assert ((result.sparse.abs() > 1e-6) == (sparse != 0)).float().mean() > 0.999


def test_residual_falls_over_iterations_and_the_record_is_complete():
    low, sparse = _planted(seed=1)
    result = robust_pca(low + sparse, iterations=10)
    residuals = [h["residual"] for h in result.history]
    assert len(residuals) == 10 and residuals[-1] < residuals[0] / 10
    assert all(h["mu"] > 0 and h["rank"] >= 1 for h in result.history)


def test_proximal_maps():
    x = torch.tensor([-3.0, -0.5, 0.2, 2.0], dtype=torch.float64)
    assert torch.equal(shrink(x, 1.0), torch.tensor([-2.0, 0.0, 0.0, 1.0], dtype=torch.float64))
    m = torch.diag(torch.tensor([5.0, 2.0, 0.5], dtype=torch.float64))
    u, s, vh = singular_value_threshold(m, 1.0)
    assert torch.allclose(s, torch.tensor([4.0, 1.0], dtype=torch.float64)) and u.shape == (3, 2)


@pytest.mark.parametrize("bad", [{"iterations": 0}, {"rho": 1.0}, {"lam": -1.0}])
def test_bad_options_and_inputs_are_errors(bad):
    with pytest.raises(ValueError, match="out of range"):
        robust_pca(torch.randn(4, 5), **bad)
    with pytest.raises(ValueError, match="finite"):
        robust_pca(torch.tensor([[float("nan"), 1.0]]))
    with pytest.raises(ValueError, match="all-zero"):
        robust_pca(torch.zeros(3, 3))


@pytest.mark.slow  # reads the real model
def test_on_a_real_smollm2_weight_the_residual_falls(smollm2):
    weight = smollm2.tensor("model.layers.3.self_attn.q_proj.weight")
    result = robust_pca(weight, iterations=5)
    residuals = [h["residual"] for h in result.history]
    assert all(b < a for a, b in zip(residuals, residuals[1:]))
    assert 0 < result.sigma.numel() < min(weight.shape) and 0 < result.history[-1]["nnz"] < weight.numel()
