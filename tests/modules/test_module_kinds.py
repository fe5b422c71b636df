"""Compressed-module kinds are registered handlers: a new kind defined here (a diagonal-plus-low-rank
linear, y = B A x + d ⊙ x) is built by apply_layout, counted by module_params, answered by ranks_of and
factorised by decompose_group, with no edit anywhere else; an unknown kind fails naming the known ones."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankfold.allocators.registry import ranks_of
from rankfold.methods.group_decomposition import decompose_group
from rankfold.methods.structure import module_params
from rankfold.methods.svd import SvdOptions
from rankfold.modules.layout import MODULE_KINDS, CompressedModule, ModuleKind, apply_layout, lowrank_params
from rankfold.modules.lowrank import LowRankLinear


class DiagonalLowRank(LowRankLinear):
    def __init__(self, in_features: int, out_features: int, rank: int):
        super().__init__(in_features, out_features, rank)
        self.diagonal = nn.Parameter(torch.zeros(in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + x * self.diagonal


def _build(root: nn.Module, module: CompressedModule, dtype) -> None:
    dense = root.get_submodule(module.members[0])
    setattr(root, module.members[0], DiagonalLowRank(dense.in_features, dense.out_features, module.rank))


def _tensors(module, stacked, rows, factorizer):
    diagonal = stacked.diagonal().clone()
    b, a = factorizer.factor(stacked - torch.diag(diagonal), module.rank)
    path = module.members[0]
    return {f"{path}.A": a, f"{path}.B": b, f"{path}.diagonal": diagonal}, {"diagonal_norm": {path: 1.0}}


TOY = ModuleKind("diagonal_lowrank", build=_build, tensors=_tensors,
                 params=lambda module, rows, cols, cost: lowrank_params(module.rank, rows, cols) + cols,
                 allocation=lambda module: [module.rank, module.rank])


@pytest.fixture
def toy_kind(monkeypatch):
    monkeypatch.setitem(MODULE_KINDS._entries, TOY.name, TOY)  # registered for this test only


def test_a_kind_registered_in_one_place_is_built_counted_allocated_and_factorised(toy_kind):
    root = nn.Sequential()
    root.add_module("proj", nn.Linear(12, 12, bias=False))
    module = CompressedModule(TOY.name, ("proj",), 4)
    apply_layout(root, [module])
    assert isinstance(root.proj, DiagonalLowRank)
    assert module_params(module, {"proj": (12, 12)}) == 4 * 24 + 12
    assert ranks_of({0: [module]}) == {0: {"proj": [4, 4]}}

    weight = torch.randn(12, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = decompose_group(SvdOptions(name="svd"), {"proj": weight}, None, [module])
    assert set(result.tensors) == {"proj.A", "proj.B", "proj.diagonal"}
    assert result.diagnostics == {"diagonal_norm": {"proj": 1.0}}
    root.load_state_dict({k: v.float() for k, v in result.tensors.items()})
    x = torch.randn(3, 12)
    rebuilt = result.tensors["proj.B"] @ result.tensors["proj.A"] + torch.diag(result.tensors["proj.diagonal"])
    torch.testing.assert_close(root(x), x @ rebuilt.float().T)


def test_an_unknown_kind_names_the_known_ones():
    with pytest.raises(KeyError, match="unknown compressed module kind 'nope'.*lowrank"):
        apply_layout(nn.Sequential(), [CompressedModule("nope", ("x",), 1)])


def test_the_kinds_register_themselves():
    assert {"lowrank", "shared", "lowrank_sparse", "latent_kv"} <= set(MODULE_KINDS.names())
    assert not MODULE_KINDS.get("latent_kv").linear and MODULE_KINDS.get("latent_kv").build_last
