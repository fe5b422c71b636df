"""CAP (seed 001; METHODS.md "CAP"): every matrix as low rank + sparse, W ≈ U diag(σ⊙m_σ) Vᵀ + S⊙m_S,
with the masks chosen over all layers at once under one parameter budget (allocators/cap_search.py).

Stage `rpca` (this file's `rpca_units`, one task per matrix) splits W into triples and sparse entries.
`triples: residual_svd` (default; rankfold's reading of the paper):
- robust PCA (methods/robust_pca.py) of W·D, D = diag(√G_jj), gives the sparse part S. Weighting each
  column by its input's norm ranks entries as Wanda does, and a column scaling keeps S sparse in W
  (a full whitening would not). S is capped at its ⌊max_density · m·n⌋ highest-scoring entries;
- the triples are the full SVD of W − S — of (W − S)·S_G with `whiten` (S_G the Gram's Cholesky
  factor, SVD-LLM's whitening), so that each carries the output error it removes. Robust PCA's own L
  after 3 iterations keeps only the directions above its last threshold (rank 2 of 576 on a SmolLM2
  q_proj, whitened), so the search could not choose a deeper rank; here it can, and with S = 0 (λ
  large) the units are SVD-LLM's triples. Exact SVD: no thresholding shrinkage to undo.
`triples: rpca` (the literal reading): L = robust PCA's low-rank part of W·S_G (`whiten`) or W, with
`debias` (rankfold's) giving each triple its least-squares scale σ_i = u_iᵀ X v_i instead of SVT's
σ − 1/μ; the entries are the largest of R = W − L.
Units: triples (U_i, σ_i, V_i), cost m + n parameters each, and sparse entries, cost `entry_cost` each;
keeping every unit gives W back exactly. Every unit carries a score, the calibration output energy it
carries alone: σ_i² · v_iᵀ G v_i / N for a triple (v_i the i-th row of Vᵀ, G = Σ x xᵀ over N tokens)
and S_ij² · G_jj / N for an entry (Wanda's score, squared). Units are stored in descending score
order, so a keep rule reads prefixes. Measured on SmolLM2 (README): the two readings side by side.

The decomposition (`cap_factor`) keeps the units the search stage's masks select.

    method: {name: cap, triples: residual_svd, iterations: 3, lam_scale: 1.0, whiten: true}
    target: {ratio: 0.5, allocation: {kind: search}}
"""

from __future__ import annotations

import json
import math
from typing import Literal

import torch
from pydantic import Field

from rankfold.methods.linalg import reduced_svd
from rankfold.methods.registry import Method, MethodOptions, SparseFactors, register_method
from rankfold.methods.robust_pca import robust_pca
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
    triples: Literal["residual_svd", "rpca"] = "residual_svd"  # the SVD of W − S, or robust PCA's own L
    whiten: bool = True                      # triples from (·)·S, S the Gram's Cholesky factor (output error)
    debias: bool = True                      # rpca: σ_i ← u_iᵀ X v_i, undo singular-value thresholding's shrinkage
    max_density: float = Field(0.5, ge=0, le=1)  # sparse candidates per matrix, as a fraction of m·n (0: ranks only)
    count_indices: bool = True               # a sparse entry costs value + int32 index (false: the paper's 1)


# The options robust PCA reads (the rpca stage): the rest (count_indices) only matter to the search.
ROBUST_PCA_FIELDS = frozenset({"iterations", "lam_scale", "rho", "triples", "whiten", "debias", "max_density"})


def robust_pca_options(options: CapOptions) -> CapOptions:
    """`options` with every field robust PCA does not read at its default: one robust PCA serves them all."""
    defaults = {name: field.default for name, field in CapOptions.model_fields.items()
                if name not in ROBUST_PCA_FIELDS and name != "name"}
    return options.model_copy(update=defaults)


def rpca_units(options: CapOptions, weight: torch.Tensor, gram: torch.Tensor, count: int,
               whitening: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """One matrix's units. `weight` (m, n); `gram` (n, n) Σ x xᵀ over `count` tokens (float64); with
    `options.whiten`, `whitening` is its Cholesky factor S. Returns (tensors, the robust PCA history):
    u (m, k), sigma (k,), vh (k, n) with L = u diag(σ) vh, sparse_values (c,), sparse_indices (c,)
    int64 flat row-major, and triple_score (k,), sparse_score (c,) float64 — each kind sorted by
    descending score. Floats are float64."""
    w = weight.to(torch.float64)
    split = _residual_svd_split if options.triples == "residual_svd" else _rpca_split
    u, sigma, vh, sparse, history = split(options, w, gram, whitening)
    triple_score = sigma ** 2 * ((vh @ gram) * vh).sum(1) / count
    order = triple_score.argsort(descending=True)
    sparse_score, indices = _entry_scores(sparse, gram, count)
    return {"u": u[:, order].contiguous(), "sigma": sigma[order], "vh": vh[order].contiguous(),
            "triple_score": triple_score[order], "sparse_values": sparse.reshape(-1)[indices],
            "sparse_indices": indices, "sparse_score": sparse_score}, history


def _entry_scores(sparse: torch.Tensor, gram: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(score, flat index) of the non-zero entries of `sparse` (m, n), by descending score S_ij² G_jj / N."""
    flat = sparse.reshape(-1)
    indices = flat.nonzero().squeeze(1)
    score = flat[indices] ** 2 * gram.diagonal()[indices % sparse.shape[1]] / count
    order = score.argsort(descending=True)
    return score[order], indices[order]


def _largest_entries(matrix: torch.Tensor, gram: torch.Tensor, keep: int) -> torch.Tensor:
    """`matrix` with all but its `keep` highest-scoring (M_ij² G_jj) non-zero entries set to zero."""
    if keep >= int((matrix != 0).sum()):
        return matrix
    out = torch.zeros_like(matrix).reshape(-1)
    chosen = (matrix ** 2 * gram.diagonal()).reshape(-1).topk(keep).indices
    out[chosen] = matrix.reshape(-1)[chosen]
    return out.view_as(matrix)


def _robust_pca(options: CapOptions, x: torch.Tensor):
    """Robust PCA of `x` with the options' λ = lam_scale/√max(m, n), iterations and ρ."""
    return robust_pca(x, lam=options.lam_scale / math.sqrt(max(x.shape)), iterations=options.iterations,
                      rho=options.rho)


def _residual_svd_split(options: CapOptions, w: torch.Tensor, gram: torch.Tensor, whitening: torch.Tensor | None):
    """S from robust PCA of W·D, D = diag(√G_jj) (each column weighted by its input's norm, as Wanda
    weighs an entry; a column scaling keeps S sparse in W), capped at `max_density`; the triples are the
    full SVD of W − S (of (W − S)·S with `whiten`), so the search decides the rank, not where three
    thresholding steps stopped."""
    scale = gram.diagonal().clamp_min(0).sqrt()
    scale = scale.clamp_min(float(scale.max()) * 1e-6 + 1e-30)  # a dead input channel: no division by 0
    result = _robust_pca(options, w * scale)
    sparse = _largest_entries(result.sparse / scale, gram, int(options.max_density * w.numel()))
    rest = w - sparse
    u, sigma, vh = reduced_svd(rest @ whitening if options.whiten else rest)
    keep = int((sigma > 0).sum())
    vh = apply_inverse_right(vh[:keep], whitening) if options.whiten else vh[:keep]
    return u[:, :keep], sigma[:keep], vh, sparse, result.history


def _rpca_split(options: CapOptions, w: torch.Tensor, gram: torch.Tensor, whitening: torch.Tensor | None):
    """L = robust PCA's low-rank part of X = W·S (`whiten`) or W, debiased; the entries of R = W − L."""
    target = w @ whitening if options.whiten else w
    result = _robust_pca(options, target)
    if options.debias:  # the least-squares scale of each triple on the matrix itself, not SVT's σ − 1/μ
        result.sigma = ((result.u.T @ target) * result.vh).sum(1)
    vh = apply_inverse_right(result.vh, whitening) if options.whiten else result.vh
    residual = w - (result.u * result.sigma) @ vh
    return result.u, result.sigma, vh, _largest_entries(residual, gram, int(options.max_density * w.numel())), \
        result.history


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
                  shape: tuple[int, int], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """W̃ (m, n) in `dtype` on `device` (None: the units') from a matrix's units and its masks (triples (k,),
    entries (c,) bool): only the kept triples are multiplied (the cost falls with the rank kept) — selected
    where the units are, multiplied on `device` (a GPU: the kept factors copied, not all the units)."""
    b, a, indices, values = (t.to(device) for t in kept_units(units, triples, entries))
    flat = (b @ a).reshape(-1)
    flat.index_add_(0, indices.long(), values.to(flat.dtype))
    return flat.view(shape).to(dtype)

register_method(Method("cap", CapOptions, None, needs=frozenset({"gram"}), structure=SPARSE, version=VERSION,
                       sparse_factor=cap_factor, reads=("rpca", "search"), allocations=("search",)))
