"""Uniform allocation: for a target ratio, each layer's compressed modules and their ranks.

A method decides the structure — baselines factor each matrix alone; Cat shares one projection per
input group; Skip removes an identity block — and the structure decides the largest rank that fits
(1 − ratio) of the dense parameters of the matrices it replaces.
"""

from __future__ import annotations

from rankfold.methods.ranks import rank_for_ratio
from rankfold.methods.skipcat import cat_rank, skip_rank
from rankfold.modules.layout import CompressedModule

SHARES_INPUT = {"svd": False, "asvd": False, "svd_llm": False, "cat": True, "skip": False, "skipcat": True}
SKIPS_BLOCK = {"svd": False, "asvd": False, "svd_llm": False, "cat": False, "skip": True, "skipcat": True}


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def plan_layer(method: str, groups: list[tuple[str, tuple[str, ...]]], shapes: dict[str, tuple[int, int]],
               ratio: float) -> list[CompressedModule]:
    """`groups`: (group name, member paths) of linears that read one input; `shapes`: (out, in) of
    every matrix to compress (members absent from it stay dense)."""
    if method not in SHARES_INPUT:
        raise ValueError(f"no allocation rule for method {method!r}")
    share, skip = SHARES_INPUT[method], SKIPS_BLOCK[method]
    modules = []
    for group_name, members in groups:
        members = [m for m in members if m in shapes]
        units = [members] if share and len(members) > 1 else [[m] for m in members]
        for unit in units:
            n, rows = shapes[unit[0]][1], sum(shapes[m][0] for m in unit)
            if skip:
                shared_path = f"{_parent(unit[0])}.{group_name}" if len(unit) > 1 else f"{unit[0]}_in"
                modules.append(CompressedModule("shared", tuple(unit), skip_rank(n, rows, ratio), shared_path, True))
            elif len(unit) > 1:
                modules.append(CompressedModule("shared", tuple(unit), cat_rank(n, rows, ratio),
                                                f"{_parent(unit[0])}.{group_name}"))
            else:
                modules.append(CompressedModule("lowrank", tuple(unit), rank_for_ratio(rows, n, ratio)))
    return modules
