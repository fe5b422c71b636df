"""Low rank + sparse linear: its output is the dense product of its parts; state dict round trip."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from rankfold.modules.sparse import LowRankSparseLinear, csr_from_flat, dense_products, flat_sparse, replace_with_sparse


def _filled(rank: int, nnz_keep: int, bias: bool = True, seed: int = 0) -> tuple[LowRankSparseLinear, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sparse_dense = torch.randn(24, 40, generator=gen) * (torch.rand(24, 40, generator=gen) < 0.1)
    values, indices = flat_sparse(sparse_dense, nnz_keep)
    module = LowRankSparseLinear(40, 24, rank, values.numel(), bias=bias)
    with torch.no_grad():
        module.A.copy_(torch.randn(rank, 40, generator=gen))
        module.B.copy_(torch.randn(24, rank, generator=gen))
        module.S_values.copy_(values)
        module.S_indices.copy_(indices)
        if bias:
            module.bias.copy_(torch.randn(24, generator=gen))
    kept = torch.zeros(24 * 40)
    kept[indices.long()] = values
    return module, module.B @ module.A + kept.view(24, 40)


@pytest.mark.parametrize("rank,keep", [(5, 30), (0, 60), (6, 0)])
def test_output_equals_the_dense_product_of_its_parts(rank, keep):
    module, weight = _filled(rank, keep)
    x = torch.randn(3, 7, 40)
    torch.testing.assert_close(module(x), x @ weight.T + module.bias, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(module.dense(), weight, rtol=1e-6, atol=1e-6)


def test_dense_product_is_the_same_function_and_is_never_saved():
    module, _ = _filled(5, 30)
    root = nn.Sequential(module, nn.ReLU())
    x = torch.randn(3, 7, 40)
    sparse_out = module(x)
    assert dense_products(root) == 1
    torch.testing.assert_close(module(x), sparse_out, rtol=1e-5, atol=1e-5)
    assert "0._dense" not in root.state_dict() and module._dense is not None
    assert not module._dense.requires_grad  # inference only: no graph holding float32 copies of A and B
    root.to(torch.bfloat16)  # the dense W̃ follows the module's dtype
    torch.testing.assert_close(module(x.bfloat16()).float(), sparse_out, rtol=0.05, atol=0.1)


def test_flat_sparse_keeps_the_largest_entries_sorted():
    m = torch.tensor([[0.0, -5.0, 1.0], [3.0, 0.0, -0.5]])
    values, indices = flat_sparse(m, 2)
    assert indices.tolist() == [1, 3] and values.tolist() == [-5.0, 3.0] and indices.dtype == torch.int32
    with pytest.raises(ValueError, match="strictly increasing"):
        csr_from_flat(torch.ones(2), torch.tensor([3, 1], dtype=torch.int32), 2, 3)


def test_state_dict_round_trip_through_an_empty_module():
    module, _ = _filled(4, 25)
    root = nn.Sequential(nn.Linear(40, 24, bias=True))
    replace_with_sparse(root, "0", rank=4, nnz=module.nnz)
    root[0].load_state_dict(module.state_dict())
    x = torch.randn(5, 40)
    torch.testing.assert_close(root[0](x), module(x))
    assert root[0].S_indices.dtype == torch.int32


def test_layout_kind_builds_the_module_for_a_checkpoint():
    from rankfold.modules.layout import CompressedModule, apply_layout

    module, _ = _filled(4, 25)
    root = nn.Sequential(nn.Linear(40, 24, bias=True))
    entry = CompressedModule("lowrank_sparse", ("0",), 4, options={"nnz": module.nnz})
    apply_layout(root, [CompressedModule.from_json(entry.to_json())])
    missing, unexpected = root.load_state_dict({f"0.{k}": v for k, v in module.state_dict().items()})
    assert not missing and not unexpected
    x = torch.randn(2, 40)
    torch.testing.assert_close(root(x), module(x))
