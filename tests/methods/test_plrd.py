"""PLRD schedules: shapes, ranks per step, the cost-matched solve and FLRA's order."""

from __future__ import annotations

import math

import pytest
import torch

from rankfold.methods.plrd import (
    DecodeSchedule,
    DecodeUnit,
    FisherOrder,
    average_cost,
    cost_of,
    fraction,
    solve_floor,
    step_ranks,
    target_cost,
)


def _units(gains: bool = False) -> list[DecodeUnit]:
    # (name, stored rank, n + M, dense m·n): the stored model keeps ~70 % of the dense parameters
    spec = [("q", 24, 128, 64 * 64), ("k", 10, 80, 16 * 64), ("gate", 30, 200, 136 * 64), ("down", 30, 200, 136 * 64)]
    out = []
    for k, (name, rank, cost, dense) in enumerate(spec):
        g = torch.linspace(1.0, 0.01, rank, dtype=torch.float64) * (10.0 ** k) if gains else None
        out.append(DecodeUnit(name, rank, cost, dense, g))
    return out


@pytest.mark.parametrize("shape", ["linear", "step", "exponential", "constant"])
def test_shapes_start_at_one_and_never_increase(shape):
    schedule = DecodeSchedule(shape=shape, floor=0.3, step_at=5, decay_tokens=4.0)
    values = [fraction(schedule, t, 32) for t in range(32)]
    assert values[0] == 1.0 and all(b <= a for a, b in zip(values, values[1:]))
    assert min(values) >= 0.3 - 1e-12
    if shape == "linear":
        assert values[-1] == pytest.approx(0.3)
    if shape == "step":
        assert values[4] == 1.0 and values[5] == 0.3
    if shape == "exponential":
        assert values[4] == pytest.approx(0.3 + 0.7 * math.exp(-1))
    if shape == "constant":
        assert set(values[1:]) == {0.3}


def test_uniform_ranks_are_the_ceiling_of_r_f():
    units = _units()
    schedule = DecodeSchedule(shape="linear", floor=0.1)
    ranks = step_ranks(schedule, units, 11)
    for t, step in enumerate(ranks):
        f = fraction(schedule, t, 11)
        assert step == {u.name: max(1, math.ceil(u.rank * f - 1e-9)) for u in units}
    assert ranks[-1]["gate"] == 3  # 30 · 0.1 exactly: no rounding up


@pytest.mark.parametrize("shape", ["linear", "step", "exponential", "constant"])
@pytest.mark.parametrize("order", ["uniform", "fisher"])
def test_cost_matched_floor_hits_the_target_within_one_rank_step(shape, order):
    units = _units(gains=True)
    schedule = DecodeSchedule(shape=shape, target_ratio=0.5, order=order, step_at=4, decay_tokens=6.0)
    solved = solve_floor(schedule, units, 32)
    achieved, target = average_cost(solved, units, 32), target_cost(schedule, units)
    assert achieved <= target
    assert target - achieved <= sum(u.cost_per_rank for u in units)  # one rank of every module, every token
    assert 0.0 <= solved.floor < 1.0


def test_unreachable_targets_are_errors():
    units = _units()
    with pytest.raises(ValueError, match="already costs"):
        solve_floor(DecodeSchedule(target_ratio=0.1), units, 32)
    with pytest.raises(ValueError, match="even floor 0"):
        solve_floor(DecodeSchedule(shape="step", step_at=30, target_ratio=0.5), units, 32)


def test_fisher_order_spends_the_budget_on_high_gain_modules_first():
    units = _units(gains=True)
    order = FisherOrder(units)
    full = sum(u.rank * u.cost_per_rank for u in units)
    previous = None
    for f in (0.2, 0.4, 0.6, 0.8, 1.0):
        ranks = order.ranks(f * full)
        assert cost_of(units, ranks) <= f * full
        assert cost_of(units, ranks) > f * full - max(u.cost_per_rank for u in units)  # within one direction
        if previous:
            assert all(ranks[k] >= previous[k] for k in ranks)  # nested in the budget
        previous = ranks
    half = order.ranks(0.5 * full)
    # down's gains (≥ 10) all exceed q's (≤ 1): q gets a direction beyond its first only once down is whole
    assert half["q"] == 1 or half["down"] == 30
    assert half["q"] / 24 < half["down"] / 30
    with pytest.raises(ValueError, match="gains"):
        FisherOrder(_units(gains=False))
