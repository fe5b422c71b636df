"""One input group's decomposition: the compressed layer's tensors for the linears that read it.

The group is the unit because methods share per-input work — the whitening factor is computed once
per group, and a shared projection factorises the group's matrices jointly. The structure (low rank,
shared, skip) is the method's; the factorisation of each (stacked) matrix is the method's `factor`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from rankfold.methods.group_inputs import GroupInputs
from rankfold.methods.registry import Method, MethodOptions, method_of
from rankfold.methods.statistics import InputStats
from rankfold.modules.layout import CompressedModule


@dataclass
class GroupResult:
    tensors: dict[str, torch.Tensor]                            # compressed-layer state fragment
    # {quantity: {module path: value}}, e.g. {"skip_condition": {path: cond₂(A₁)}}
    diagnostics: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _BoundMethod:
    """The method's factorisations bound to this group's options and inputs (a modules.layout.Factorizer)."""

    method: Method
    options: MethodOptions
    inputs: GroupInputs
    approximations: list[torch.Tensor] | None = None  # each factorisation's B A, when asked for

    @property
    def max_condition(self) -> float:
        return getattr(self.options, "max_condition", math.inf)  # only skip layouts guard cond₂(A₁)

    def factor(self, stacked: torch.Tensor, rank: int):
        b, a = self.method.factor(self.options, stacked, rank, self.inputs)
        if self.approximations is not None:
            self.approximations.append(b @ a)
        return b, a

    def sparse_factor(self, stacked: torch.Tensor, module: CompressedModule):
        return self.method.sparse_factor(self.options, stacked, module, self.inputs)


def decompose_group(options: MethodOptions, weights: dict[str, torch.Tensor], stats: InputStats | None,
                    modules: list[CompressedModule], artifact=None,
                    approximations: list[torch.Tensor] | None = None) -> GroupResult:
    """Tensors of `modules` (all reading this group's input), each from its kind's handler
    (modules/layout.py) over the method's factorisation; `weights` keyed by member path;
    `artifact(stage, member)`: the upstream artifacts a method reads (Method.reads);
    `approximations`: when given, each module's factored stacked matrix B A (M, n) float64 is
    appended to it, in module order (low-rank structures: one factorisation per module).
    Raises DecompositionError (core/errors.py) when a skip block's cond(A₁) exceeds
    options.max_condition, or when a sparse factorisation disagrees with its module's rank and nnz."""
    bound = _BoundMethod(method_of(options), options, GroupInputs(stats, artifact), approximations)
    del stats  # only `bound.inputs` holds the statistics now, so it can drop the Gram after factorising it
    result = GroupResult({})
    for module in modules:
        stacked = torch.cat([weights[m].to(torch.float64) for m in module.members])  # (M, n)
        tensors, diagnostics = module.handler.tensors(module, stacked, [weights[m].shape[0] for m in module.members],
                                                      bound)
        result.tensors.update(tensors)
        for quantity, values in diagnostics.items():
            result.diagnostics.setdefault(quantity, {}).update(values)
    return result
