"""CAP (seed 001; METHODS.md "CAP"): every matrix as low rank + sparse, W ≈ U diag(σ⊙m_σ) Vᵀ + S⊙m_S,
with the masks chosen over all layers at once under one parameter budget (allocators/search.py).

Stage `rpca` (this file's `rpca_units`, one task per matrix) splits W = L + R by robust PCA
(methods/rpca.py) — with `whiten` (default) on X = W·S (S the Cholesky factor of the calibration
Gram, SVD-LLM's whitening) so that L's triples carry the output error they remove, or on X = W.
Singular-value thresholding shrinks every kept σ by 1/μ, which a truncated L would inherit; with
`debias` (default; rankfold's, not the paper's) each triple takes its least-squares scale on X,
σ_i = u_iᵀ X v_i. Measured on SmolLM2 at 50 % (README): whitening and debiasing each lower the
perplexity of the same keep rule. Its units:
- L's singular triples (U_i, σ_i, V_i), cost m + n parameters each;
- the largest entries of R = W − L, cost `entry_cost` each. R is what robust PCA left outside L (its
  sparse part plus the unconverged residual after a few iterations), so keeping every unit gives W
  back exactly. At most ⌊max_density · m·n⌋ entries are candidates, which keeps artifacts small.
Every unit carries a score, the calibration output energy it carries alone: σ_i² · v_iᵀ G v_i / N for a
triple (v_i the i-th row of Vᵀ, G = Σ x xᵀ over N tokens) and R_ij² · G_jj / N for an entry (Wanda's
score, squared). Units are stored in descending score order, so a keep rule reads prefixes.

The decomposition (`cap_factor`) keeps the units the search stage's masks select.

    method: {name: cap, iterations: 3, whiten: true, debias: true}
    target: {ratio: 0.5, allocation: {kind: search}}
"""

from __future__ import annotations

import json
import math
from typing import Literal

import torch
from pydantic import Field

from rankfold.methods.registry import Method, MethodOptions, SparseFactors, register_method
from rankfold.methods.rpca import robust_pca
from rankfold.methods.structure import SPARSE
from rankfold.methods.whitening import apply_inverse_right
from rankfold.modules.layout import CompressedModule

VERSION = "1"


class CapOptions(MethodOptions):
    """CAP: robust PCA of every matrix (inexact ALM), then a global search over its triples and entries."""

    name: Literal["cap"]
    iterations: int = Field(3, ge=1)         # robust PCA iterations (CAP: 3 suffice)
    lam_scale: float = Field(1.0, gt=0)      # λ = lam_scale / √max(m, n)
    rho: float = Field(1.5, gt=1)            # μ growth per iteration (μ₀ = 1.25/‖W‖₂)
    whiten: bool = True                      # robust PCA of W·S instead of W (triples ordered by output error)
    debias: bool = True                      # σ_i ← u_iᵀ X v_i: undo singular-value thresholding's shrinkage
    max_density: float = Field(0.5, ge=0, le=1)  # sparse candidates per matrix, as a fraction of m·n (0: ranks only)
    count_indices: bool = True               # a sparse entry costs value + int32 index (false: the paper's 1)


def rpca_units(options: CapOptions, weight: torch.Tensor, gram: torch.Tensor, count: int,
               whitening: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One matrix's units. `weight` (m, n); `gram` (n, n) Σ x xᵀ over `count` tokens (float64); with
    `options.whiten`, `whitening` is its Cholesky factor S. Returns (tensors, the robust PCA history):
    u (m, k), sigma (k,), vh (k, n) with L = u diag(σ) vh, sparse_values (c,), sparse_indices (c,)
    int64 flat row-major, and triple_score (k,), sparse_score (c,) float64 — each kind sorted by
    descending score. Floats are float64."""
    w = weight.to(torch.float64)
    target = w @ whitening if options.whiten else w
    lam = options.lam_scale / math.sqrt(max(w.shape))
    result = robust_pca(target, lam=lam, iterations=options.iterations, rho=options.rho)
    if options.debias:  # the least-squares scale of each triple on the matrix itself, not SVT's σ − 1/μ
        result.sigma = ((result.u.T @ target) * result.vh).sum(1)
    vh = apply_inverse_right(result.vh, whitening) if options.whiten else result.vh
    low = (result.u * result.sigma) @ vh
    triple_score = result.sigma ** 2 * ((vh @ gram) * vh).sum(1) / count
    order = triple_score.argsort(descending=True)
    residual = (w - low).reshape(-1)
    entry_score = residual ** 2 * gram.diagonal().repeat(w.shape[0]) / count
    keep = min(int(options.max_density * w.numel()), int((residual != 0).sum()))
    sparse_score, indices = entry_score.topk(keep)
    return {"u": result.u[:, order].contiguous(), "sigma": result.sigma[order], "vh": vh[order].contiguous(),
            "triple_score": triple_score[order], "sparse_values": residual[indices], "sparse_indices": indices,
            "sparse_score": sparse_score}, result.history


def history_metadata(history: list[dict]) -> dict[str, str]:
    return {"rpca_history": json.dumps(history)}


def kept_units(units: dict[str, torch.Tensor], triples: torch.Tensor, entries: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """What masks (triples (k,), entries (c,) bool) keep of a matrix's units: B = U_kept diag(σ_kept),
    A = Vᵀ_kept, and the kept sparse entries' flat indices and values (in score order)."""
    b = units["u"][:, triples] * units["sigma"][triples]
    return b, units["vh"][triples], units["sparse_indices"][entries], units["sparse_values"][entries]


def cap_factor(options: CapOptions, weight: torch.Tensor, module: CompressedModule, inputs) -> SparseFactors:
    """B A + S from the matrix's robust PCA units and the search's keep masks (`keep_triples` (k,),
    `keep_sparse` (c,) bool), float64; S's entries sorted by position."""
    path = module.members[0]
    units = {k: v.to(torch.float64) if v.is_floating_point() else v for k, v in inputs.artifact("rpca", path).items()}
    masks = inputs.artifact("search", path)
    b, a, indices, values = kept_units(units, masks["keep_triples"].bool(), masks["keep_sparse"].bool())
    indices, order = indices.sort()
    return b, a, values[order], indices.to(torch.int32)


def masked_weight(units: dict[str, torch.Tensor], triples: torch.Tensor, entries: torch.Tensor,
                  shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """W̃ (m, n) in `dtype` from a matrix's units and its masks (triples (k,), entries (c,) bool): only
    the kept triples are multiplied (the cost falls with the rank kept)."""
    b, a, indices, values = kept_units(units, triples, entries)
    flat = (b @ a).reshape(-1)
    flat.index_add_(0, indices.long(), values.to(flat.dtype))
    return flat.view(shape).to(dtype)

register_method(Method("cap", CapOptions, None, needs=frozenset({"gram"}), structure=SPARSE, version=VERSION,
                       sparse_factor=cap_factor, reads=("rpca", "search"), allocations=("search",)))
