"""One input group's decomposition: the compressed layer's tensors for the linears that read it.

The group is the unit because methods share per-input work — the whitening factor is computed once
per group, and a shared projection factorises the group's matrices jointly. The structure (low rank,
shared, skip) is the method's; the factorisation of each (stacked) matrix is the method's `factor`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rankfold.core.errors import RankfoldError
from rankfold.methods.group_inputs import GroupInputs
from rankfold.methods.registry import MethodOptions, method_of
from rankfold.methods.skipcat import skip_reparameterize
from rankfold.methods.statistics import InputStats
from rankfold.modules.layout import CompressedModule


class DecompositionError(RankfoldError, ValueError):
    """A decomposition that would give an inaccurate model: names the module and the quantity."""

    label = "decomposition failed"


@dataclass
class GroupResult:
    tensors: dict[str, torch.Tensor]                            # compressed-layer state fragment
    # {quantity: {module path: value}}, e.g. {"skip_condition": {path: cond₂(A₁)}}
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)


def decompose_group(options: MethodOptions, weights: dict[str, torch.Tensor], stats: InputStats | None,
                    modules: list[CompressedModule], artifact=None) -> GroupResult:
    """Tensors of `modules` (all reading this group's input); `weights` keyed by member path;
    `artifact(stage, member)`: the upstream artifacts a method reads (Method.reads).
    Raises DecompositionError when a skip block's cond(A₁) exceeds options.max_condition, or when a
    sparse factorisation disagrees with its module's rank and nnz."""
    method = method_of(options)
    inputs, result = GroupInputs(stats, artifact), GroupResult({})
    del stats  # only `inputs` holds the statistics now, so it can drop the Gram after factorising it
    for module in modules:
        stacked = torch.cat([weights[m].to(torch.float64) for m in module.members])  # (M, n)
        if module.kind == "lowrank_sparse":
            result.tensors.update(_sparse_tensors(module, method.sparse_factor(options, stacked, module, inputs)))
            continue
        b, a = method.factor(options, stacked, module.rank, inputs)
        if module.kind == "lowrank":
            result.tensors.update({f"{module.members[0]}.A": a, f"{module.members[0]}.B": b})
        elif not module.skip:
            result.tensors[f"{module.shared_path}.A"] = a
            result.tensors.update(_split_rows(module, weights, b))
        else:
            _add_skip(options, module, weights, b, a, result)
    return result


def _sparse_tensors(module: CompressedModule, factors) -> dict[str, torch.Tensor]:
    b, a, values, indices = factors
    path, nnz = module.members[0], int(module.options["nnz"])
    if a.shape[0] != module.rank or values.numel() != nnz or indices.numel() != nnz:
        raise DecompositionError(f"{path}: factorised to rank {a.shape[0]} with {values.numel()} sparse entries; "
                                 f"its layout says rank {module.rank} with {nnz}")
    return {f"{path}.A": a, f"{path}.B": b, f"{path}.S_values": values, f"{path}.S_indices": indices.to(torch.int32)}


def _split_rows(module: CompressedModule, weights: dict[str, torch.Tensor], b: torch.Tensor) -> dict[str, torch.Tensor]:
    rows = [weights[m].shape[0] for m in module.members]
    return {f"{m}.B": part for m, part in zip(module.members, b.split(rows))}


def _add_skip(options: MethodOptions, module: CompressedModule, weights: dict[str, torch.Tensor], b: torch.Tensor,
              a: torch.Tensor, result: GroupResult) -> None:
    skip = skip_reparameterize(b, a)
    if skip.condition > options.max_condition:
        raise DecompositionError(f"{module.shared_path}: cond(A₁) = {skip.condition:.3g} exceeds "
                                 f"method.max_condition = {options.max_condition:g}; low-precision forward "
                                 "would be inaccurate")
    result.diagnostics.setdefault("skip_condition", {})[module.shared_path] = skip.condition
    result.tensors[f"{module.shared_path}.A_prime"] = skip.a_prime
    result.tensors[f"{module.shared_path}.permutation"] = skip.permutation
    result.tensors.update(_split_rows(module, weights, skip.b_prime))
