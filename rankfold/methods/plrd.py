"""PLRD — FLRC's progressive low-rank decoding (arXiv:2510.09332; METHODS.md "FLRC"): the active rank
of every compressed module shrinks as tokens are generated. Pure math: schedules, decode cost, the
ranks of one step, and the cost-matched solve (`decode_units` reads a compressed model's modules as
their input). modules/progressive.py applies the ranks inside `generate`.

Decode steps. Generated token t (t = 0 … T−1, T = max_new_tokens) comes from the forward pass that
produces it: t = 0 is the prefill, always at the stored rank; step t ≥ 1 runs at fraction f(t):
    linear        f(t) = 1 − (1 − floor) · t / (T − 1)
    step          f(t) = 1 for t < step_at, else floor
    exponential   f(t) = floor + (1 − floor) · exp(−t / decay_tokens)
    constant      f(t) = floor (the ablation: a better prefill, then a static decode rank)
f is non-increasing with f(0) = 1. FLRC publishes no schedule: these shapes and their defaults are ours.

Ranks of a step (`order`):
    uniform   every module at ⌈r · f(t)⌉ (at least 1);
    fisher    one cost budget f(t) · C (C: the stored model's decode cost) spent on the directions FLRA's
              loss model values most per parameter (gains w_u σ_i² / cost, allocators/flra.py), as a
              prefix of each module: low-Fisher modules shrink first.

Decode cost: parameters of the compressed matrices touched per generated token, r′(n + M) per module
(a shared projection's A counts once), averaged over the T generated tokens. lm_head, embeddings and
attention scores are not compressed and equal in every variant, so they are left out.

Cost-matched mode: given a target average cost, the schedule's floor is solved (bisection; cost is
non-decreasing in the floor) as the largest floor whose average cost does not exceed the target.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field
from torch import nn

from rankfold.core.options import Strict
from rankfold.modules.progressive import rank_modules
from rankfold.modules.shared import SharedProjection


class DecodeSchedule(Strict):
    """The schedule of the generation evaluator's `progressive:` entry (see the module doc)."""

    shape: Literal["linear", "step", "exponential", "constant"] = "exponential"
    floor: float = Field(0.5, ge=0.0, le=1.0)         # f's lowest value; solved when target_ratio is set
    step_at: int = Field(8, ge=1)                     # step: full rank for tokens 0 … step_at − 1
    decay_tokens: float = Field(8.0, gt=0.0)          # exponential: 1/e decay length, in tokens
    # Cost-matched: the average decode cost equals that of a static model at this compression ratio,
    # (1 − target_ratio) × the dense parameters of the compressed matrices.
    target_ratio: float | None = Field(None, gt=0.0, lt=1.0)
    order: Literal["uniform", "fisher"] = "uniform"


@dataclass(frozen=True)
class DecodeUnit:
    """One module whose active rank PLRD sets: a low-rank linear or a shared projection."""

    name: str
    rank: int                       # stored rank
    cost_per_rank: int              # n + M: parameters touched per direction
    dense_params: int               # Σ m·n of its dense members
    gains: torch.Tensor | None = None  # FLRA's loss removed per parameter of directions 1 … rank (fisher order)


def decode_units(model: nn.Module, gains: dict | None = None) -> list[DecodeUnit]:
    """The model's rank modules as DecodeUnits (cost r′(n + M), dense Σ m·n); `gains` by module path."""
    units = []
    for name, module in rank_modules(model).items():
        rows = (sum(m.out_features for m in module._members) if isinstance(module, SharedProjection)
                else module.out_features)
        units.append(DecodeUnit(name, module.rank, module.in_features + rows, rows * module.in_features,
                                None if gains is None else gains.get(name)))
    return units


def fraction(schedule: DecodeSchedule, t: int, steps: int) -> float:
    """f(t) for generated token t of `steps` (t = 0: the prefill, 1.0)."""
    if t <= 0:
        return 1.0
    if schedule.shape == "linear":
        return 1.0 - (1.0 - schedule.floor) * min(t, steps - 1) / max(steps - 1, 1)
    if schedule.shape == "constant":
        return schedule.floor
    if schedule.shape == "step":
        return 1.0 if t < schedule.step_at else schedule.floor
    return schedule.floor + (1.0 - schedule.floor) * math.exp(-t / schedule.decay_tokens)


def uniform_ranks(units: list[DecodeUnit], f: float) -> dict[str, int]:
    """Every module at ⌈r · f⌉, at least 1 (a 1e-9 slack keeps f = k/r from rounding up to k + 1)."""
    return {u.name: min(u.rank, max(1, math.ceil(u.rank * f - 1e-9))) for u in units}


class FisherOrder:
    """Directions of every unit sorted by gain per parameter (ties keep each unit's own order), so the
    ranks for any cost budget are a prefix sum and a search away. Needs every unit's `gains`."""

    def __init__(self, units: list[DecodeUnit]):
        missing = [u.name for u in units if u.gains is None or u.gains.numel() < u.rank]
        if missing:
            raise ValueError(f"order 'fisher' needs FLRA's gains for every module; missing for {missing[:3]}"
                             f"{' …' if len(missing) > 3 else ''} (a checkpoint compressed with "
                             "target.allocation.kind fisher records them)")
        self.units = units
        # Every unit keeps its first direction; the rest compete. cummin: a later direction never leads.
        gains = [torch.cummin(u.gains[1:u.rank].to(torch.float64), 0).values for u in units]
        owner = torch.cat([torch.full((g.numel(),), k, dtype=torch.int64) for k, g in enumerate(gains)])
        order = torch.sort(torch.cat(gains), descending=True, stable=True).indices
        self.owner = owner[order]
        costs = torch.tensor([u.cost_per_rank for u in units], dtype=torch.int64)
        self.base = int(costs.sum())
        self.cumulative = torch.cumsum(costs[self.owner], 0)

    def ranks(self, budget: float) -> dict[str, int]:
        """Ranks whose cost is at most max(budget, one direction per unit)."""
        taken = int(torch.searchsorted(self.cumulative, budget - self.base, right=True))
        counts = torch.bincount(self.owner[:taken], minlength=len(self.units))
        return {u.name: 1 + int(c) for u, c in zip(self.units, counts)}


def full_cost(units: list[DecodeUnit]) -> int:
    return sum(u.rank * u.cost_per_rank for u in units)


def cost_of(units: list[DecodeUnit], ranks: dict[str, int]) -> int:
    return sum(ranks[u.name] * u.cost_per_rank for u in units)


def step_ranks(schedule: DecodeSchedule, units: list[DecodeUnit], steps: int,
               order: FisherOrder | None = None) -> list[dict[str, int]]:
    """Active ranks of every unit for generated tokens 0 … steps − 1."""
    if schedule.order == "fisher" and order is None:
        order = FisherOrder(units)
    total = full_cost(units)
    out = []
    for t in range(steps):
        f = fraction(schedule, t, steps)
        if f >= 1.0:
            out.append({u.name: u.rank for u in units})
        else:
            out.append(order.ranks(f * total) if schedule.order == "fisher" else uniform_ranks(units, f))
    return out


def average_cost(schedule: DecodeSchedule, units: list[DecodeUnit], steps: int,
                 order: FisherOrder | None = None) -> float:
    """Mean decode cost (parameters touched per generated token) over `steps` tokens."""
    return sum(cost_of(units, r) for r in step_ranks(schedule, units, steps, order)) / steps


def target_cost(schedule: DecodeSchedule, units: list[DecodeUnit]) -> float:
    return (1.0 - schedule.target_ratio) * sum(u.dense_params for u in units)


def solve_floor(schedule: DecodeSchedule, units: list[DecodeUnit], steps: int, iterations: int = 40) -> DecodeSchedule:
    """`schedule` with the largest floor whose average decode cost ≤ the target (target_ratio unset:
    unchanged). ValueError when the target is out of reach: the stored model is already cheaper, or
    even floor 0 costs more (the shape spends too many tokens near full rank)."""
    if schedule.target_ratio is None:
        return schedule
    order = FisherOrder(units) if schedule.order == "fisher" else None
    target = target_cost(schedule, units)
    at = lambda floor: average_cost(schedule.model_copy(update={"floor": floor}), units, steps, order)  # noqa: E731
    _check_reachable(schedule, steps, full_cost(units), at(0.0), target)
    low, high = 0.0, 1.0
    for _ in range(iterations):
        mid = (low + high) / 2
        low, high = (mid, high) if at(mid) <= target else (low, mid)
    return schedule.model_copy(update={"floor": low})


def check_schedule(schedule: DecodeSchedule, units: list[DecodeUnit], steps: int, *, gains: bool,
                   slack: float = 0.0) -> None:
    """What `solve_floor` would refuse, decided before any model loads from the decode units of the
    model's layout (ranks and shapes; no gains needed): order 'fisher' on a model without FLRA's gains,
    a target the stored model already meets, one that even floor 0 misses. `slack`: parameters per
    token by which the real model's costs may differ from `units`' (an allocator sets the ranks later;
    the fisher order is estimated with the uniform one): only a miss beyond it is refused.
    Raises ValueError naming the schedule's field."""
    if schedule.order == "fisher" and not gains:
        raise ValueError("progressive.order = 'fisher' needs FLRA's decode gains, which this model does not have "
                         "(they come with target.allocation.kind flra); use order 'uniform'")
    if schedule.target_ratio is None:
        return
    if schedule.order == "fisher":  # a budget f·C spent in any order costs f·C to within one direction per unit
        slack += sum(u.cost_per_rank for u in units)
        schedule = schedule.model_copy(update={"order": "uniform"})
    lowest = average_cost(schedule.model_copy(update={"floor": 0.0}), units, steps)
    _check_reachable(schedule, steps, full_cost(units) + slack, lowest - slack, target_cost(schedule, units))


def _check_reachable(schedule: DecodeSchedule, steps: int, stored: float, lowest: float, target: float) -> None:
    if stored <= target:
        raise ValueError(f"progressive.target_ratio = {schedule.target_ratio}: the stored model already costs "
                         f"{stored:.0f} ≤ the target {target:.0f} parameters per token; store a more compressed "
                         "model or set a higher target_ratio")
    if lowest > target:
        raise ValueError(f"progressive.target_ratio = {schedule.target_ratio}: even floor 0 costs {lowest:.0f} > "
                         f"{target:.0f} parameters per token with shape {schedule.shape!r} over {steps} tokens; "
                         "decay sooner (step_at / decay_tokens) or target less")
