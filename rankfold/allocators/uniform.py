"""Uniform allocation: every compressed module keeps (1 − ratio) of its dense parameters, the largest
rank its structure allows (methods/structure.py). Needs no stage of its own.

    target: {ratio: 0.2, allocation: {kind: uniform}}
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from rankfold.allocators.registry import (
    AllocationOptions,
    AllocationProblem,
    Allocator,
    Ranks,
    ranks_of,
    register_allocator,
)
from rankfold.methods.structure import dense_params, module_params

VERSION = "1"


class UniformAllocation(AllocationOptions):
    kind: Literal["uniform"] = "uniform"


def allocate_uniform(options: UniformAllocation, problem: AllocationProblem) -> Ranks:
    return ranks_of(problem.layout)  # the layout already carries the uniform rule's ranks


def check_uniform(options: UniformAllocation, problem: AllocationProblem) -> None:
    """A ratio the structure cannot meet is an error, not a silently larger model: ranks never fall
    below 1, so a ratio near 1 can leave more parameters than the budget."""
    kept = sum(module_params(m, problem.shapes[i]) for i, modules in problem.layout.items() for m in modules)
    slack = sum(len(modules) for modules in problem.layout.values())  # float rounding of each module's share
    if kept > problem.budget + slack:
        dense = dense_params(problem.shapes)
        floor = sum(module_params(replace(m, rank=1), problem.shapes[i])
                    for i, modules in problem.layout.items() for m in modules)
        raise ValueError(f"target.ratio = {problem.ratio}: method {problem.method.name!r} cannot meet it — the "
                         f"uniform ranks keep {kept} parameters, over the budget of {problem.budget}; the largest "
                         f"ratio it can reach is {1 - floor / dense:.4f} (rank 1 everywhere)")


register_allocator(Allocator("uniform", UniformAllocation, allocate_uniform, VERSION, check=check_uniform))
