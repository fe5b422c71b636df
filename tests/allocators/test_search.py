"""CAP's search math: the budget projection, the final top-K, the uniform keep rule and the REINFORCE step."""

from __future__ import annotations

import pytest
import torch

from rankfold.allocators.cap_search import (
    baselines,
    entry_masks,
    initial_probabilities,
    project_to_budget,
    reinforce_gradient,
    smooth_gradient,
    top_k,
    uniform_keep,
    unit_table,
)


def _table(block: int = 4):
    torch.manual_seed(0)
    scores = {(0, "q"): {"triple_score": torch.rand(6).sort(descending=True).values,
                         "sparse_score": torch.rand(30).sort(descending=True).values},
              (1, "down"): {"triple_score": torch.rand(8).sort(descending=True).values * 5,
                            "sparse_score": torch.rand(0)}}
    shapes = {0: {"q": (6, 10)}, 1: {"down": (8, 12)}}
    return unit_table(scores, shapes, entry_cost=2, block=block)


def test_unit_table_costs_and_blocks():
    table = _table()
    assert len(table) == 6 + 8 + 8  # 6 + 8 triples, 30 candidates in blocks of 4 (the last holds 2)
    assert table.cost[:6].tolist() == [16.0] * 6 and table.cost[table.kind == 1].tolist() == [8.0] * 7 + [4.0]
    keep = torch.zeros(len(table), dtype=torch.bool)
    keep[[1, 6, 7]] = True  # q's triple 1 and its first two blocks
    triples, entries = entry_masks(table, keep, 0, 6, 30)
    assert triples.tolist() == [False, True] + [False] * 4 and entries.sum() == 8 and entries[:8].all()


@pytest.mark.parametrize("budget", [10.0, 77.0, 200.0])
def test_projection_meets_the_budget_and_is_idempotent(budget):
    table = _table()
    s = project_to_budget(torch.rand(len(table), dtype=torch.float64), table.cost, budget)
    assert float((s * table.cost).sum()) == pytest.approx(budget, rel=1e-9)
    assert float(s.min()) >= 0 and float(s.max()) <= 1
    assert torch.allclose(project_to_budget(s, table.cost, budget), s, atol=1e-9)
    with pytest.raises(ValueError, match="exceeds every unit"):
        project_to_budget(s, table.cost, float(table.cost.sum()) + 1)


def test_top_k_never_exceeds_the_budget_and_misses_it_by_less_than_one_unit():
    table = _table()
    for seed in range(20):
        s = torch.rand(len(table), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        budget = float(torch.randint(5, int(table.cost.sum()), (1,), generator=torch.Generator().manual_seed(seed)))
        keep = top_k(s, table.cost, budget)
        kept = float(table.cost[keep].sum())
        assert kept <= budget and (keep.all() or budget - kept < float(table.cost[~keep].min()))


def test_uniform_keep_gives_every_matrix_its_share_in_score_order():
    table = _table(block=1)
    keep = uniform_keep(table, ratio=0.5)
    for j in range(2):
        mine = slice(table.offsets[j], table.offsets[j + 1])
        spent = float(table.cost[mine][keep[mine]].sum())
        assert spent <= 0.5 * float(table.dense[j])
        density = table.score[mine] / table.cost[mine]
        if (~keep[mine]).any() and keep[mine].any():  # kept units are the densest ones
            assert float(density[keep[mine]].min()) >= float(density[~keep[mine]].max())
    # the smoothed start is the same rule: its top-K within a unit of the uniform keep's cost
    budget = float(table.cost[keep].sum())
    start = initial_probabilities(table, 0.5, temperature=0.01, budget=budget)
    assert float((start * table.cost).sum()) == pytest.approx(budget)
    assert (top_k(start, table.cost, budget) == keep).float().mean() > 0.9


def test_reinforce_raises_the_probability_of_units_whose_dropping_costs_loss():
    s = torch.full((4,), 0.5, dtype=torch.float64)
    masks = torch.tensor([[1, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    losses = torch.tensor([1.0, 2.0], dtype=torch.float64)  # unit 0 dropped in the worse mask
    gradient = reinforce_gradient(s, masks, losses, baselines(losses, [], 5))
    assert gradient[0] < 0 and gradient[3] > 0 and gradient[1] == 0 and gradient[2] == 0
    # one mask per step: the moving average of earlier losses is the baseline, none on the first step
    assert baselines(torch.tensor([3.0]), [1.0, 2.0, 9.0], 2).item() == 5.5
    assert baselines(torch.tensor([3.0]), [], 2).item() == 3.0


def test_the_fisher_start_is_the_global_greedy_by_score_per_parameter():
    table = _table(block=1)
    budget = 0.4 * float(table.dense.sum())
    start = initial_probabilities(table, 0.6, temperature=0.01, budget=budget, init="fisher")
    keep = top_k(start, table.cost, budget)
    density = table.score / table.cost
    order = torch.argsort(-density)
    greedy = torch.zeros_like(keep)
    greedy[order[table.cost[order].cumsum(0) <= budget]] = True
    assert (keep & greedy).sum() >= greedy.sum() - 1  # the greedy prefix is kept (up to the boundary unit)


def test_the_natural_step_is_the_score_step_times_the_bernoulli_fisher_inverse_and_bounded():
    s = torch.tensor([0.5, 1e-4, 0.9], dtype=torch.float64)
    masks = torch.tensor([[1, 1, 0], [0, 0, 1]], dtype=torch.bool)
    losses = torch.tensor([1.0, 3.0], dtype=torch.float64)
    base = baselines(losses, [], 5)
    score = reinforce_gradient(s, masks, losses, base, "score")
    natural = reinforce_gradient(s, masks, losses, base, "natural")
    assert torch.allclose(natural, 4 * score * (s * (1 - s) + 1e-3))
    assert natural[0].item() == pytest.approx(score[0].item(), rel=1e-2)  # the same step at s = ½
    # one draw of a rarely kept unit: the score step is ~ 1/(s + ε) times the advantage, the natural ≤ 4×
    assert score[1] < -400 and natural.abs().max() <= 4 * (losses - base).abs().max()


def test_the_gradient_window_averages_neighbours_within_a_matrix_and_kind_only():
    table = _table(block=4)
    g = torch.randn(len(table), dtype=torch.float64)
    assert torch.equal(smooth_gradient(g, table, 1), g)
    smoothed = smooth_gradient(g, table, 3)
    segment = (table.matrix * 2 + table.kind).tolist()
    for u in range(len(table)):  # a brute-force reference: the 3 nearest units of u's segment
        mine = [v for v in range(len(table)) if segment[v] == segment[u]]
        k = mine.index(u)
        start = max(0, min(k - 1, len(mine) - 3))
        window = mine[start:start + 3]
        assert smoothed[u].item() == pytest.approx(float(g[window].mean()))
    # a constant gradient per segment is unchanged: the average never reaches into another matrix or kind
    constant = torch.tensor(segment, dtype=torch.float64)
    assert torch.allclose(smooth_gradient(constant, table, 5), constant)
