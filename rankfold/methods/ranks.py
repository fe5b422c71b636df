"""Ranks from a target compression ratio, and the parameter accounting reported next to them."""

from __future__ import annotations

import math


def lowrank_params(rows: int, cols: int, rank: int) -> int:
    """Parameters of W ≈ B A with B: rows×rank and A: rank×cols."""
    return rank * (rows + cols)


def rank_for_ratio(rows: int, cols: int, ratio: float) -> int:
    """Largest rank whose factors keep at most (1 - ratio) of the dense parameters: ⌊p·m·n/(m+n)⌋.

    At least 1: a rank-0 matrix is not a low-rank layer, it is a deleted one.
    """
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"compression ratio must lie in (0, 1), got {ratio}")
    kept = 1.0 - ratio
    rank = math.floor(kept * rows * cols / (rows + cols) + 1e-9)
    return max(1, min(rank, rows, cols))

