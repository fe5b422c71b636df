"""FLRA: whitened spectra without an SVD, and the global greedy rank allocation under one budget."""

from __future__ import annotations

import itertools

import pytest
import torch

from rankfold.allocators.flra import RankUnit, allocate_ranks, loss_weight, whitened_energy
from rankfold.methods.whitening import whitening_factor


def _gram(n: int, tokens: int, seed: int) -> torch.Tensor:
    x = torch.randn(tokens, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    x *= torch.linspace(0.1, 3.0, n, dtype=torch.float64)  # anisotropic inputs, as in real layers
    return x.T @ x


@pytest.mark.parametrize("m, n", [(6, 10), (14, 10), (10, 10)])
def test_whitened_energy_is_the_squared_spectrum_of_w_times_s(m, n):
    weight = torch.randn(m, n, generator=torch.Generator().manual_seed(m), dtype=torch.float64)
    gram = _gram(n, 40, m)
    expected = torch.linalg.svdvals(weight @ whitening_factor(gram.clone())).square()
    energy = whitened_energy(weight, gram)
    assert energy.shape == (min(m, n),) if m <= n else energy.shape == (n,)
    torch.testing.assert_close(energy[:min(m, n)], expected, rtol=1e-9, atol=1e-9 * float(expected[0]))
    assert bool((energy[:-1] >= energy[1:]).all())


def _unit(name, energy, weight=1.0, rows=4, cols=4, skip=False, min_rank=1):
    return RankUnit(name, torch.tensor(energy, dtype=torch.float64), weight, rows, cols, skip, min_rank)


def _loss(units, ranks):
    return sum(u.weight * float(u.energy[ranks[u.name]:].sum()) for u in units)


def test_equal_costs_greedy_is_the_exact_optimum():
    generator = torch.Generator().manual_seed(0)
    units = [_unit(f"u{k}", torch.rand(4, generator=generator).sort(descending=True).values.tolist(),
                   weight=float(torch.rand((), generator=generator)) + 0.1) for k in range(3)]
    for budget in range(3 * 8, 3 * 8 * 2 + 1, 8):  # every budget from minimum ranks to the caps (rank 2 each)
        ranks = allocate_ranks(units, budget)
        best = min((dict(zip(["u0", "u1", "u2"], combo)) for combo in itertools.product(range(1, 3), repeat=3)
                    if sum(combo) * 8 <= budget), key=lambda r: _loss(units, r))
        assert _loss(units, ranks) == pytest.approx(_loss(units, best))


def test_budget_is_never_exceeded_and_no_further_rank_fits():
    generator = torch.Generator().manual_seed(1)
    units = [_unit(f"u{k}", torch.rand(min(r, c), generator=generator).sort(descending=True).values.tolist(),
                   weight=1.0 + k, rows=r, cols=c, skip=skip)
             for k, (r, c, skip) in enumerate([(30, 20, False), (8, 20, False), (40, 12, True), (16, 16, True)])]
    for budget in [200, 777, 1500, 2345]:
        ranks = allocate_ranks(units, budget)
        spent = sum(u.params(ranks[u.name]) for u in units)
        assert spent <= budget
        room = [u.params(ranks[u.name] + 1) - u.params(ranks[u.name]) for u in units if ranks[u.name] < u.max_rank]
        assert not room or budget - spent < max(room)  # the greedy stops only when its next step does not fit
        assert all(u.min_rank <= ranks[u.name] <= u.max_rank for u in units)


def test_more_fisher_weight_keeps_more_rank():
    energy = [2.0 ** -k for k in range(12)]
    units = [_unit("sensitive", energy, weight=10.0, rows=12, cols=12),
             _unit("robust", energy, weight=0.1, rows=12, cols=12)]
    ranks = allocate_ranks(units, 6 * 24)  # six ranks to share; each matrix is capped at 6
    assert ranks["sensitive"] > ranks["robust"] and sum(ranks.values()) == 6


def test_plain_units_are_capped_where_low_rank_stops_saving():
    unit = _unit("w", [1.0] * 8, rows=8, cols=8)
    assert unit.max_rank == 4  # 4·(8+8) = 64 = dense
    assert allocate_ranks([unit], 10_000) == {"w": 4}
    skip = _unit("s", [1.0] * 8, rows=8, cols=8, skip=True)
    assert skip.max_rank == 8 and skip.params(8) == 64


def test_a_budget_below_the_minimum_ranks_is_an_error():
    with pytest.raises(ValueError, match="cannot hold even the minimum ranks"):
        allocate_ranks([_unit("a", [1.0, 0.5], min_rank=2)], 15)
    with pytest.raises(ValueError, match="trace"):
        loss_weight(1.0, 4, 0.0)
