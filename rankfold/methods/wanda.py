"""Wanda (Sun et al. 2023, arXiv:2306.11695, eq. 1): unstructured pruning by |W_ij| · ‖X_j‖₂, the
weight's magnitude times the norm of its input channel over the calibration tokens, compared within
each output row (the paper's comparison group). No weight update. ‖X_j‖₂ is √ of the stored Gram's
diagonal, so Wanda costs no pass beyond the calibration every other method already runs.

The pruned matrix is stored sparse (values + int32 flat indices, modules/sparse.py); at a target
ratio each row keeps ⌊(1 − ratio)·n / cost⌋ entries, where an entry costs 2 parameters (value +
index) by default or 1 with `count_indices: false` (the paper's "50 % sparsity").

    method: {name: wanda}
"""

from __future__ import annotations

from typing import Literal

import torch

from rankfold.methods.registry import Method, MethodOptions, SparseFactors, register_method
from rankfold.methods.structure import SPARSE
from rankfold.modules.layout import CompressedModule

VERSION = "1"


class WandaOptions(MethodOptions):
    """Wanda: keep the entries with the largest |W_ij|·‖x_j‖ in every output row (arXiv:2306.11695)."""

    name: Literal["wanda"]
    count_indices: bool = True  # a kept entry costs its value + its int32 index (false: the paper's 1)


def wanda_scores(weight: torch.Tensor, input_norms: torch.Tensor) -> torch.Tensor:
    """|W| · ‖x_j‖ broadcast over rows: (m, n) float64."""
    return weight.to(torch.float64).abs() * input_norms.to(torch.float64)[None, :]


def wanda_prune(weight: torch.Tensor, input_norms: torch.Tensor, per_row: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The `per_row` highest-scoring entries of every row of W (m, n): (values (m·per_row,) float64,
    int32 row-major flat indices, ascending). Raises ValueError when per_row is outside [0, n]."""
    rows, cols = weight.shape
    if not 0 <= per_row <= cols:
        raise ValueError(f"Wanda keeps {per_row} entries per row of a {rows}×{cols} matrix")
    columns = wanda_scores(weight, input_norms).topk(per_row, dim=1).indices.sort(dim=1).values
    flat = (torch.arange(rows, device=columns.device)[:, None] * cols + columns).reshape(-1)
    return weight.to(torch.float64).reshape(-1)[flat], flat.to(torch.int32)


def wanda_factor(options: WandaOptions, weight: torch.Tensor, module: CompressedModule, inputs) -> SparseFactors:
    rows, cols = weight.shape
    nnz = int(module.options["nnz"])
    if module.rank != 0 or nnz % rows:
        raise ValueError(f"{module.members[0]}: Wanda keeps whole rows' shares (rank 0, nnz a multiple of {rows}); "
                         f"got rank {module.rank}, nnz {nnz}")
    values, indices = wanda_prune(weight, inputs.input_norms, nnz // rows)
    return weight.new_zeros(rows, 0, dtype=torch.float64), weight.new_zeros(0, cols, dtype=torch.float64), values, indices


register_method(Method("wanda", WandaOptions, None, needs=frozenset({"gram"}), structure=SPARSE, version=VERSION,
                       sparse_factor=wanda_factor, allocations=("uniform",)))
