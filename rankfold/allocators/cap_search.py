"""CAP's global search (seed 001; METHODS.md "CAP"): which singular triples and which sparse entries of
every matrix's robust PCA (methods/cap.py) to keep, over all layers at once, under one parameter budget.

Units are a matrix's triples (cost m + n) and blocks of `sparse_block` of its sparse candidates taken
in score order (cost per entry × block size; `sparse_block: 1` is the paper's one unit per entry).
Each unit u has a keep probability s_u; a mask m ~ Bernoulli(s) gives the model
W̃ = U diag(σ⊙m_σ) Vᵀ + S⊙m_S, and the search minimises E[ℒ(W̃)] on calibration sequences:

    g_u = (ℒ(m) − b) (m_u − s_u) / (s_u (1 − s_u) + ε)     REINFORCE (score-function) gradient
    s ← Π_budget(s − lr · g)                                 projected back onto Σ_u c_u s_u = budget

with b the leave-one-out mean of the other masks drawn on the same batch (`masks_per_step` ≥ 2), or
the moving average of the last `baseline_window` losses (the paper's, with one mask per step). It
starts from a keep rule, smoothed (`temperature`) — `init: fisher`, FLRA's loss model (a unit's output
energy times its matrix's Fisher weight F/(m·tr G), ranked per parameter over all matrices), or
`init: uniform` — and ends with a global top-K of s that meets the budget to within one unit's cost.
`estimator: natural` preconditions g by 4 s(1 − s), the Bernoulli's inverse Fisher information scaled
to leave the step at s = ½ unchanged.

The steps can make the start worse (measured on SmolLM2, README: the paper's step drifts, and with
≈ 3·10⁵ units and two masks a step the gradient is mostly noise), so the search validates: the start's
top-K and the top-K every `validate_every` steps are scored on `holdout` calibration sequences it
never draws batches from, and the lowest held-out loss wins (the start on a tie) — early stopping, on
calibration data only.
`rule: uniform` skips the search: every matrix keeps (1 − ratio) of its dense parameters, units taken
by score per parameter — the baseline the search must beat.

The loss comes from forward passes streamed layer by layer over the shard actors
(orchestrator/stages/search.py), so no process holds the whole model. This file is the math.

    target: {ratio: 0.5, allocation: {kind: search, steps: 200, lr: 0.05}}
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field

from rankfold.allocators.registry import AllocationOptions, AllocationProblem, Allocator, Ranks, register_allocator
from rankfold.methods.registry import Method

VERSION = "2"  # 2: the held-out choice among top-Ks; the natural step by default
EPS = 1e-3  # keeps 1 / (s (1 − s)) finite at s ∈ {0, 1}


class SearchAllocation(AllocationOptions):
    kind: Literal["search"] = "search"
    rule: Literal["reinforce", "uniform"] = "reinforce"
    # The search's starting point: FLRA's loss model over all matrices (a unit's score times its matrix's
    # Fisher weight, ranked globally per parameter; needs the Fisher pass), or the uniform keep rule.
    # With steps: 0 the result is that starting point's top-K.
    init: Literal["fisher", "uniform"] = "fisher"
    fisher_samples: int = Field(32, ge=1)
    fisher_batch_size: int = Field(1, ge=1)
    samples: int = Field(32, ge=1)           # calibration sequences the search draws its batches from
    # Calibration sequences after `samples`, never searched on: the start's top-K and the top-K every
    # `validate_every` steps are scored on them, and the best is the result (0: the last top-K, unchecked).
    holdout: int = Field(16, ge=0)
    validate_every: int = Field(16, ge=1)
    batch_size: int = Field(4, ge=1)         # sequences per step
    steps: int = Field(64, ge=0)             # REINFORCE steps (each draws masks_per_step masks)
    masks_per_step: int = Field(2, ge=1)     # masks per batch; ≥ 2 uses the leave-one-out baseline
    baseline_window: int = Field(5, ge=1)    # moving-average baseline (one mask per step)
    lr: float = Field(0.05, gt=0)
    # score: the paper's step, g = (ℒ − b)(m − s)/(s(1 − s) + ε); natural: that gradient preconditioned by
    # the Bernoulli's inverse Fisher information s(1 − s), scaled by 4 to equal it at s = ½ (same lr),
    # i.e. 4 (ℒ − b)(m − s) — bounded, where the score step grows as 1/s for a rarely drawn unit and one
    # draw can carry it across the top-K boundary.
    estimator: Literal["score", "natural"] = "natural"
    # The gradient averaged over this many units nearest in score order within a matrix's triples or its
    # sparse blocks (1: per unit, the paper's): neighbours carry nearly the same energy, and the average
    # cuts the variance by up to the window while a matrix's boundary can still move (rankfold's).
    gradient_window: int = Field(1, ge=1)
    temperature: float = Field(0.1, gt=0)    # smoothing of the starting point (a fraction of the budget)
    sparse_block: int = Field(64, ge=1)      # sparse candidates per unit
    seed: int = 0
    save_every: int = Field(8, ge=1)         # steps between saved search states (resume point)


@dataclass
class UnitTable:
    """Every unit of every matrix, flat. matrix: index into `matrices` ((layer, path) pairs); kind 0 =
    triple, 1 = sparse block; first/size: the unit's range in its matrix's triples or candidates."""

    matrices: list[tuple[int, str]]
    matrix: torch.Tensor   # (U,) long
    kind: torch.Tensor     # (U,) long
    first: torch.Tensor    # (U,) long
    size: torch.Tensor     # (U,) long
    cost: torch.Tensor     # (U,) float64 parameters
    score: torch.Tensor    # (U,) float64 output energy carried
    dense: torch.Tensor    # (M,) float64 dense parameters of each matrix
    offsets: list[int]     # matrix j's units are [offsets[j], offsets[j + 1])

    def __len__(self) -> int:
        return self.matrix.numel()

    def counts(self, matrix: int) -> tuple[int, int]:
        """(triples, sparse candidates) of one matrix."""
        part = slice(self.offsets[matrix], self.offsets[matrix + 1])
        kinds = self.kind[part]
        return int((kinds == 0).sum()), int(self.size[part][kinds == 1].sum())


def unit_table(scores: dict[tuple[int, str], dict[str, torch.Tensor]], shapes: dict[int, dict[str, tuple[int, int]]],
               entry_cost: int, block: int) -> UnitTable:
    """Units of every matrix from its robust PCA scores ({(layer, path): {triple_score, sparse_score}})."""
    rows: dict[str, list] = {k: [] for k in ("matrix", "kind", "first", "size", "cost", "score")}
    matrices, dense = sorted(scores), []
    for j, (layer, path) in enumerate(matrices):
        m, n = shapes[layer][path]
        dense.append(m * n)
        triples, entries = scores[layer, path]["triple_score"].double(), scores[layer, path]["sparse_score"].double()
        starts = torch.arange(0, entries.numel(), block)
        sizes = (entries.numel() - starts).clamp_max(block)
        block_scores = torch.zeros(starts.numel(), dtype=torch.float64).index_add_(
            0, torch.arange(entries.numel()) // block, entries)
        k = triples.numel()
        for key, values in (("matrix", torch.full((k + starts.numel(),), j)),
                            ("kind", torch.cat([torch.zeros(k, dtype=torch.long), torch.ones_like(starts)])),
                            ("first", torch.cat([torch.arange(k), starts])),
                            ("size", torch.cat([torch.ones(k, dtype=torch.long), sizes])),
                            ("cost", torch.cat([torch.full((k,), float(m + n)), sizes.double() * entry_cost])),
                            ("score", torch.cat([triples, block_scores]))):
            rows[key].append(values)
    cat = {key: torch.cat(values) if values else torch.zeros(0) for key, values in rows.items()}
    offsets = [0] + torch.tensor([v.numel() for v in rows["matrix"]], dtype=torch.long).cumsum(0).tolist()
    return UnitTable(matrices, cat["matrix"].long(), cat["kind"].long(), cat["first"].long(), cat["size"].long(),
                     cat["cost"].double(), cat["score"].double(), torch.tensor(dense, dtype=torch.float64), offsets)


def matrix_positions(table: UnitTable) -> torch.Tensor:
    """Each unit's place in its matrix's budget: (parameters of the better units + half its own) over
    the matrix's dense parameters, with units ranked by score per parameter within the matrix."""
    order = torch.argsort(-(table.score / table.cost), stable=True)
    order = order[torch.argsort(table.matrix[order], stable=True)]  # by matrix, then by score per parameter
    cost = table.cost[order]
    sums = torch.zeros(len(table.matrices), dtype=torch.float64).index_add_(0, table.matrix[order], cost)
    running = cost.cumsum(0)
    before = running - cost - (sums.cumsum(0) - sums)[table.matrix[order]]
    position = torch.empty_like(cost)
    position[order] = (before + cost / 2) / table.dense[table.matrix[order]]
    return position


def global_positions(table: UnitTable, budget: float) -> torch.Tensor:
    """Each unit's place in the global budget, units ranked by score per parameter over all matrices."""
    order = torch.argsort(-(table.score / table.cost), stable=True)
    cost = table.cost[order]
    position = torch.empty_like(cost)
    position[order] = (cost.cumsum(0) - cost / 2) / budget
    return position


def uniform_keep(table: UnitTable, ratio: float) -> torch.Tensor:
    """Every matrix keeps its best units (score per parameter) up to (1 − ratio) of its dense parameters."""
    position = matrix_positions(table)
    end = position + table.cost / 2 / table.dense[table.matrix]
    return end <= (1.0 - ratio) + 1e-12


def initial_probabilities(table: UnitTable, ratio: float, temperature: float, budget: float,
                          init: str = "uniform") -> torch.Tensor:
    """A keep rule, smoothed, on the budget: s = sigmoid((1 − position) / temperature) with the unit's
    position in the budget — its matrix's share (1 − ratio) under `init` "uniform", the global budget
    under "fisher" (scores already weighted by the Fisher loss model)."""
    if init == "uniform":
        position = matrix_positions(table) / (1.0 - ratio)
    else:
        position = global_positions(table, budget)
    return project_to_budget(torch.sigmoid((1.0 - position) / temperature), table.cost, budget)


def project_to_budget(s: torch.Tensor, cost: torch.Tensor, budget: float, iterations: int = 100) -> torch.Tensor:
    """Euclidean projection onto {0 ≤ s ≤ 1, Σ c s = budget} (in the metric that weighs units by cost):
    s − τ c clipped to [0, 1], τ found by bisection. Raises ValueError when the budget exceeds Σ c."""
    total = float(cost.sum())
    if budget > total * (1 + 1e-12):
        raise ValueError(f"a budget of {budget:.0f} parameters exceeds every unit together ({total:.0f})")
    spend = lambda tau: float((s - tau * cost).clamp(0.0, 1.0).mul(cost).sum())  # noqa: E731  decreasing in tau
    low, high = -1.0 / float(cost.min()), (float(s.max()) + 1.0) / float(cost.min())
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if spend(mid) > budget else (low, mid)
    return (s - high * cost).clamp(0.0, 1.0)


def reinforce_gradient(s: torch.Tensor, masks: torch.Tensor, losses: torch.Tensor, baselines: torch.Tensor,
                       estimator: str = "score") -> torch.Tensor:
    """Mean over the K drawn masks (K, U) of (ℒ_k − b_k)(m_k − s)/(s(1 − s) + ε) ("score", the
    score-function gradient of E[ℒ]), or of 4 (ℒ_k − b_k)(m_k − s) ("natural": that gradient times the
    Bernoulli's inverse Fisher information s(1 − s), Amari's natural gradient, scaled to equal it at s = ½)."""
    advantage = (losses - baselines).to(s.dtype)[:, None]
    direction = masks.to(s.dtype) - s
    direction = direction / (s * (1 - s) + EPS) if estimator == "score" else 4 * direction
    return (advantage * direction).mean(0)


def smooth_gradient(g: torch.Tensor, table: UnitTable, window: int) -> torch.Tensor:
    """g (U,) averaged over `window` consecutive units of the same matrix and kind, centred on each unit
    (shifted inward at a segment's ends; a segment shorter than the window averages whole). Units of a
    matrix's triples, and of its sparse blocks, are contiguous in the table and in score order."""
    if window <= 1 or g.numel() == 0:
        return g
    index = torch.arange(g.numel())
    segment = table.matrix * 2 + table.kind
    first = torch.ones_like(segment, dtype=torch.bool)
    first[1:] = segment[1:] != segment[:-1]
    begin = torch.where(first, index, 0).cummax(0).values
    last = torch.ones_like(first)
    last[:-1] = first[1:]
    end = torch.where(last, index + 1, g.numel()).flip(0).cummin(0).values.flip(0)
    low = torch.maximum(index - window // 2, begin)
    high = torch.minimum(low + window, end)
    low = torch.maximum(high - window, begin)
    sums = torch.cat([g.new_zeros(1), g.cumsum(0)])
    return (sums[high] - sums[low]) / (high - low).to(g.dtype)


def baselines(losses: torch.Tensor, history: list[float], window: int) -> torch.Tensor:
    """Leave-one-out means of the step's losses (K ≥ 2), else the moving average of the last `window`
    losses before this step (the loss itself on the first step: no update)."""
    k = losses.numel()
    if k >= 2:
        return (losses.sum() - losses) / (k - 1)
    recent = history[-window:]
    return torch.tensor([sum(recent) / len(recent)] if recent else [float(losses[0])], dtype=losses.dtype)


def top_k(s: torch.Tensor, cost: torch.Tensor, budget: float) -> torch.Tensor:
    """Global top-K: units by descending s (ties: lower index first) while the budget allows, then any
    later unit that still fits. The kept cost is ≤ budget and within the cheapest unkept unit's cost of it."""
    order = torch.argsort(-s, stable=True)
    cost_sorted = cost[order]
    keep_sorted = cost_sorted.cumsum(0) <= budget + 1e-9
    left = budget - float(cost_sorted[keep_sorted].sum())
    unkept = torch.nonzero(~keep_sorted).flatten()
    # The cheapest unkept cost only grows as units are kept: its first value is a valid stopping bound.
    cheapest = float(cost_sorted[unkept].min()) if unkept.numel() else 0.0
    for position in unkept.tolist():  # fill the remainder in s order
        if left < cheapest:
            break
        if float(cost_sorted[position]) <= left + 1e-9:
            keep_sorted[position] = True
            left -= float(cost_sorted[position])
    keep = torch.zeros_like(keep_sorted)
    keep[order] = keep_sorted
    return keep


def entry_masks(table: UnitTable, keep: torch.Tensor, matrix: int, triples: int, entries: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One matrix's per-triple and per-candidate masks from the unit mask `keep` (U,)."""
    mine = slice(table.offsets[matrix], table.offsets[matrix + 1])
    kinds, firsts, sizes, kept = table.kind[mine], table.first[mine], table.size[mine], keep[mine]
    triple_mask = torch.zeros(triples, dtype=torch.bool)
    triple_mask[firsts[kinds == 0]] = kept[kinds == 0]
    blocks = kinds == 1
    entry_mask = torch.repeat_interleave(kept[blocks], sizes[blocks]) if entries else torch.zeros(0, dtype=torch.bool)
    return triple_mask, entry_mask


def allocate_from_masks(options: SearchAllocation, problem: AllocationProblem) -> Ranks:
    """[rank, nnz] of every matrix: what the search stage's masks keep."""
    ranks: Ranks = {}
    for i, modules in problem.layout.items():
        for module in modules:
            path = module.members[0]
            masks = problem.read("search", i, path)
            ranks.setdefault(i, {})[path] = [int(masks["keep_triples"].sum()), int(masks["keep_sparse"].sum())]
    return ranks


def uses_fisher(options: SearchAllocation) -> bool:
    """Whether the search starts from the Fisher loss model (and so reads the Fisher pass)."""
    return options.rule == "reinforce" and options.init == "fisher"


def validates(options: SearchAllocation) -> bool:
    """Whether the search scores its top-Ks on held-out sequences (REINFORCE steps to choose among)."""
    return options.rule == "reinforce" and options.steps > 0 and options.holdout > 0


def search_stages(options: SearchAllocation) -> tuple[str, ...]:
    """The Fisher pass only when the search starts from the Fisher loss model."""
    return ("fisher",) * uses_fisher(options) + ("rpca", "search")


def check_spec(options: SearchAllocation, method: Method, calibration_samples: int) -> None:
    if options.fisher_samples > calibration_samples:
        raise ValueError(f"target.allocation.fisher_samples = {options.fisher_samples} exceeds "
                         f"calibration.num_samples = {calibration_samples}")
    if options.samples > calibration_samples:
        raise ValueError(f"target.allocation.samples = {options.samples} exceeds calibration.num_samples = "
                         f"{calibration_samples}")
    if validates(options) and options.samples + options.holdout > calibration_samples:
        raise ValueError(f"target.allocation.samples + holdout = {options.samples} + {options.holdout} exceeds "
                         f"calibration.num_samples = {calibration_samples}: the held-out sequences come after the "
                         f"searched ones (lower holdout, 0 to keep the last top-K unchecked)")
    if options.batch_size > options.samples:
        raise ValueError(f"target.allocation.batch_size = {options.batch_size} exceeds target.allocation.samples = "
                         f"{options.samples}")


register_allocator(Allocator("search", SearchAllocation, allocate_from_masks, VERSION, stages=search_stages,
                             check_spec=check_spec))
