"""Anchored and mixed fitting: a whitened method fitted to the dense layer's outputs from the inputs
the already-compressed layers below give it.

Plain fitting (SVD-LLM, SkipCat) minimises ‖(W − W′) X‖ on the dense inputs X, so the errors of the
layers below are never seen. The anchored objective (AA-SVD, arXiv 2604.02119, its `obj4`) fits the
dense outputs from the compressed stream's inputs X̂; the mixed one keeps a weight λ on the plain term:

    min_{W′ of the method's structure}  ‖W X − W′ X̂‖² + λ ‖(W − W′) X‖²

rankfold weighs the two terms by w = λ / (1 + λ) ∈ [0, 1] instead (finite at λ = ∞):
(1 − w) ‖W X − W′ X̂‖² + w ‖(W − W′) X‖². With G = X Xᵀ, Ĝ = X̂ X̂ᵀ, C = X X̂ᵀ, H = (1 − w) Ĝ + w G
and K = (1 − w) C + w G, the objective equals ‖(W′ − W K H⁻¹) L‖² + const with L Lᵀ = H. So it is
the plain method's problem with the weight M = W R (R = K H⁻¹, one n × n correction per input group)
and the Gram H: every whitened structure (low rank, shared projection, skip) solves it unchanged.
w = 1 (λ = ∞) is the plain method (R = I, H = G); w = 0 the pure anchored form; X̂ = X gives R = I,
H = G: the plain factors for any w. Palu's k/v head groups (G-LRD: palu.group_factors on W R with H's
Cholesky factor) and CAP's units (cap.rpca_units on W R and H) are whitened the same way and solve it
unchanged (tests/methods/test_anchored.py). The walk fits the weight method's groups only: Palu's ranks
and CAP's masks are searched over every layer at once, before any layer is fitted, so inside a walk they
would be refitted at ranks and masks searched on the dense statistics — not built yet.

The weight per input group can be chosen on held-out calibration sequences: the candidate whose factors give
the smallest held-out anchored error ‖W X_h − W′ X̂_h‖² (computed from the held-out G, Ĝ, C).

What goes wrong with the pure anchored form (w = 0), measured on SmolLM2-135M (docs/methods/anchored.md):
its target W R is not W. R = C Ĝ⁻¹ is an n × n regression of X on X̂ estimated from the calibration
tokens, so its error lives where Ĝ is weakly excited and whitening by Ĝ weighs those directions up:
the rank is spent on that part of the target. Where the upstream drift is large (40 %) the
correction is systematic and generalises — held-out, the groups keep w ≤ 0.2 — and where it is small
(20 %) the estimation error dominates and the anchored fit loses to plain (SVD-LLM 20 %: 233 vs 183).
The target's spectrum also changes: under SkipCat, W R gives skip blocks with cond(A₁) above
max_condition that W does not (1.5e4 in an MLP group at 40 %), so such a weight is refused. A smaller
held-out error per module does not make a better model: FLRA + SkipCat 40 % mixed (held-out ratio 0.80)
gives 233.0 against plain 176.5; with the output correction 176.5 (second text 251.6 vs 322.3).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from rankfold.methods.statistics import InputStats
from rankfold.methods.whitening import mirror_upper_, whitening_factor


@dataclass
class PairedStats:
    """Statistics of one input group over the dense stream X and the compressed stream X̂ of the same
    tokens: G = Σ x xᵀ, Ĝ = Σ x̂ x̂ᵀ, C = Σ x x̂ᵀ (n × n float64 sums), Σ|x̂| and the token count."""

    gram: torch.Tensor        # G (n, n)
    gram_hat: torch.Tensor    # Ĝ (n, n)
    cross: torch.Tensor       # C (n, n), not symmetric
    abs_sum_hat: torch.Tensor  # (n,)
    count: int

    @classmethod
    def zeros(cls, n: int, device: torch.device | None = None) -> "PairedStats":
        square = lambda: torch.zeros(n, n, dtype=torch.float64, device=device)  # noqa: E731
        return cls(square(), square(), square(), torch.zeros(n, dtype=torch.float64, device=device), 0)

    @classmethod
    def dense_zeros(cls, n: int, device: torch.device | None = None) -> "PairedStats":
        """Statistics of the dense stream alone (add_dense_): G and Σ|x| (n, n), (n,); Ĝ and C empty
        (0, 0) — all the plain method (w = 1, mixed_problem) reads."""
        empty = torch.zeros(0, 0, dtype=torch.float64, device=device)
        return cls(torch.zeros(n, n, dtype=torch.float64, device=device), empty, empty.clone(),
                   torch.zeros(n, dtype=torch.float64, device=device), 0)

    @property
    def dense_only(self) -> bool:
        """Whether these hold the dense stream's statistics alone (dense_zeros)."""
        return self.gram_hat.numel() == 0 and self.gram.numel() > 0

    def add_dense_(self, x: torch.Tensor, product_dtype: torch.dtype = torch.float64) -> None:
        """Add one chunk of the dense stream alone, `x` (..., n): G and Σ|x| (in Σ|x̂|'s place: the plain
        method's statistics)."""
        x = x.reshape(-1, x.shape[-1]).to(product_dtype)
        self.gram.add_(x.T @ x)
        self.abs_sum_hat.add_(x.abs().sum(0))
        self.count += x.shape[0]

    def add_(self, x: torch.Tensor, x_hat: torch.Tensor, product_dtype: torch.dtype = torch.float64) -> None:
        """Add one chunk: `x`, `x_hat` (..., n) are the same tokens' inputs in the two streams."""
        x = x.reshape(-1, x.shape[-1]).to(product_dtype)
        x_hat = x_hat.reshape(-1, x_hat.shape[-1]).to(product_dtype)
        if x.shape != x_hat.shape:
            raise ValueError(f"the two streams' inputs differ in shape: {tuple(x.shape)} vs {tuple(x_hat.shape)}")
        self.gram.add_(x.T @ x)
        self.gram_hat.add_(x_hat.T @ x_hat)
        self.cross.add_(x.T @ x_hat)
        self.abs_sum_hat.add_(x_hat.abs().sum(0))
        self.count += x.shape[0]

    def __add__(self, other: "PairedStats") -> "PairedStats":
        """The statistics of both token sets (e.g. the fitted and the held-out sequences)."""
        return PairedStats(self.gram + other.gram, self.gram_hat + other.gram_hat, self.cross + other.cross,
                           self.abs_sum_hat + other.abs_sum_hat, self.count + other.count)

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.gram": self.gram, f"{prefix}.gram_hat": self.gram_hat, f"{prefix}.cross": self.cross,
                f"{prefix}.abs_sum_hat": self.abs_sum_hat,
                f"{prefix}.count": torch.tensor([self.count], dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str) -> "PairedStats":
        return cls(tensors[f"{prefix}.gram"], tensors[f"{prefix}.gram_hat"], tensors[f"{prefix}.cross"],
                   tensors[f"{prefix}.abs_sum_hat"], int(tensors[f"{prefix}.count"][0]))


def mixed_problem(stats: PairedStats, weight: float) -> tuple[torch.Tensor | None, InputStats]:
    """(R, the Gram H as InputStats) of (1 − w) ‖W X − W′ X̂‖² + w ‖(W − W′) X‖² (w = λ / (1 + λ), the
    plain term's weight: H = (1 − w) Ĝ + w G, K = (1 − w) C + w G, R = K H⁻¹). R (n, n) float64 maps the
    dense weight to the method's target M = W R; None means R = I (w = 1: the plain method).
    Raises ValueError for a weight outside [0, 1], or below 1 for statistics of the dense stream alone."""
    if weight == 1.0:  # the plain method: G as stored, no mirrored copy (n × n float64 at 70B widths)
        return None, InputStats(stats.gram.clone(), stats.abs_sum_hat, stats.count)
    if stats.dense_only:
        raise ValueError(f"statistics of the dense stream alone fit only the plain method (w = 1), not w = {weight}")
    gram, hessian = _mixed_gram(stats, weight)  # raises for a weight outside [0, 1]
    target = (1.0 - weight) * stats.cross + weight * gram       # K
    return _right_solve(target, hessian), InputStats(hessian, stats.abs_sum_hat, stats.count)


def _mixed_gram(stats: PairedStats, weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(G mirrored to full, H = (1 − w) Ĝ + w G) for the plain term's weight w; ValueError outside [0, 1]."""
    if not 0.0 <= weight <= 1.0:
        raise ValueError(f"the plain term's weight must lie in [0, 1], got {weight}")
    gram = mirror_upper_(stats.gram.clone())
    return gram, (1.0 - weight) * stats.gram_hat + weight * gram


def _right_solve(target: torch.Tensor, hessian: torch.Tensor) -> torch.Tensor:
    """K H⁻¹ (float64) for a symmetric H, which is made exactly symmetric (and given whitening's ridge
    when singular) in place."""
    factor = whitening_factor(hessian)  # L Lᵀ = H
    # K H⁻¹ = K L⁻ᵀ L⁻¹: two triangular solves, no inverse formed
    right = torch.linalg.solve_triangular(factor, target.T, upper=False)        # L⁻¹ Kᵀ
    return torch.linalg.solve_triangular(factor.T, right, upper=True).T         # (L⁻ᵀ L⁻¹ Kᵀ)ᵀ = K H⁻¹


def output_mixed_problem(weight: torch.Tensor, stats: PairedStats, output: OutputStats,
                         weight_of_plain: float) -> tuple[torch.Tensor, InputStats]:
    """(the target M (m, n) float64, the Gram H as InputStats) of a block's output projection W (m, n) fitted
    to the dense residual where its output lands: (1 − w) Σ‖e − W′ x̂‖² + w ‖(W − W′) X‖² (`output`: T =
    Σ e x̂ᵀ, E over the same tokens as `stats`). Expanding as in mixed_problem, it is ‖(W′ − M) L‖² + const
    with H = (1 − w) Ĝ + w G = L Lᵀ and M = ((1 − w) T + w W G) H⁻¹: the plain method's problem with
    target M. Unlike W C Ĝ⁻¹ (mixed_problem at w = 0), the target carries what the layers below moved in
    the residual stream, not only in this projection's input. w = 1 is the plain problem (M = W, H = G).
    Raises ValueError for a weight outside [0, 1]."""
    w = weight_of_plain
    if w == 1.0:  # the plain problem: no H built (n × n float64 at 70B widths)
        return weight.to(torch.float64), InputStats(mirror_upper_(stats.gram.clone()), stats.abs_sum_hat, stats.count)
    gram, hessian = _mixed_gram(stats, w)  # raises for a weight outside [0, 1]
    target = (1.0 - w) * output.target + w * (weight.to(torch.float64) @ gram)
    return _right_solve(target, hessian), InputStats(hessian, stats.abs_sum_hat, stats.count)


def output_error(approx: torch.Tensor, stats: PairedStats, output: OutputStats) -> float:
    """Σ‖e − W′ x̂‖² over the tokens of `stats` and `output` (W′: (m, n)): E − 2⟨W′, T⟩ + tr(W′ Ĝ W′ᵀ)."""
    a = approx.to(torch.float64)
    return max(float(output.energy[0] - 2 * (a * output.target).sum() + ((a @ stats.gram_hat) * a).sum()), 0.0)


def anchored_error(weight: torch.Tensor, approx: torch.Tensor, stats: PairedStats) -> float:
    """‖W X − W′ X̂‖_F² over the tokens of `stats` (W, W′: (m, n)), from its G, Ĝ and C:
    tr(W G Wᵀ) − 2 tr(W C W′ᵀ) + tr(W′ Ĝ W′ᵀ)."""
    w, a = weight.to(torch.float64), approx.to(torch.float64)
    gram = mirror_upper_(stats.gram.clone())
    error = ((w @ gram) * w).sum() - 2 * ((w @ stats.cross) * a).sum() + ((a @ stats.gram_hat) * a).sum()
    return max(float(error), 0.0)  # a norm: below zero only by rounding (W′ = W on X̂ = X)


def relative_weights(residual: torch.Tensor) -> torch.Tensor:
    """fitting.token_weights "relative": each token's weight 1 / mean_j y_j² (float64, shape (...)) for the
    dense residual y (..., d) a fit aims at. A token's squared error then counts relative to the scale the
    next RMSNorm divides its residual by, which is what the layers above read. Without it the absolute
    error of the few tokens whose residual is hundreds of times the others' decides the fit: on SmolLM2-135M
    the first position holds 95 % of the residual's energy after layer 20 (rms 973 vs a median 9.3)."""
    return 1.0 / residual.to(torch.float64).square().mean(-1).clamp_min(1e-30)


@dataclass
class OutputStats:
    """What fitting a block's output projection (o_proj, down_proj) toward the dense residual reads, over
    tokens: e (m) the output the projection should give so the compressed residual where it lands (after
    attention for o_proj, the layer's output for down_proj) equals the dense one — the dense residual
    minus everything else the compressed layer adds there — and v (k) what the fit maps from: the
    projection's input x̂ (output_mixed_problem) or its latent u = A x̂ (CorrectionStats).
    T = Σ e vᵀ (m, k) and E = Σ‖e‖², float64 sums."""

    target: torch.Tensor   # T (m, k)
    energy: torch.Tensor   # E, shape (1,)
    count: int

    @classmethod
    def zeros(cls, m: int, k: int, device: torch.device | None = None) -> "OutputStats":
        return cls(torch.zeros(m, k, dtype=torch.float64, device=device),
                   torch.zeros(1, dtype=torch.float64, device=device), 0)

    def add_(self, wanted: torch.Tensor, inputs: torch.Tensor, product_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Add one chunk: `wanted` (..., m) the outputs e, `inputs` (..., k) the v of the same tokens.
        Returns v as (tokens, k) in the product dtype."""
        e = wanted.reshape(-1, wanted.shape[-1]).to(product_dtype)
        v = inputs.reshape(-1, inputs.shape[-1]).to(product_dtype)
        self.target.add_(e.T @ v)
        self.energy.add_(e.square().sum().to(torch.float64))
        self.count += v.shape[0]
        return v

    def __add__(self, other):
        """The statistics of both token sets (e.g. the fitted and the held-out sequences)."""
        return type(self)(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def to_tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.{f.name}": torch.tensor([self.count], dtype=torch.int64) if f.name == "count"
                else getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str):
        return cls(*(int(tensors[f"{prefix}.count"][0]) if f.name == "count" else tensors[f"{prefix}.{f.name}"]
                     for f in fields(cls)))


@dataclass
class CorrectionStats(OutputStats):
    """OutputStats over the latent u = A x̂ of a fitted projection y = B u (+ bias), with P = Σ u uᵀ (r, r):
    what the output correction of B reads."""

    latent_gram: torch.Tensor   # P (r, r)

    @classmethod
    def zeros(cls, m: int, r: int, device: torch.device | None = None) -> "CorrectionStats":
        base = OutputStats.zeros(m, r, device)
        return cls(base.target, base.energy, 0, torch.zeros(r, r, dtype=torch.float64, device=device))

    def add_(self, wanted: torch.Tensor, latent: torch.Tensor, product_dtype: torch.dtype = torch.float64) -> torch.Tensor:
        u = super().add_(wanted, latent, product_dtype)
        self.latent_gram.add_(u.T @ u)
        return u


def corrected_output(b: torch.Tensor, stats: CorrectionStats, weight: float) -> torch.Tensor:
    """B′ (m, r) float64 minimising (1 − w) Σ‖e − B′u‖² + w Σ‖(B − B′) u‖²: (1 − w) T P⁻¹ + w B — both
    terms share P, so the mix is a blend of the least-squares B and the fitted one (w = 1 keeps B)."""
    if weight == 1.0:
        return b.to(torch.float64)
    factor = whitening_factor(stats.latent_gram.clone())  # P = L Lᵀ (a ridge if a latent never varies)
    least_squares = torch.cholesky_solve(stats.target.T, factor).T  # T P⁻¹
    return (1.0 - weight) * least_squares + weight * b.to(torch.float64)


def correction_error(b: torch.Tensor, stats: CorrectionStats) -> float:
    """Σ‖e − B u‖² = E − 2 tr(B Tᵀ) + tr(B P Bᵀ) over the tokens of `stats`."""
    b = b.to(torch.float64)
    return max(float(stats.energy[0] - 2 * (b * stats.target).sum() + ((b @ stats.latent_gram) * b).sum()), 0.0)
