"""Decompose stage: one group of linears that share an input -> low-rank factors for each member.

The group is the unit because the methods share per-input work: SVD-LLM whitens once per group.
"""

from __future__ import annotations

from typing import Callable

import torch

from rankfold.jobs.spec import AsvdOptions, MethodSpec, SvdLlmOptions, SvdOptions
from rankfold.methods.asvd import asvd_factors
from rankfold.methods.svd import svd_factors
from rankfold.methods.svd_llm import svd_llm_factors
from rankfold.methods.whitening import whitening_factor
from rankfold.workers.calibrate import InputStats

Factors = tuple[torch.Tensor, torch.Tensor]  # (B: m×r, A: r×n), float64
MatrixDecomposer = Callable[[torch.Tensor, int], Factors]


def _svd(_options: SvdOptions, _stats: InputStats) -> MatrixDecomposer:
    return svd_factors


def _asvd(options: AsvdOptions, stats: InputStats) -> MatrixDecomposer:
    mean_abs = stats.mean_abs
    return lambda weight, rank: asvd_factors(weight, mean_abs, rank, options.alpha)


def _svd_llm(_options: SvdLlmOptions, stats: InputStats) -> MatrixDecomposer:
    factor = whitening_factor(stats.gram)  # once for the whole group
    return lambda weight, rank: svd_llm_factors(weight, factor, rank)


# method name -> (options, the group's input statistics) -> per-matrix decomposer
_GROUP_PREPARERS: dict[str, Callable[..., MatrixDecomposer]] = {"svd": _svd, "asvd": _asvd, "svd_llm": _svd_llm}


def decompose_group(method: MethodSpec, weights: dict[str, torch.Tensor], stats: InputStats,
                    ranks: dict[str, int]) -> dict[str, Factors]:
    """Factors for every member of one input group; `weights` and `ranks` are keyed by member path."""
    try:
        prepare = _GROUP_PREPARERS[method.name]
    except KeyError:
        raise ValueError(f"unknown method {method.name!r} (known: {', '.join(_GROUP_PREPARERS)})") from None
    decompose = prepare(method, stats)
    return {path: decompose(weights[path], ranks[path]) for path in ranks}
