"""FLRA (FLRC's Fisher layer-wise rank allocation, arXiv:2510.09332 — METHODS.md "FLRC"): one parameter
budget over every compressed matrix.

Model of the loss. Truncating a whitened factorisation (SVD-LLM; Cat and Skip use the same one)
to rank r changes the outputs on the calibration inputs by exactly the spectrum's tail,
‖ΔW X‖² = Σ_{i>r} σ_i². To second order the loss grows by ½ Σ_ij F_ij ΔW_ij² with F the diagonal
empirical Fisher. Taking the output gradients δ and inputs x as uncorrelated (F_ij ≈ E δ_i² · E x_j²)
and δ as isotropic over the m output rows gives
    Δℒ_u(r) ≈ w_u · Σ_{i>r} σ_i²,    w_u = F_u / (m_u · tr G_u),
F_u = Σ_ij F_ij the matrix's Fisher score and G_u its input Gram (so tr G_u = Σ_t ‖x_t‖²). Constant
factors common to all matrices cancel; they never change which matrix gets the next rank.

Allocation. Each unit (a matrix, or a shared projection's members together) gets ranks one at a
time, most loss removed per parameter first, until no further rank fits the budget. Gains per
parameter fall with r (σ_i² is non-increasing and a rank's cost is constant, or falls — skip —
and is then made monotone), so this greedy order is the optimum of the relaxed problem; it stops
within one rank's cost of the budget and never exceeds it.

Stages: `fisher` (streamed backward, workers/fisher_backward.py) and `spectra` (`group_spectra` below, one
task per input group), then this allocator on the driver.

    target: {ratio: 0.2, allocation: {kind: flra, fisher_samples: 32, fisher_batch_size: 1, min_rank_fraction: 0.01}}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

import torch
from pydantic import Field

from rankfold.allocators.registry import AllocationOptions, AllocationProblem, Allocator, Ranks, register_allocator
from rankfold.methods.registry import METHODS, Method
from rankfold.methods.statistics import InputStats
from rankfold.methods.structure import max_useful_rank
from rankfold.methods.whitening import whitening_factor
from rankfold.modules.layout import CompressedModule, lowrank_params

VERSION = "2"  # 2: records decode_gains for progressive decoding
BATCHES_KEY = "batches"    # Fisher artifacts: how many batches the sums run over
GRAM_TRACE_KEY = "gram_trace"


class FisherAllocation(AllocationOptions):
    """FLRA: ranks go where the dense model's loss is most sensitive (needs a whitened method)."""

    kind: Literal["flra"]
    renamed_from: ClassVar[tuple[str, ...]] = ("fisher",)  # the stage kind `fisher` is its Fisher pass
    # Calibration sequences the Fisher pass uses (the first ones of the calibration sample) and how
    # many make one batch: F = mean over batches of Σ (∂ℒ_batch/∂W)².
    fisher_samples: int = Field(32, ge=1)
    fisher_batch_size: int = Field(1, ge=1)
    # No matrix gets fewer than this fraction of its full rank min(m, n).
    min_rank_fraction: float = Field(0.01, ge=0.0, lt=1.0)


@dataclass(frozen=True)
class RankUnit:
    """One compressed module: its whitened spectrum σ² (descending), weight w and cost model."""

    name: str
    energy: torch.Tensor  # σ_i², descending, float64
    weight: float         # w = F / (m · tr G)
    rows: int             # output rows of all members together (M)
    cols: int             # shared input width (n)
    skip: bool = False    # skip layout: lowrank_params(r) = r(n + M − r); else r(n + M)
    min_rank: int = 1

    def params(self, rank):
        return lowrank_params(rank, self.rows, self.cols, self.skip)

    @property
    def max_rank(self) -> int:
        """Full rank, and for a plain factorisation no more than what stores fewer numbers than dense."""
        return max(self.min_rank, min(self.energy.numel(), max_useful_rank(self.rows, self.cols, self.skip)))


def loss_weight(fisher: float, rows: int, gram_trace: float) -> float:
    """w = F / (rows · tr G). An expert no calibration token reached has neither input nor gradient:
    weight 0 (dropping its directions costs nothing measured; it keeps its minimum rank). A zero Gram
    with a nonzero Fisher score is inconsistent statistics: ValueError."""
    if gram_trace <= 0.0:
        if fisher == 0.0:
            return 0.0
        raise ValueError(f"input Gram has trace {gram_trace}: no calibration signal reached this matrix")
    return fisher / (rows * gram_trace)


def needs_factor(weight: torch.Tensor) -> bool:
    """Whether `whitened_energy` of this (m, n) weight uses the Cholesky factor (m > n)."""
    return weight.shape[0] > weight.shape[1]


def whitened_energy(weight: torch.Tensor, gram: torch.Tensor, factor: torch.Tensor | None = None) -> torch.Tensor:
    """σ_i² of W·S (S Sᵀ = G), as eigenvalues instead of an SVD: of W G Wᵀ (m×m, no factorisation
    of G) when m ≤ n, else of Sᵀ(WᵀW)S (n×n) with S = `factor` (computed here when not given; pass
    it to share one Cholesky among the weights of a group). Descending, float64, ≥ 0."""
    weight, gram = weight.to(torch.float64), gram.to(torch.float64)
    if not needs_factor(weight):
        product = weight @ gram @ weight.T
    else:
        factor = whitening_factor(gram.clone()) if factor is None else factor
        product = factor.T @ (weight.T @ weight) @ factor
    product = (product + product.T) / 2
    return torch.linalg.eigvalsh(product).flip(0).clamp_min(0.0)


def allocate_ranks(units: list[RankUnit], budget: int) -> dict[str, int]:
    """Ranks per unit with Σ params ≤ `budget`, greedy on loss removed per parameter (see module doc).
    Raises ValueError when even the minimum ranks do not fit."""
    ranks = {unit.name: unit.min_rank for unit in units}
    spent = sum(unit.params(unit.min_rank) for unit in units)
    if spent > budget:
        raise ValueError(f"rank budget {budget} parameters cannot hold even the minimum ranks ({spent} parameters)")
    candidates = [_steps(k, unit) for k, unit in enumerate(units)]
    if not any(c[0].numel() for c in candidates):
        return ranks
    ratio = torch.cat([c[0] for c in candidates])
    cost = torch.cat([c[1] for c in candidates])
    owner = torch.cat([torch.full_like(c[1], k) for k, c in enumerate(candidates)])
    order = torch.sort(ratio, descending=True, stable=True).indices  # stable: a unit's ranks stay in order
    cost, owner = cost[order], owner[order]
    fits = int(torch.searchsorted(torch.cumsum(cost, 0), budget - spent, right=True))
    for k, count in zip(*torch.unique(owner[:fits], return_counts=True)):
        ranks[units[int(k)].name] += int(count)
    spent += int(cost[:fits].sum())
    blocked: set[int] = set()  # units whose next rank did not fit: their later ranks must wait too
    for step_cost, k in zip(cost[fits:].tolist(), owner[fits:].tolist()):
        if k in blocked:
            continue
        if spent + step_cost <= budget:
            ranks[units[k].name] += 1
            spent += step_cost
        else:
            blocked.add(k)
            if len(blocked) == len(units):
                break
    return ranks


def _steps(index: int, unit: RankUnit) -> tuple[torch.Tensor, torch.Tensor]:
    """(gain per parameter, parameter cost) of each rank above the unit's minimum, gains made
    non-increasing (a later rank never jumps ahead of an earlier one)."""
    ranks = torch.arange(unit.min_rank + 1, unit.max_rank + 1)
    if not ranks.numel():
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    cost = unit.params(ranks) - unit.params(ranks - 1)
    gain = unit.weight * unit.energy[ranks - 1]
    ratio = gain / cost.clamp_min(1).to(torch.float64)
    return torch.cummin(ratio, 0).values, cost


def fisher_scores(tensors: dict[str, torch.Tensor]) -> dict[str, float]:
    """{projection path: F = mean over batches of Σ (∂ℒ/∂W)²} from a layer's reduced Fisher sums."""
    batches = int(tensors[BATCHES_KEY][0])
    return {key.removesuffix(".fisher"): float(value) / batches
            for key, value in tensors.items() if key.endswith(".fisher")}


def unit_name(module: CompressedModule) -> str:
    """A compressed module's name for allocation: its members, joined (paths inside the layer)."""
    return "+".join(module.members)


def group_spectra(weights: dict[str, torch.Tensor], stats: InputStats,
                  modules: list[CompressedModule]) -> dict[str, torch.Tensor]:
    """The `spectra` stage of one input group: whitened spectra σ² of its modules (members stacked,
    as Cat factorises them) and the trace of the input Gram — what `allocate_fisher` trades."""
    gram = stats.symmetric_gram()
    stacked = {unit_name(m): torch.cat([weights[p] for p in m.members]) for m in modules}
    factor = whitening_factor(gram.clone()) if any(map(needs_factor, stacked.values())) else None  # once a group
    spectra = {f"{name}.energy": whitened_energy(weight, gram, factor) for name, weight in stacked.items()}
    spectra[GRAM_TRACE_KEY] = gram.diagonal().sum().reshape(1)
    return spectra


def spectra_bytes(width: int, rows: list[int]) -> int:
    """Estimated peak host bytes of `group_spectra` for an input group of `width` n whose units stack
    `rows` rows each, counted in float64: the Gram, the Cholesky factor and its input copy when a unit
    has more rows than n, every unit's stacked weight, and the largest unit's products (W G Wᵀ: W G and
    the m×m result; Sᵀ WᵀW S: n×n three times). Llama-3-70B's down_proj group: 13.3 GB; gate/up: 8.9 GB."""
    n = width
    unit = max((m * n + 3 * n * n) if m > n else (2 * m * n + 2 * m * m) for m in rows)
    return 8 * (n * n + (2 * n * n if any(m > n for m in rows) else 0) + sum(rows) * n + unit)


def spectra_flops(width: int, rows: list[int]) -> float:
    """Estimated floating-point operations of `group_spectra` (what executors schedule by): the Cholesky
    when a unit is taller than wide (n³/3), and per unit its product and eigvalsh — m n² + 2 n³ + 4 n³
    (n×n) when m > n, else 2 m n² + 4 m³ (m×m)."""
    n = width
    units = sum((m * n * n + 6 * n ** 3) if m > n else (2 * m * n * n + 4 * m ** 3) for m in rows)
    return float((n ** 3 / 3 if any(m > n for m in rows) else 0) + units)


def _min_rank(options: FisherAllocation, rows: int, cols: int) -> int:
    return max(1, math.ceil(options.min_rank_fraction * min(rows, cols)))


def _dims(module: CompressedModule, shapes: dict[str, tuple[int, int]]) -> tuple[int, int]:
    return sum(shapes[m][0] for m in module.members), shapes[module.members[0]][1]


def _units(options: FisherAllocation, problem: AllocationProblem) -> list[tuple[RankUnit, int, CompressedModule]]:
    """Every module of the layout as a unit (spectrum, Fisher weight, cost), with its layer and module."""
    out = []
    for i, modules in problem.layout.items():
        scores = fisher_scores(problem.read("fisher", i, None))
        for group in dict.fromkeys(m.group for m in modules):
            spectra = problem.read("spectra", i, group)
            trace = float(spectra[GRAM_TRACE_KEY][0])
            for module in (m for m in modules if m.group == group):
                rows, cols = _dims(module, problem.shapes[i])
                unit = RankUnit(problem.layer_prefix.format(i=i) + unit_name(module),
                                spectra[f"{unit_name(module)}.energy"],
                                loss_weight(sum(scores[m] for m in module.members), rows, trace), rows, cols,
                                module.skip, min_rank=_min_rank(options, rows, cols))
                out.append((unit, i, module))
    return out


def allocate_fisher(options: FisherAllocation, problem: AllocationProblem) -> Ranks:
    """Every module of the layout becomes a unit (spectrum, Fisher weight, cost); one budget —
    (1 − ratio) of the dense parameters — is split over all of them."""
    units = _units(options, problem)
    by_layer: Ranks = {i: {} for i in problem.shapes}
    ranks = allocate_ranks([unit for unit, _, _ in units], problem.budget)
    for unit, i, module in units:
        by_layer[i].update({m: ranks[unit.name] for m in module.members})
    return by_layer


def decode_gains(options: FisherAllocation, problem: AllocationProblem, ranks: Ranks) -> dict[str, torch.Tensor]:
    """FLRA's loss removed per parameter, w · σ_i² / (params(i) − params(i − 1)), of directions 1 … r of
    every module at its allocated rank r, keyed by the path of the module that holds the rank (the
    linear, or the shared projection): the order in which PLRD (methods/plrd.py) keeps directions."""
    out = {}
    for unit, i, module in _units(options, problem):
        rank = ranks[i][module.members[0]]
        steps = torch.arange(1, rank + 1)
        cost = (unit.params(steps) - unit.params(steps - 1)).clamp_min(1).to(torch.float64)
        path = problem.layer_prefix.format(i=i) + (module.shared_path or module.members[0])
        out[path] = (unit.weight * unit.energy[:rank] / cost).to(torch.float32)
    return out


def check_spec(options: FisherAllocation, method: Method, calibration_samples: int) -> None:
    """A whitened method (the loss model is its spectrum's tail) and enough calibration sequences."""
    if not method.whitened:
        whitened = ", ".join(m.name for m in METHODS if m.whitened)
        raise ValueError(f"target.allocation.kind 'flra' needs a whitened method ({whitened}), not "
                         f"method.name {method.name!r}")
    if options.fisher_samples > calibration_samples:
        raise ValueError(f"target.allocation.fisher_samples = {options.fisher_samples} exceeds "
                         f"calibration.num_samples = {calibration_samples}")


def check_budget(options: FisherAllocation, problem: AllocationProblem) -> None:
    """The minimum ranks fit the budget (decidable from the shapes, before any stage runs)."""
    floor = sum(lowrank_params(_min_rank(options, *_dims(m, problem.shapes[i])), *_dims(m, problem.shapes[i]), m.skip)
                for i, modules in problem.layout.items() for m in modules)
    if floor > problem.budget:
        raise ValueError(f"target.ratio = {problem.ratio} with target.allocation.min_rank_fraction = "
                         f"{options.min_rank_fraction}: the minimum ranks alone need {floor} parameters, "
                         f"over the budget of {problem.budget}")


register_allocator(Allocator("flra", FisherAllocation, allocate_fisher, VERSION, stages=("fisher", "spectra"),
                             check_spec=check_spec, check=check_budget, gains=decode_gains))
