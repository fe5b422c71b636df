"""Shared projections (SkipCat's Cat) and block skipping (its Skip), as drop-in linears.

A group of linears that read the same input (q/k/v, or gate/up) becomes one SharedProjection
z = A x (or, with skipping, z = x[P₁] + A′ x[P₂]) registered once on the parent module, and one
SharedLowRankLinear per member computing y = B z. transformers calls q_proj, k_proj and v_proj one
after another on the same tensor; the first call computes every member's output in one kernel call
and the projection keeps them for that tensor until every member has taken its own, so A x is
computed once per token without changing transformers' attention code.

`active_rank` (on the projection: its members share it) runs the group at the first r′ directions,
views A[:r′] and B_c[:, :r′]; a skip projection refuses r′ < r — see `SKIP_TRUNCATION`.
"""

from __future__ import annotations

import weakref

import torch
from torch import nn

from rankfold.core.errors import DecompositionError
from rankfold.kernels import shared_lowrank
from rankfold.modules.layout import ModuleKind, lowrank_params, register_module_kind
from rankfold.modules.lowrank import check_active_rank
from rankfold.modules.skip import skip_reparameterize

# Why a skip layout has no nested ranks (and PLRD refuses it).
SKIP_TRUNCATION = (
    "a skip layout (identity block + permutation) has no nested ranks: its latent z = A_P1⁻¹ A x mixes all r "
    "singular directions into every coordinate, so no prefix of z is a lower-rank model, and truncating correctly "
    "needs the whole z plus an r×r change of basis — more work than the stored rank. Use a layout without "
    "skipping (method.skip false, or svd_llm) for progressive low-rank decoding")


# A model loader that fills parameters only leaves buffers on the meta device (vLLM's Transformers backend does).
UNLOADED_BUFFER = ("{what} was never loaded (it is still on the meta device): the loader filled parameters but "
                   "not buffers, as vLLM's Transformers backend does; write the model with `rankfold export "
                   "--form lowrank` to serve it there")


class SharedProjection(nn.Module):
    """z = A x (skip=False) or z = x[P[:r]] + A′ x[P[r:]] (skip=True), for `consumers` members.

    Called with x, it returns every member's output B_c z + bias_c in one kernel call
    (`rankfold.kernels.shared_lowrank`: Triton on CUDA, torch elsewhere) and keeps the list for
    the members still to come, so A x is computed once per token. Members that read different
    tensors (`joint=False`: a mixture's experts, each called on the tokens routed to it) get z alone,
    kept for the tensor it was computed from, and apply their own B — no expert computes another's."""

    def __init__(self, in_features: int, rank: int, skip: bool, consumers: int,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None, joint: bool = True):
        super().__init__()
        self.in_features, self.rank, self.skip, self.consumers = in_features, rank, skip, consumers
        self.joint = joint
        if skip:
            self.A_prime = nn.Parameter(torch.empty(rank, in_features - rank, dtype=dtype, device=device))
            self.register_buffer("permutation", torch.empty(in_features, dtype=torch.int64, device=device))
        else:
            self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self._members: list[SharedLowRankLinear] = []  # plain list: members are registered on their parents
        self._cached_input: weakref.ref | None = None
        self._cached_outputs: list[torch.Tensor] | None = None
        self._uses_left = 0
        self.active_rank: int | None = None      # None: the stored rank
        self.rank_log: list[int] | None = None   # when a list, every computation of z appends its rank

    def set_active_rank(self, rank: int | None) -> None:
        if self.skip and rank is not None and rank != self.rank:
            raise ValueError(f"SharedProjection: active rank {rank} < {self.rank}: {SKIP_TRUNCATION}")
        self.active_rank = check_active_rank(rank, self.rank, type(self).__name__)

    def attach(self, member: "SharedLowRankLinear") -> int:
        if len(self._members) == self.consumers:
            raise ValueError(f"shared projection already feeds its {self.consumers} members")
        self._members.append(member)
        return len(self._members) - 1

    def _rank_for(self, x: torch.Tensor) -> int:
        """The rank z is computed at for x (logged when asked); a skip projection's permutation must be loaded."""
        if self.skip:
            if self.permutation.is_meta and not x.is_meta:
                raise RuntimeError(f"SharedProjection: {UNLOADED_BUFFER.format(what='its permutation')}")
            return self.rank
        rank = self.active_rank or self.rank
        if self.rank_log is not None:
            self.rank_log.append(rank)
        return rank

    def group_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        if len(self._members) != self.consumers:
            raise RuntimeError(f"shared projection has {len(self._members)} of its {self.consumers} members")
        rank, biases = self._rank_for(x), [m.bias for m in self._members]
        if self.skip:
            return shared_lowrank(x, self.A_prime, [m.B for m in self._members], self.permutation, biases)
        return shared_lowrank(x, self.A[:rank], [m.B[:, :rank] for m in self._members], None, biases)

    def latent(self, x: torch.Tensor) -> torch.Tensor:
        """z (…, active rank) for x, computed once per tensor (members that read different tensors)."""
        cached = self._cached_input() if self._cached_input is not None else None
        if cached is not x:
            rank = self._rank_for(x)
            if self.skip:
                z = x[..., self.permutation[:rank]] + nn.functional.linear(x[..., self.permutation[rank:]], self.A_prime)
            else:
                z = nn.functional.linear(x, self.A[:rank])
            self._cached_outputs, self._cached_input = [z], weakref.ref(x)
        return self._cached_outputs[0]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        cached = self._cached_input() if self._cached_input is not None else None
        if cached is not x or self._uses_left == 0:
            self._cached_outputs = self.group_outputs(x)
            self._cached_input = weakref.ref(x)
            self._uses_left = self.consumers
        outputs = self._cached_outputs
        self._uses_left -= 1
        if self._uses_left == 0:  # every member has its output: drop ours
            self._cached_input, self._cached_outputs = None, None
        return outputs

    def dense_a(self) -> torch.Tensor:
        """A (rank, in) as one matrix; with skipping [I A′]·P, the identity block and permutation written out."""
        if not self.skip:
            return self.A
        a = self.A_prime.new_zeros(self.rank, self.in_features)
        a[:, self.permutation[:self.rank]] = torch.eye(self.rank, dtype=a.dtype, device=a.device)
        a[:, self.permutation[self.rank:]] = self.A_prime
        return a

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}, skip={self.skip}, consumers={self.consumers}"


class SharedLowRankLinear(nn.Module):
    """y = B · shared(x) + bias; the shared projection is owned by the parent, referenced here."""

    def __init__(self, shared: SharedProjection, out_features: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.rank = shared.in_features, out_features, shared.rank
        object.__setattr__(self, "shared", shared)  # not a submodule: its parameters live on the parent once
        self.B = nn.Parameter(torch.empty(out_features, shared.rank, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self.index = shared.attach(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared.joint:
            return self.shared(x)[self.index]
        z = self.shared.latent(x)
        return nn.functional.linear(z, self.B[:, :z.shape[-1]], self.bias)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(B (out, rank), A (rank, in)) with the shared A written out (SharedProjection.dense_a)."""
        return self.B, self.shared.dense_a()

    def extra_repr(self) -> str:
        return f"out_features={self.out_features}, rank={self.rank}, bias={self.bias is not None}"


def replace_group(root: nn.Module, shared_path: str, members: dict[str, int], rank: int, skip: bool,
                  dtype: torch.dtype | None = None) -> None:
    """Swap the linears at `members` (path -> out_features) for SharedLowRankLinears over one new
    SharedProjection registered at `shared_path` (all paths relative to `root`)."""
    first = root.get_submodule(next(iter(members)))
    dtype = dtype or first.weight.dtype
    joint = len({path.rpartition(".")[0] for path in members}) == 1  # siblings read one tensor; experts do not
    shared = SharedProjection(first.in_features, rank, skip, consumers=len(members), dtype=dtype,
                              device=first.weight.device, joint=joint)
    parent_path, _, name = shared_path.rpartition(".")
    (root.get_submodule(parent_path) if parent_path else root).add_module(name, shared)
    for path in members:
        parent_path, _, child = path.rpartition(".")
        parent = root.get_submodule(parent_path) if parent_path else root
        dense = getattr(parent, child)
        if not isinstance(dense, nn.Linear) or dense.in_features != shared.in_features:
            raise TypeError(f"{path} is not an nn.Linear reading {shared.in_features} features")
        setattr(parent, child, SharedLowRankLinear(shared, dense.out_features, bias=dense.bias is not None,
                                                   dtype=dtype, device=dense.weight.device))


def _build(root: nn.Module, module, dtype: torch.dtype | None) -> None:
    out_features = {m: root.get_submodule(m).out_features for m in module.members}
    replace_group(root, module.shared_path, out_features, module.rank, module.skip, dtype=dtype)


def _tensors(module, stacked, rows, factorizer):
    """The shared A (or, skipping, A′ and the permutation) and each member's rows of B; DecompositionError
    when a skip block's cond₂(A₁) exceeds factorizer.max_condition."""
    b, a = factorizer.factor(stacked, module.rank)
    if not module.skip:
        return {f"{module.shared_path}.A": a, **_split_rows(module, rows, b)}, {}
    skip = skip_reparameterize(b, a)
    if skip.condition > factorizer.max_condition:
        raise DecompositionError(f"{module.shared_path}: cond(A₁) = {skip.condition:.3g} exceeds "
                                 f"method.max_condition = {factorizer.max_condition:g}; low-precision forward "
                                 "would be inaccurate")
    tensors = {f"{module.shared_path}.A_prime": skip.a_prime, f"{module.shared_path}.permutation": skip.permutation,
               **_split_rows(module, rows, skip.b_prime)}
    return tensors, {"skip_condition": {module.shared_path: skip.condition}}


def _split_rows(module, rows: list[int], b: torch.Tensor) -> dict[str, torch.Tensor]:
    return {f"{m}.B": part for m, part in zip(module.members, b.split(rows))}


# kind 'shared': one projection at `shared_path` (skip: identity block + A′) feeding every member's B
register_module_kind(ModuleKind(
    "shared", build=_build, tensors=_tensors,
    params=lambda module, rows, cols, cost: lowrank_params(module.rank, rows, cols, module.skip)))
