"""Low rank + sparse linear (CAP, seed 001): y = B (A x) + S x + bias, S stored as packed values and
flat indices — the form a safetensors checkpoint holds (no pickled sparse tensors).

S has `nnz` entries: `S_values` (nnz,) in the model dtype and `S_indices` (nnz,) int32, the row-major
flat position row·n + col, sorted ascending (so rows are contiguous: a CSR matrix without a row
pointer). rank 0 is sparse only (Wanda-style pruning); nnz 0 is plain low rank. The torch path
multiplies with a CSR tensor built once from the stored pair (float32 products; on CPU torch's sparse
kernels do not take bfloat16). `dense_product` swaps that for one dense W̃ = B A + S in the module's
dtype: the same function with a dense copy beside the factors, which evaluation uses on CPU, where
torch's CSR product is slower than the dense one at every density measured (benchmarks/sparse_linear.py).
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from rankfold.core.errors import DecompositionError
from rankfold.modules.layout import ModuleKind, register_module_kind, sparse_params, swap_linear
from rankfold.modules.shared import UNLOADED_BUFFER


class LowRankSparseLinear(nn.Module):
    """A: (rank, in), B: (out, rank), S_values: (nnz,), S_indices: (nnz,) int32 flat row-major, sorted."""

    def __init__(self, in_features: int, out_features: int, rank: int, nnz: int, bias: bool = False,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None):
        super().__init__()
        if in_features * out_features >= 2 ** 31:
            raise ValueError(f"{out_features}×{in_features} has too many entries for int32 flat indices")
        self.in_features, self.out_features, self.rank, self.nnz = in_features, out_features, rank, nnz
        self.A = nn.Parameter(torch.empty(rank, in_features, dtype=dtype, device=device))
        self.B = nn.Parameter(torch.empty(out_features, rank, dtype=dtype, device=device))
        self.S_values = nn.Parameter(torch.empty(nnz, dtype=dtype, device=device))
        self.register_buffer("S_indices", torch.empty(nnz, dtype=torch.int32, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype, device=device)) if bias else None
        self._csr: torch.Tensor | None = None
        self.register_buffer("_dense", None, persistent=False)  # set by dense_product; never saved

    def sparse_matrix(self) -> torch.Tensor:
        """S as a float32 CSR tensor (out, in), built on first use."""
        if self.S_indices.is_meta and not self.S_values.is_meta:
            raise RuntimeError(f"LowRankSparseLinear: {UNLOADED_BUFFER.format(what='S_indices')}")
        if self._csr is None:
            self._csr = csr_from_flat(self.S_values.detach().float(), self.S_indices, self.out_features,
                                      self.in_features)
        return self._csr

    @torch.no_grad()
    def dense_product(self) -> None:
        """Multiply with W̃ = B A + S held dense in the module's dtype from now on (adds a dense copy;
        for inference: no gradient reaches A, B or S through it)."""
        self._dense = self.dense().to(self.S_values.dtype)
        self._csr = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is not None:
            return nn.functional.linear(x, self._dense, self.bias)
        flat = x.reshape(-1, self.in_features)
        y = torch.zeros(flat.shape[0], self.out_features, dtype=x.dtype, device=x.device)
        if self.rank:
            y = (flat @ self.A.T) @ self.B.T
        if self.nnz:
            y = y + (self.sparse_matrix() @ flat.float().T).T.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(B, A) when S is empty (the module is then plain low rank), else None."""
        return (self.B, self.A) if self.nnz == 0 else None

    def dense(self) -> torch.Tensor:
        """B A + S as a dense (out, in) float32 matrix."""
        return (self.B.float() @ self.A.float()) + self.sparse_matrix().to_dense()

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"nnz={self.nnz}, bias={self.bias is not None}")


def dense_products(root: nn.Module) -> int:
    """`dense_product` on every LowRankSparseLinear under `root`; returns how many."""
    modules = [m for m in root.modules() if isinstance(m, LowRankSparseLinear)]
    for module in modules:
        module.dense_product()
    return len(modules)


def csr_from_flat(values: torch.Tensor, indices: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """CSR (rows, cols) from sorted row-major flat indices; ValueError when unsorted, repeated or out of range."""
    indices = indices.long()
    if indices.numel() and (bool((indices[1:] <= indices[:-1]).any()) or int(indices[0]) < 0
                            or int(indices[-1]) >= rows * cols):
        raise ValueError(f"sparse indices must be strictly increasing within [0, {rows * cols})")
    row, col = indices // cols, indices % cols
    crow = torch.zeros(rows + 1, dtype=torch.long, device=indices.device)
    crow[1:] = torch.bincount(row, minlength=rows).cumsum(0)
    with warnings.catch_warnings():  # torch flags CSR as beta; the invariants were checked above
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, size=(rows, cols), check_invariants=False)


def flat_sparse(matrix: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `keep` largest-magnitude entries of `matrix` (out, in) as (values, sorted int32 flat indices)."""
    flat = matrix.reshape(-1)
    keep = min(keep, int((flat != 0).sum()))
    chosen = flat.abs().topk(keep).indices.sort().values if keep else flat.new_zeros(0, dtype=torch.long)
    return flat[chosen], chosen.to(torch.int32)


def replace_with_sparse(root: nn.Module, path: str, rank: int, nnz: int, dtype: torch.dtype | None = None) -> None:
    """Swap the nn.Linear at `path` for an empty LowRankSparseLinear."""
    swap_linear(root, path, lambda dense: LowRankSparseLinear(
        dense.in_features, dense.out_features, rank, nnz, bias=dense.bias is not None,
        dtype=dtype or dense.weight.dtype, device=dense.weight.device))


def _params(module, rows: int, cols: int, cost: int | None) -> int:
    """The module's recorded entry cost, or `cost` when given (the other convention, for the report)."""
    cost = cost if cost is not None else int(module.options["entry_cost"])
    return sparse_params(module.rank, rows, cols, int(module.options["nnz"]), cost)


def _tensors(module, stacked, rows, factorizer):
    """B, A and S of one matrix; DecompositionError when the factorisation disagrees with the layout."""
    b, a, values, indices = factorizer.sparse_factor(stacked, module)
    path, nnz = module.members[0], int(module.options["nnz"])
    if a.shape[0] != module.rank or values.numel() != nnz or indices.numel() != nnz:
        raise DecompositionError(f"{path}: factorised to rank {a.shape[0]} with {values.numel()} sparse entries; "
                                 f"its layout says rank {module.rank} with {nnz}")
    return {f"{path}.A": a, f"{path}.B": b, f"{path}.S_values": values,
            f"{path}.S_indices": indices.to(torch.int32)}, {}


# kind 'lowrank_sparse': `members` is one linear, y = B A x + S x with `options["nnz"]` entries of S
# (rank 0: sparse only); an allocator answers [rank, nnz] for it
register_module_kind(ModuleKind(
    "lowrank_sparse", params=_params, tensors=_tensors,
    build=lambda root, module, dtype: replace_with_sparse(root, module.members[0], module.rank,
                                                          int(module.options["nnz"]), dtype),
    allocation=lambda module: [module.rank, int(module.options["nnz"])]))
