"""Palu (arXiv:2407.21118): a low-rank KV cache. Pure math — group-head low-rank decomposition
(G-LRD), the KV rank search and the Walsh–Hadamard rotation of the latents.

G-LRD. k_proj and v_proj (rows = KV heads × head_dim) are split by output heads into groups of
`group_heads` KV heads; each group's rows W_g (g·d, n) are factored with the same whitening as
SVD-LLM: with S Sᵀ = X Xᵀ (the layer input's calibration Gram), SVD(W_g S) = U Σ Vᵀ and

    L_g = U_r Σ_r^½  (g·d, r),   R_g = Σ_r^½ V_rᵀ S⁻¹  (r, n),   ‖(W_g − L_g R_g) X‖_F² = Σ_{i>r} σ_i².

The cache then keeps the latent h_g = R_g x (r numbers per group and token) instead of g·d keys or
values. group_heads = 1 is Palu's M-LRD (per head), group_heads = num_key_value_heads its J-LRD.

Rank search. The kept fraction of the cache's hidden size is one budget over every layer, k and v,
in units of latent dimensions (one dimension = one number per token). Each (layer, k|v, group)
gets ranks in chunks of `multiple` directions, the chunk that removes the most estimated loss first,
Δℒ ≈ w · Σ σ_i² of the chunk with w = F / (g·d · tr G) — the Fisher score of the group's rows over
its size and input energy, FLRA's model (allocators/flra.py) applied to head groups. σ² falls
with the index, so the greedy order is the optimum of the relaxed problem; it never exceeds the budget
and stops within one chunk of it. Palu's own rule (ranks ∝ √Fisher, rounded to 32) can overshoot.

Hadamard. For quantised latents, an orthonormal Walsh–Hadamard H (block-diagonal, blocks of the
largest power of two dividing r) is folded into the factors: L' = L Hᵀ, R' = H R, so L' R' = L R
exactly and the cached latent H h has its outliers spread over the block before rounding.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import Literal

import torch
from pydantic import Field, model_validator

from rankfold.methods.kv_registry import KVCacheOptions
from rankfold.methods.linalg import reduced_svd, singular_values
from rankfold.methods.svd import split_singular
from rankfold.methods.whitening import apply_inverse_right

VERSION = "1"


class PaluOptions(KVCacheOptions):
    """The job spec's `kv_cache` part: Palu's low-rank KV cache (k_proj and v_proj are Palu's: leave them
    out of target.matrices; the weight method compresses the rest).

        kv_cache: {name: palu, ratio: 0.5, group_heads: 1, bits: 3, hadamard: true}
    """

    name: Literal["palu"] = "palu"
    # Fraction of the cache's hidden size removed, over all layers, keys and values together.
    ratio: float = Field(gt=0.0, lt=1.0)
    # KV heads per decomposition group; must divide num_key_value_heads (1: per head, all: joint).
    group_heads: int = Field(1, ge=1)
    # fisher: chunks of rank go where w·σ² is largest (module docstring); uniform: one fraction everywhere.
    rank_search: Literal["fisher", "uniform"] = "fisher"
    # Ranks are multiples of this (or a group's full rank): hardware tiles want 8-32.
    rank_multiple: int = Field(8, ge=1)
    # Latent bits in the cache: 16 keeps the model dtype; 2, 3, 4 (1..8) quantise per token.
    bits: int = Field(16, ge=1, le=16)
    quant_group: int = Field(32, ge=8)   # numbers of a token's latent sharing one float16 minimum and step
    residual: int = Field(0, ge=0)       # newest tokens kept unquantised
    hadamard: bool = False               # fold a Walsh–Hadamard rotation into the factors
    # The rank search's Fisher pass: one pass with the allocator's when both ask for the same settings,
    # its own (stage kv_fisher) when they differ.
    fisher_samples: int = Field(32, ge=1)
    fisher_batch_size: int = Field(1, ge=1)

    @model_validator(mode="after")
    def _consistent(self) -> PaluOptions:
        if 8 < self.bits < 16:
            raise ValueError(f"bits = {self.bits}: use 1..8 to quantise latents or 16 to keep them unquantised")
        if self.bits < 16 and self.quant_group % 8:
            raise ValueError(f"quant_group = {self.quant_group} must be a multiple of 8 (codes pack 8 per byte)")
        if self.hadamard and self.rank_multiple & (self.rank_multiple - 1):
            raise ValueError(f"hadamard needs a power-of-two rank_multiple (its blocks divide every rank), got "
                             f"{self.rank_multiple}")
        return self


@dataclass(frozen=True)
class GroupFactors:
    """One head group's factors, float64: up (g·d, r) rebuilds the group's rows from the latent,
    down (r, n) makes the latent from the layer input."""

    up: torch.Tensor
    down: torch.Tensor

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def check_group_heads(group_heads: int, num_kv_heads: int) -> None:
    """ValueError naming the allowed sizes when `group_heads` does not divide the KV heads."""
    allowed = [g for g in range(1, num_kv_heads + 1) if num_kv_heads % g == 0]
    if group_heads not in allowed:
        raise ValueError(f"group_heads = {group_heads} does not divide num_key_value_heads = {num_kv_heads}; "
                         f"allowed: {', '.join(map(str, allowed))}")


def group_rows(weight: torch.Tensor, head_dim: int, group_heads: int) -> list[torch.Tensor]:
    """The (g·d, n) row blocks of a k_proj / v_proj weight (num_kv_heads·d, n), in head order."""
    width = head_dim * group_heads
    if weight.shape[0] % width:
        raise ValueError(f"{weight.shape[0]} rows do not split into groups of {group_heads} heads × {head_dim}")
    return list(weight.split(width, dim=0))


def group_spectra(weight: torch.Tensor, factor: torch.Tensor, head_dim: int, group_heads: int) -> list[torch.Tensor]:
    """σ² (descending, float64) of every group's whitened rows W_g S: the loss of each direction dropped."""
    return [singular_values(rows.to(torch.float64) @ factor).square() for rows in
            group_rows(weight, head_dim, group_heads)]


def group_factors(weight: torch.Tensor, factor: torch.Tensor, head_dim: int, group_heads: int,
                  ranks: list[int]) -> list[GroupFactors]:
    """G-LRD of a k_proj / v_proj weight (num_kv_heads·d, n) with the whitening factor S (n, n), lower
    triangular, S Sᵀ = G: one GroupFactors of rank ranks[k] per group k. Raises ValueError when a rank
    is outside 1..min(g·d, n) or the ranks do not match the groups."""
    blocks = group_rows(weight, head_dim, group_heads)
    if len(ranks) != len(blocks):
        raise ValueError(f"{len(ranks)} ranks for {len(blocks)} head groups")
    out = []
    for rows, rank in zip(blocks, ranks):
        if not 1 <= rank <= min(rows.shape):
            raise ValueError(f"rank {rank} outside 1..{min(rows.shape)} for a {tuple(rows.shape)} head group")
        u, s, vh = reduced_svd(rows.to(torch.float64) @ factor)
        up, down_white = split_singular(u, s, vh, rank)
        out.append(GroupFactors(up, apply_inverse_right(down_white, factor)))
    return out


def hadamard(n: int, dtype: torch.dtype = torch.float64, device: torch.device | None = None) -> torch.Tensor:
    """Orthonormal Sylvester–Hadamard matrix (n, n); n a power of two."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"a Walsh–Hadamard matrix needs a power-of-two size, got {n}")
    h = torch.ones(1, 1, dtype=dtype, device=device)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(n)


def hadamard_block(rank: int) -> int:
    """The rotation's block size for a latent of `rank`: the largest power of two dividing it."""
    return rank & -rank


def rotate(factors: GroupFactors) -> GroupFactors:
    """(L Hᵀ, H R) with H block-diagonal Walsh–Hadamard: the same product, a rotated latent."""
    block = hadamard_block(factors.rank)
    h = torch.block_diag(*[hadamard(block, device=factors.up.device)] * (factors.rank // block))
    return GroupFactors(factors.up @ h.T, h @ factors.down)


@dataclass(frozen=True)
class RankUnit:
    """One (layer, k|v, group): its whitened spectrum σ² (descending) and loss weight w."""

    key: tuple
    energy: torch.Tensor
    weight: float

    @property
    def full(self) -> int:
        return self.energy.numel()


def loss_weight(fisher: float, rows: int, gram_trace: float) -> float:
    """w = F / (rows · tr G): FLRA's per-unit weight of Σσ² (allocators/flra.py, module docstring)."""
    if gram_trace <= 0.0 or rows <= 0:
        raise ValueError(f"loss weight needs rows > 0 and a positive Gram trace, got {rows}, {gram_trace}")
    return float(fisher) / (rows * gram_trace)


def _chunks(full: int, multiple: int) -> list[int]:
    """Rank steps of one unit: multiples of `multiple`, the last one up to full rank."""
    steps = list(range(multiple, full, multiple))
    return steps + [full]


def uniform_ranks(units: list[RankUnit], budget: int, multiple: int) -> dict[tuple, int]:
    """The same split everywhere, blind to the spectra: every unit at the kept fraction of its full rank
    rounded down to `multiple` (at least one), then the chunks left in the budget one each to the
    units in order — the baseline the search is compared with, at the same budget (≤, within one chunk)."""
    keep = budget / sum(u.full for u in units)
    ranks = {u.key: min(u.full, max(multiple, int(keep * u.full + 1e-9) // multiple * multiple)) for u in units}
    left = budget - sum(ranks.values())
    for u in units:
        step = min(multiple, u.full - ranks[u.key])
        if 0 < step <= left:
            ranks[u.key], left = ranks[u.key] + step, left - step
    return ranks


def search_ranks(units: list[RankUnit], budget: int, multiple: int) -> dict[tuple, int]:
    """Ranks (multiples of `multiple`, or full) whose sum is ≤ `budget` latent dimensions, every unit
    keeping at least one chunk; chunks go out by estimated loss removed, w · Σ σ² over the chunk,
    largest first. Raises ValueError when even one chunk each exceeds the budget."""
    if multiple < 1:
        raise ValueError(f"rank multiple must be ≥ 1, got {multiple}")
    ranks = {u.key: _chunks(u.full, multiple)[0] for u in units}
    spent = sum(ranks.values())
    if spent > budget:
        raise ValueError(f"a KV budget of {budget} latent dimensions is below one rank multiple ({multiple}) per "
                         f"head group and k/v ({len(units)} of them, {spent} dimensions)")
    steps = {u.key: _chunks(u.full, multiple) for u in units}
    by_key = {u.key: u for u in units}

    def gain(key: tuple, index: int) -> float:
        unit, lo, hi = by_key[key], steps[key][index - 1], steps[key][index]
        return unit.weight * float(unit.energy[lo:hi].sum())

    heap = [(-gain(k, 1), n, k, 1) for n, k in enumerate(ranks) if len(steps[k]) > 1]
    heapq.heapify(heap)
    while heap:
        _, n, key, index = heapq.heappop(heap)
        cost = steps[key][index] - steps[key][index - 1]
        if spent + cost > budget:
            continue  # this unit's next chunk does not fit; smaller chunks elsewhere may
        ranks[key], spent = steps[key][index], spent + cost
        if index + 1 < len(steps[key]):
            heapq.heappush(heap, (-gain(key, index + 1), n, key, index + 1))
    return ranks


def kv_budget(full_dims: int, ratio: float) -> int:
    """Latent dimensions kept when `ratio` of the cache's hidden size (over all layers, k and v) goes."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"KV ratio must be in (0, 1), got {ratio}")
    return int(math.floor((1.0 - ratio) * full_dims + 1e-9))
