"""Structures of a compressed input group, the parameter cost of a rank under each, and the layout
of every layer (which linears become which low-rank modules, with what rank).

A method declares a structure — baselines factor each matrix alone; Cat shares one projection per
input group; Skip removes an identity block; Sparse adds a sparse matrix to a low-rank one (Wanda,
CAP) — and the structure decides which compressed modules a group becomes. What a rank costs is each
module kind's count (modules/layout.py: `lowrank_params`, `sparse_params`), which the uniform rule, the
global allocators and the report share.

A sparse entry costs its value plus its position. rankfold stores a position as an int32 flat index,
so by default an entry counts as 2 parameters (its exact storage in a float32 checkpoint; in bf16 the
index is worth two parameters' bytes, so the default still under-counts there). The convention of the
papers (Wanda, SparseGPT, CAP) counts 1 — `count_indices: false`; the report prints both.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from rankfold.modules.layout import CompressedModule, lowrank_params


def entry_cost(count_indices: bool) -> int:
    """Parameters one stored sparse entry counts as: value + int32 index (2), or the papers' 1."""
    return 2 if count_indices else 1


def rank_for_ratio(rows: int, cols: int, ratio: float, skip: bool = False) -> int:
    """Largest rank r ≤ min(rows, cols) whose parameters keep at most (1 − ratio)·rows·cols, at least 1
    (a rank-0 matrix is not a low-rank layer, it is a deleted one). `params` increases up to
    min(rows, cols) in both structures, so a bisection finds it; a 1e-9 rank of slack absorbs the
    float rounding of (1 − ratio)·rows·cols."""
    if not 0.0 < ratio < 1.0:
        raise ValueError(f"compression ratio must lie in (0, 1), got {ratio}")
    budget = (1.0 - ratio) * rows * cols
    fits = lambda r: lowrank_params(r, rows, cols, skip) <= budget + 1e-9 * (  # noqa: E731
        lowrank_params(r, rows, cols, skip) - lowrank_params(r - 1, rows, cols, skip))
    low, high = 0, min(rows, cols)  # fits(low) holds; find the largest r that fits
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return max(1, low)


@dataclass(frozen=True)
class Structure:
    """How a method lays out the linears of one input group."""

    share: bool  # one projection A for every member of the group (Cat)
    skip: bool   # the projection's identity block is neither stored nor multiplied (Skip)
    sparse: bool = False  # each matrix becomes B A + S (kind lowrank_sparse)

    def modules(self, group: str, members: list[str], shapes: dict[str, tuple[int, int]], ratio: float,
                ranks: Mapping[str, int] | None = None, cost: int = 2) -> list[CompressedModule]:
        """The group's compressed modules: the uniform rule's ranks, or a global allocator's `ranks`
        (for a sparse structure: [rank, nnz] per matrix; `cost`: parameters per sparse entry)."""
        if self.sparse:
            missing = [m for m in members if ranks is not None and m not in ranks]
            if missing:
                raise ValueError(f"no allocation given for {', '.join(missing)}")
            return [_sparse_module(group, m, shapes[m], ratio, None if ranks is None else ranks.get(m), cost)
                    for m in members]
        units = [members] if self.share and len(members) > 1 else [[m] for m in members]
        modules = []
        for unit in units:
            n, rows = shapes[unit[0]][1], sum(shapes[m][0] for m in unit)
            rank = rank_for_ratio(rows, n, ratio, self.skip) if ranks is None else _given_rank(ranks, unit, n, rows)
            if self.skip:
                shared_path = f"{_parent(unit)}.{group}" if len(unit) > 1 else f"{unit[0]}_in"
                modules.append(CompressedModule("shared", tuple(unit), rank, shared_path, True, group))
            elif len(unit) > 1:
                shared_path = f"{_parent(unit)}.{group}"
                modules.append(CompressedModule("shared", tuple(unit), rank, shared_path, group=group))
            else:
                modules.append(CompressedModule("lowrank", tuple(unit), rank, group=group))
        return modules


LOWRANK, SHARED, SKIP, SHARED_SKIP = Structure(False, False), Structure(True, False), Structure(False, True), \
    Structure(True, True)
SPARSE = Structure(False, False, sparse=True)


def _sparse_module(group: str, path: str, shape: tuple[int, int], ratio: float, given, cost: int) -> CompressedModule:
    """B A + S for one matrix. The uniform rule is unstructured pruning per output row (Wanda's
    comparison group): rank 0 and the same ⌊(1 − ratio)·n / cost⌋ entries in every row. `given`: an
    allocator's [rank, nnz], checked against the matrix."""
    rows, cols = shape
    if given is None:
        rank, nnz = 0, rows * min(cols, int((1.0 - ratio) * cols / cost + 1e-9))
    else:
        if not (isinstance(given, (list, tuple)) and len(given) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in given)):
            raise ValueError(f"allocation of {path} = {given!r}: a sparse structure needs [rank, nnz] integers")
        rank, nnz = given
        if not (0 <= rank <= min(rows, cols) and 0 <= nnz <= rows * cols):
            raise ValueError(f"allocation of {path} = {given!r}: rank must lie in [0, {min(rows, cols)}] "
                             f"and nnz in [0, {rows * cols}]")
    return CompressedModule("lowrank_sparse", (path,), rank, group=group, options={"nnz": nnz, "entry_cost": cost})


def dense_params(shapes: Mapping[int, Mapping[str, tuple[int, int]]]) -> int:
    """Parameters of every compressed matrix before compression; shapes: layer -> path -> (out, in)."""
    return sum(m * n for layer in shapes.values() for m, n in layer.values())


def module_params(module: CompressedModule, shapes: Mapping[str, tuple[int, int]], cost: int | None = None) -> int:
    """Stored parameters of a compressed module (its kind's count), given each member's dense (out, in)
    shape. A sparse entry counts as the module's recorded cost, or as `cost` when given (the other
    convention). ValueError for a kind that stores no weight-method parameters (a latent KV cache)."""
    if module.handler.params is None:
        raise ValueError(f"a {module.kind} module is not counted among the compressed matrices")
    rows = sum(shapes[m][0] for m in module.members)
    return module.handler.params(module, rows, shapes[module.members[0]][1], cost)


def plan_layer(structure: Structure, groups: list[tuple[str, tuple[str, ...]]], shapes: dict[str, tuple[int, int]],
               ratio: float, ranks: Mapping[str, int] | None = None, cost: int = 2) -> list[CompressedModule]:
    """One layer's compressed modules. `groups`: (name, member paths) of linears that read one input;
    `shapes`: (out, in) of every matrix to compress (members absent from it stay dense).

    Without `ranks`, every module gets the largest rank that fits (1 − ratio) of its dense
    parameters. With `ranks` (a global allocator's answer, keyed by matrix path), every compressed
    matrix takes its given rank instead; members of one shared projection must agree on it.
    Raises ValueError for a missing, disagreeing, out-of-range or unknown rank, naming the matrix."""
    modules = []
    for group_name, members in groups:
        modules += structure.modules(group_name, [m for m in members if m in shapes], shapes, ratio, ranks, cost)
    if ranks is not None:
        unknown = sorted(set(ranks) - {m for module in modules for m in module.members})
        if unknown:
            raise ValueError(f"ranks given for matrices that are not compressed here: {', '.join(unknown)}")
    return modules


def _parent(unit: list[str]) -> str:
    """The deepest module holding every member (a mixture's shared projection lives on its experts)."""
    parts = [path.split(".")[:-1] for path in unit]
    common = []
    for names in zip(*parts):
        if len(set(names)) > 1:
            break
        common.append(names[0])
    return ".".join(common)


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


def max_useful_rank(rows: int, cols: int, skip: bool) -> int:
    """Full rank with skipping; otherwise no more than the rank where B A stops storing fewer numbers."""
    full = min(rows, cols)
    return full if skip else min(full, rows * cols // (rows + cols))
