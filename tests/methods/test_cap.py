"""CAP's units: keeping every one gives W back; debiasing restores the scale thresholding took."""

from __future__ import annotations

import pytest
import torch

from rankfold.methods.cap import CapOptions, masked_weight, rpca_units
from rankfold.methods.whitening import whitening_factor


def _matrix_and_gram(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    low = torch.randn(40, 3, generator=generator, dtype=torch.float64) @ torch.randn(3, 30, generator=generator,
                                                                                     dtype=torch.float64)
    spikes = torch.zeros(40 * 30, dtype=torch.float64)
    spikes[torch.randperm(1200, generator=generator)[:30]] = 5.0  # _spike_positions() draws the same
    x = torch.randn(200, 30, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, 30)
    return low + spikes.view(40, 30), x.T @ x, 200


def _spike_positions(seed: int = 0) -> set[int]:
    generator = torch.Generator().manual_seed(seed)
    torch.randn(40, 3, generator=generator, dtype=torch.float64), torch.randn(3, 30, generator=generator,
                                                                              dtype=torch.float64)
    return set(torch.randperm(1200, generator=generator)[:30].tolist())


@pytest.mark.parametrize("triples", ["residual_svd", "rpca"])
@pytest.mark.parametrize("whiten", [False, True])
def test_keeping_every_unit_gives_the_weight_back(whiten, triples):
    weight, gram, count = _matrix_and_gram()
    options = CapOptions(name="cap", whiten=whiten, triples=triples, max_density=1.0)
    units, history = rpca_units(options, weight, gram, count, whitening_factor(gram.clone()) if whiten else None)
    assert len(history) == 3
    every = masked_weight(units, torch.ones_like(units["sigma"], dtype=torch.bool),
                          torch.ones_like(units["sparse_values"], dtype=torch.bool), (40, 30), torch.float64)
    assert torch.allclose(every, weight, atol=1e-9)
    assert bool((units["triple_score"][1:] <= units["triple_score"][:-1]).all())
    assert bool((units["sparse_score"][1:] <= units["sparse_score"][:-1]).all())


def test_debiasing_gives_each_triple_its_least_squares_scale():
    weight, gram, count = _matrix_and_gram(1)
    shrunk, _ = rpca_units(CapOptions(name="cap", triples="rpca", whiten=False, debias=False), weight, gram, count)
    debiased, _ = rpca_units(CapOptions(name="cap", triples="rpca", whiten=False), weight, gram, count)
    u, vh = debiased["u"], debiased["vh"]
    assert torch.allclose(debiased["sigma"], ((u.T @ weight) * vh).sum(1))
    # the leading triple (the planted low rank) keeps more of W after debiasing than after thresholding
    top = lambda units: (units["u"][:, :3] * units["sigma"][:3]) @ units["vh"][:3]  # noqa: E731
    assert (weight - top(debiased)).norm() < (weight - top(shrunk)).norm()


def test_residual_svd_finds_the_planted_spikes_and_leaves_the_rank_to_the_search():
    weight, gram, count = _matrix_and_gram()
    units, _ = rpca_units(CapOptions(name="cap", iterations=10), weight, gram, count, whitening_factor(gram.clone()))
    assert set(units["sparse_indices"][:30].tolist()) == _spike_positions()  # the 30 best candidates
    assert units["sigma"].numel() == 30  # the full rank of W − S, not what thresholding kept


def test_with_no_sparse_part_the_triples_are_the_whitened_svd():
    weight, gram, count = _matrix_and_gram()
    whitening = whitening_factor(gram.clone())
    units, _ = rpca_units(CapOptions(name="cap", lam_scale=1e6), weight, gram, count, whitening)
    assert units["sparse_values"].numel() == 0
    torch.testing.assert_close(units["sigma"].sort(descending=True).values, torch.linalg.svdvals(weight @ whitening))
    # each triple's score is its share of the calibration output energy σ² / N (whitened: vᵀ G v = 1)
    torch.testing.assert_close(units["triple_score"], units["sigma"] ** 2 / count)


@pytest.mark.parametrize("triples", ["residual_svd", "rpca"])
def test_the_candidate_cap_holds_with_dead_input_channels(triples):
    weight, gram, count = _matrix_and_gram()
    gram[:, :28] = 0.0  # 28 of 30 inputs never fire: their entries score 0 but are not zero
    gram[:28, :] = 0.0  # whitening_factor shifts its own copy until Cholesky succeeds, as the stage does
    options = CapOptions(name="cap", triples=triples, max_density=0.1, lam_scale=0.3)  # cap 120 > 80 live entries
    units, _ = rpca_units(options, weight, gram, count, whitening_factor(gram.clone()))
    assert 0 < units["sparse_values"].numel() <= int(0.1 * weight.numel())
    assert bool(torch.isfinite(units["sigma"]).all()) and bool(torch.isfinite(units["sparse_values"]).all())
