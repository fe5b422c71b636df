"""Uniform allocation: for a target ratio, each layer's compressed modules and their ranks.

A method decides the structure — baselines factor each matrix alone; Cat shares one projection per
input group; Skip removes an identity block — and the structure decides the largest rank that fits
(1 − ratio) of the dense parameters of the matrices it replaces.
"""

from __future__ import annotations

from collections.abc import Mapping

from rankfold.methods.ranks import rank_for_ratio
from rankfold.methods.skipcat import cat_rank, skip_rank
from rankfold.modules.layout import CompressedModule

SHARES_INPUT = {"svd": False, "asvd": False, "svd_llm": False, "cat": True, "skip": False, "skipcat": True}
SKIPS_BLOCK = {"svd": False, "asvd": False, "svd_llm": False, "cat": False, "skip": True, "skipcat": True}


def _parent(path: str) -> str:
    return path.rpartition(".")[0]


def plan_layer(method: str, groups: list[tuple[str, tuple[str, ...]]], shapes: dict[str, tuple[int, int]],
               ratio: float, ranks: Mapping[str, int] | None = None) -> list[CompressedModule]:
    """`groups`: (group name, member paths) of linears that read one input; `shapes`: (out, in) of
    every matrix to compress (members absent from it stay dense).

    Without `ranks`, every module gets the largest rank that fits (1 − ratio) of its dense
    parameters. With `ranks` (a global allocator's answer, keyed by matrix path), every compressed
    matrix takes its given rank instead; members of one shared projection must agree on it."""
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
                rank = skip_rank(n, rows, ratio) if ranks is None else _given_rank(ranks, unit, n, rows)
                modules.append(CompressedModule("shared", tuple(unit), rank, shared_path, True))
            elif len(unit) > 1:
                rank = cat_rank(n, rows, ratio) if ranks is None else _given_rank(ranks, unit, n, rows)
                modules.append(CompressedModule("shared", tuple(unit), rank, f"{_parent(unit[0])}.{group_name}"))
            else:
                rank = rank_for_ratio(rows, n, ratio) if ranks is None else _given_rank(ranks, unit, n, rows)
                modules.append(CompressedModule("lowrank", tuple(unit), rank))
    if ranks is not None:
        unknown = sorted(set(ranks) - {m for module in modules for m in module.members})
        if unknown:
            raise ValueError(f"ranks given for matrices that are not compressed here: {', '.join(unknown)}")
    return modules


def _given_rank(ranks: Mapping[str, int], unit: list[str], n: int, rows: int) -> int:
    """The allocator's rank for one module, checked: present, agreed by every member, 1 ≤ r ≤ min(n, M)."""
    missing = [m for m in unit if m not in ranks]
    if missing:
        raise ValueError(f"no rank given for {', '.join(missing)}")
    given = {m: ranks[m] for m in unit}
    if len(set(given.values())) > 1:
        raise ValueError(f"members of one shared projection need one rank; got {given}")
    rank = given[unit[0]]
    if not isinstance(rank, int) or isinstance(rank, bool) or not 1 <= rank <= min(n, rows):
        raise ValueError(f"rank of {', '.join(unit)} = {rank!r}: must be an integer in [1, {min(n, rows)}]")
    return rank
