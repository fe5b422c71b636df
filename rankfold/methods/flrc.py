"""FLRA (FLRC's Fisher layer-wise rank allocation): one parameter budget over every compressed matrix.

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
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rankfold.methods.whitening import whitening_factor


@dataclass(frozen=True)
class RankUnit:
    """One compressed module: its whitened spectrum σ² (descending), weight w and cost model."""

    name: str
    energy: torch.Tensor  # σ_i², descending, float64
    weight: float         # w = F / (m · tr G)
    rows: int             # output rows of all members together (M)
    cols: int             # shared input width (n)
    skip: bool = False    # skip layout: params(r) = r(n + M − r); else r(n + M)
    min_rank: int = 1

    def params(self, rank: int) -> int:
        return rank * (self.cols + self.rows - rank) if self.skip else rank * (self.cols + self.rows)

    @property
    def max_rank(self) -> int:
        """Full rank, and for a plain factorisation no more than what stores fewer numbers than dense."""
        full = min(self.rows, self.cols, self.energy.numel())
        if self.skip:
            return full
        return max(self.min_rank, min(full, (self.rows * self.cols) // (self.rows + self.cols)))


def loss_weight(fisher: float, rows: int, gram_trace: float) -> float:
    if gram_trace <= 0.0:
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
    width = unit.cols + unit.rows
    cost = width - (2 * ranks - 1) if unit.skip else torch.full_like(ranks, width)  # params(r) − params(r−1)
    gain = unit.weight * unit.energy[ranks - 1]
    ratio = gain / cost.clamp_min(1).to(torch.float64)
    return torch.cummin(ratio, 0).values, cost
