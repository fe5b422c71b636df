"""A compressed layer's layout: which linears became which compressed modules, with what rank, and
the registered kinds of those modules.

The layout is data (JSON in the checkpoint's config), and `apply_layout` turns it into modules on an
empty (meta) model or layer, so a checkpoint's tensors load into exactly the structure they came from.
Paths are relative to the module the layout is applied to.

Each kind of compressed module has one registered handler (ModuleKind) that says everything the rest
of rankfold asks about it — how the empty module is built on a layer, what it stores (the tensors from
a factorisation), what it costs in parameters, what an allocator answers for it. The kinds register
in their own files (lowrank.py, shared.py, sparse.py, latent_kv.py); no caller names a kind.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch
from torch import nn

from rankfold.core.registry import Registry


@dataclass(frozen=True)
class CompressedModule:
    """One compressed module: `kind` names its registered handler (modules/layout.py; the kinds are
    'lowrank' in lowrank.py, 'shared' in shared.py, 'lowrank_sparse' in sparse.py, 'latent_kv' in
    latent_kv.py), `members` the linears it replaces, `shared_path` where a module shared by several
    members (or an attention) sits, `options` the kind's settings (e.g. a sparse module's nnz).
    `group`: the input group the members read (the architecture's name for it, e.g. 'attn_in')."""

    kind: str
    members: tuple[str, ...]
    rank: int
    shared_path: str | None = None
    skip: bool = False
    group: str | None = None
    options: dict | None = field(default=None, hash=False)

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None and v is not False}  # keeps rank 0

    @classmethod
    def from_json(cls, data: dict) -> "CompressedModule":
        return cls(kind=data["kind"], members=tuple(data["members"]), rank=int(data["rank"]),
                   shared_path=data.get("shared_path"), skip=bool(data.get("skip", False)), group=data.get("group"),
                   options=data.get("options"))

    @property
    def handler(self) -> ModuleKind:
        """Its kind's registered handler; KeyError naming the known kinds for an unknown one."""
        return MODULE_KINDS.get(self.kind)

    def prefixed(self, prefix: str) -> "CompressedModule":
        return self.relocated(lambda path: prefix + path)

    def relocated(self, move) -> "CompressedModule":
        """The same module with every path passed through `move` (add or strip a layer prefix)."""
        return CompressedModule(self.kind, tuple(move(m) for m in self.members), self.rank,
                                move(self.shared_path) if self.shared_path else None, self.skip, self.group,
                                self.options)


Tensors = dict[str, torch.Tensor]               # the module's fragment of the compressed layer's state
Diagnostics = dict[str, dict[str, float]]       # {quantity: {module path: value}}, e.g. skip_condition


class Factorizer(Protocol):
    """A method's factorisation of one stacked matrix W (M, n), float64, bound to its group's inputs."""

    max_condition: float  # the largest cond₂ a reparameterisation may amplify rounding by (inf: no guard)

    def factor(self, stacked: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (M, r), A (r, n)), largest directions first."""

    def sparse_factor(self, stacked: torch.Tensor, module: CompressedModule) -> tuple[torch.Tensor, ...]:
        """(B, A, S values (nnz,), S flat indices (nnz,)) at the module's rank and nnz."""


def lowrank_params(rank, rows: int, cols: int, skip: bool = False):
    """Stored parameters of rank `rank` (an int or an integer tensor) replacing `rows`×`cols` of dense
    matrices that read one input: r(n + M) for B A (a shared A counts once), r(n + M − r) with block
    skipping (the r×r identity block and the permutation are not parameters)."""
    return rank * (cols + rows - rank) if skip else rank * (cols + rows)


def sparse_params(rank: int, rows: int, cols: int, nnz: int, cost: int) -> int:
    """Stored parameters of B A + S: r(m + n) + nnz · cost (`cost`: parameters one sparse entry counts as)."""
    return rank * (rows + cols) + nnz * cost


def _rank(module: CompressedModule) -> int:
    return module.rank


@dataclass(frozen=True)
class ModuleKind:
    """What rankfold needs to know about one kind of compressed module."""

    name: str
    # build(root, module, dtype): replace the dense linears under `root` by the empty module
    build: Callable[[nn.Module, CompressedModule, torch.dtype | None], None]
    # params(module, rows M = Σ member rows, cols n, entry cost or None) -> stored parameters; None: the
    # kind stores no weight-method parameters (a latent KV cache: its KV method counts them)
    params: Callable[[CompressedModule, int, int, int | None], int] | None
    # tensors(module, W (M, n) float64 of the stacked members, rows per member, factorizer)
    #   -> (tensors, diagnostics); None: the kind's tensors come from elsewhere (its KV method)
    tensors: Callable[[CompressedModule, torch.Tensor, list[int], Factorizer],
                      tuple[Tensors, Diagnostics]] | None = None
    allocation: Callable[[CompressedModule], int | list[int]] = _rank  # what an allocator answers for it
    linear: bool = True        # its members become low-rank linears with a rank (progressive decoding, ranks)
    build_last: bool = False   # built after every other kind (it takes over whatever they made)
    keeps_biases: bool = True  # False: its tensors hold the members' biases (the dense ones are dropped)


MODULE_KINDS: Registry[ModuleKind] = Registry("compressed module kind")


def register_module_kind(kind: ModuleKind) -> ModuleKind:
    return MODULE_KINDS.register(kind.name, kind)


def swap_linear(root: nn.Module, path: str, build: Callable[[nn.Linear], nn.Module]) -> None:
    """Replace the nn.Linear at `path` under `root` by `build(dense)`; TypeError when `path` is not one."""
    parent_path, _, child = path.rpartition(".")
    parent = root.get_submodule(parent_path) if parent_path else root
    dense = getattr(parent, child)
    if not isinstance(dense, nn.Linear):
        raise TypeError(f"{path} is {type(dense).__name__}, not nn.Linear")
    setattr(parent, child, build(dense))


def apply_layout(root: nn.Module, layout: list[CompressedModule], dtype: torch.dtype | None = None) -> None:
    """Replace dense linears under `root` by the (empty) modules the layout describes, each by its kind's
    handler; kinds built last (a latent-KV attention) after the rest, as they take over what those made."""
    for module in sorted(layout, key=lambda m: m.handler.build_last):
        module.handler.build(root, module, dtype)


def member_ranks(layout: list[CompressedModule]) -> dict[str, int]:
    """Rank of every compressed linear (members of a shared projection share its rank); modules whose
    members are not low-rank linears (a latent KV cache's k/v) are left out."""
    return {member: module.rank for module in layout if module.handler.linear for member in module.members}
