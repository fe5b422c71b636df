"""The mixed objective's closed form (methods/anchored.py): it is the whitened method's problem with
the target W K H⁻¹ and the Gram H, for every whitened structure."""

from __future__ import annotations

import pytest
import torch

from rankfold.core.errors import DecompositionError
from rankfold.methods.anchored import (
    CorrectionStats,
    OutputStats,
    PairedStats,
    anchored_error,
    corrected_output,
    correction_error,
    mixed_problem,
    output_error,
    output_mixed_problem,
)
from rankfold.methods.cap import rpca_units
from rankfold.methods.group_decomposition import decompose_group
from rankfold.methods.palu import group_factors
from rankfold.methods.registry import METHODS
from rankfold.methods.statistics import InputStats
from rankfold.methods.structure import plan_layer
from rankfold.methods.whitening import whitening_factor
from rankfold.workers import anchored_tasks
from rankfold.workers.anchored_tasks import AnchoredItem, GroupProblem, choose, fit_mixed

N, TOKENS = 24, 400


def streams(seed: int = 0, drift: float = 0.3) -> tuple[torch.Tensor, torch.Tensor]:
    """(X, X̂) (tokens, n) float64 with outlier channels, X̂ a drifted copy of X."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(TOKENS, N, generator=generator, dtype=torch.float64) * torch.linspace(0.2, 3.0, N, dtype=torch.float64)
    return x, x + drift * torch.randn(TOKENS, N, generator=generator, dtype=torch.float64) @ torch.randn(
        N, N, generator=generator, dtype=torch.float64) / N ** 0.5


def paired(x: torch.Tensor, x_hat: torch.Tensor) -> PairedStats:
    stats = PairedStats.zeros(x.shape[1])
    stats.add_(x, x_hat)
    return stats


def objective(w, approx, x, x_hat, weight: float) -> float:
    """(1 − w) ‖W X − W′ X̂‖² + w ‖(W − W′) X‖², with tokens as rows."""
    return float((1 - weight) * (x @ w.T - x_hat @ approx.T).square().sum()
                 + weight * (x @ (w - approx).T).square().sum())


def test_anchored_error_is_the_output_error():
    x, x_hat = streams()
    w, approx = torch.randn(10, N, dtype=torch.float64), torch.randn(10, N, dtype=torch.float64)
    direct = float((x @ w.T - x_hat @ approx.T).square().sum())
    assert anchored_error(w, approx, paired(x, x_hat)) == pytest.approx(direct, rel=1e-10)


@pytest.mark.parametrize("weight", [0.0, 0.3, 0.9])
def test_the_objective_is_the_whitened_distance_to_the_target(weight):
    """(1 − w)‖WX − W′X̂‖² + w‖(W − W′)X‖² = ‖(W′ − W R) L‖² + const for every W′: so minimising the
    whitened distance (what every whitened structure does) minimises the objective."""
    x, x_hat = streams()
    w = torch.randn(10, N, dtype=torch.float64)
    correction, hessian = mixed_problem(paired(x, x_hat), weight)
    factor = torch.linalg.cholesky(hessian.gram)
    target = w @ correction
    gaps = []
    for seed in range(3):
        other = torch.randn(10, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        gaps.append(objective(w, other, x, x_hat, weight) - float(((other - target) @ factor).square().sum()))
    assert gaps[1] == pytest.approx(gaps[0], rel=1e-9) and gaps[2] == pytest.approx(gaps[0], rel=1e-9)


GROUP = [("attn_in", ("q", "k", "v"))]


def _layout(method: str, weights: dict[str, torch.Tensor]):
    shapes = {path: tuple(w.shape) for path, w in weights.items()}
    return plan_layer(METHODS.get(method).structure, GROUP, shapes, 0.4)


def _weights(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {p: torch.randn(m, N, generator=generator, dtype=torch.float64) for p, m in (("q", 16), ("k", 8), ("v", 8))}


def _fit(method: str, weights, stats: PairedStats, mix: float):
    modules = _layout(method, weights)
    result, approximations = fit_mixed(METHODS.get(method).options(name=method), weights, stats, mix, modules)
    stacked = [torch.cat([weights[p] for p in module.members]) for module in modules]
    return result, list(zip(stacked, approximations))


@pytest.mark.parametrize("method", ["svd_llm", "skipcat"])
def test_the_fitted_factors_minimise_the_objective(method):
    """Low rank (svd_llm: one per matrix) and one projection shared by q, k, v (skipcat): at its own
    weight the mixed fit beats the plain and the anchored fits on the mixed objective."""
    x, x_hat = streams(1)
    weights, stats, weight = _weights(2), paired(*streams(1)), 0.5
    scores = {}
    for name, mix in (("mixed", weight), ("plain", 1.0), ("anchored", 0.0)):
        _, pairs = _fit(method, weights, stats, mix)
        scores[name] = sum(objective(w, a, x, x_hat, weight) for w, a in pairs)
    assert scores["mixed"] < scores["plain"] and scores["mixed"] < scores["anchored"]


@pytest.mark.parametrize("method", ["svd_llm", "skipcat"])
def test_the_plain_weight_and_an_undrifted_stream_give_the_plain_factors(method):
    """w = 1 is the plain method exactly; X̂ = X gives the plain factors at any weight."""
    x, _ = streams(3)
    weights = _weights(4)
    plain = decompose_group(METHODS.get(method).options(name=method), weights,
                            InputStats(x.T @ x, x.abs().sum(0), x.shape[0]), _layout(method, weights))
    at_one, _ = _fit(method, weights, paired(*streams(3)), 1.0)
    assert all(torch.equal(at_one.tensors[k], plain.tensors[k]) for k in plain.tensors)
    for mix in (0.0, 0.5):
        undrifted, _ = _fit(method, weights, paired(x, x), mix)
        for key, value in plain.tensors.items():
            if value.is_floating_point():
                torch.testing.assert_close(undrifted.tensors[key], value, rtol=1e-7, atol=1e-9)
            else:
                assert torch.equal(undrifted.tensors[key], value)


def _choice(method: str, weights, candidates: tuple[float, ...], **options):
    item = AnchoredItem("", METHODS.get(method).options(name=method, **options), "layers.0.", "attn_in", (),
                        None, "", None, "", candidates)
    return choose(item, weights, _layout(method, weights), GroupProblem(paired(*streams(5)), paired(*streams(6))))


def test_a_weight_the_method_refuses_is_not_eligible(monkeypatch):
    """A candidate whose factors the method refuses (SkipCat's ill-conditioned skip block) is skipped
    and reported; when every candidate is refused the error names the group and the weights."""
    fit = anchored_tasks.fit_mixed

    def refusing_zero(method, weights, stats, mix, modules):
        if mix == 0.0:
            raise DecompositionError("cond(A₁) too large")
        return fit(method, weights, stats, mix, modules)

    monkeypatch.setattr(anchored_tasks, "fit_mixed", refusing_zero)
    _, kept, errors, refused = _choice("skipcat", _weights(7), (0.0, 0.5, 1.0))
    assert refused == [0.0] and set(errors) == {"0.5", "1.0"} and kept in (0.5, 1.0)
    monkeypatch.setattr(anchored_tasks, "fit_mixed", fit)
    with pytest.raises(DecompositionError, match=r"layers\.0\.attn_in.*\[0\.0, 1\.0\].*max_condition"):
        _choice("skipcat", _weights(7), (0.0, 1.0), max_condition=1.0001)


@pytest.mark.parametrize("candidates", [(0.0, 0.5, 1.0), (0.5,)])
def test_the_kept_weight_is_refitted_on_the_held_out_sequences_too(candidates):
    """The held-out rows choose the weight; the kept factors are fitted on every row (one candidate: no
    choice, every row)."""
    weights = _weights(7)
    result, kept, errors, _ = _choice("svd_llm", weights, candidates)
    assert (len(errors) > 1) == (len(candidates) > 1)
    every, fitted_only = paired(*streams(5)) + paired(*streams(6)), paired(*streams(5))
    refitted, _ = _fit("svd_llm", weights, every, kept)
    without, _ = _fit("svd_llm", weights, fitted_only, kept)
    for key, value in refitted.tensors.items():
        torch.testing.assert_close(result.tensors[key], value)
    assert any(not torch.allclose(without.tensors[k], result.tensors[k]) for k in result.tensors if result.tensors[k].is_floating_point())


def test_the_dense_streams_statistics_alone_fit_the_plain_method_only():
    """PairedStats.dense_zeros / add_dense_: G and Σ|x| as the paired statistics hold them, the plain fit
    (w = 1) the same, and any other weight refused."""
    torch.manual_seed(0)
    x, x_hat = torch.randn(40, 6, dtype=torch.float64), torch.randn(40, 6, dtype=torch.float64)
    paired, dense = PairedStats.zeros(6), PairedStats.dense_zeros(6)
    for rows in (slice(0, 25), slice(25, 40)):
        paired.add_(x[rows], x_hat[rows])
        dense.add_dense_(x[rows])
    dense = dense + PairedStats.dense_zeros(6)  # the held-out rows' (none) added, as the walk's refit does
    assert dense.dense_only and not paired.dense_only and dense.count == paired.count == 40
    assert torch.allclose(dense.gram, paired.gram) and torch.allclose(dense.abs_sum_hat, x.abs().sum(0))
    correction, hessian = mixed_problem(dense, 1.0)
    assert correction is None and torch.allclose(hessian.gram, mixed_problem(paired, 1.0)[1].gram)
    with pytest.raises(ValueError, match="dense stream alone"):
        mixed_problem(dense, 0.5)


def test_a_weight_outside_zero_one_is_refused():
    with pytest.raises(ValueError, match="weight must lie in"):
        mixed_problem(paired(*streams()), 1.5)


def test_the_output_correction_is_the_least_squares_fit_and_blends_towards_the_fitted_b():
    generator = torch.Generator().manual_seed(5)
    latent = torch.randn(TOKENS, 6, generator=generator, dtype=torch.float64)
    wanted = latent @ torch.randn(6, 10, generator=generator, dtype=torch.float64) + 0.1 * torch.randn(
        TOKENS, 10, generator=generator, dtype=torch.float64)
    stats = CorrectionStats.zeros(10, 6)
    stats.add_(wanted, latent)
    fitted_b = torch.randn(10, 6, generator=generator, dtype=torch.float64)
    least_squares = torch.linalg.lstsq(latent, wanted).solution.T
    torch.testing.assert_close(corrected_output(fitted_b, stats, 0.0), least_squares)
    torch.testing.assert_close(corrected_output(fitted_b, stats, 0.25), 0.75 * least_squares + 0.25 * fitted_b)
    assert torch.equal(corrected_output(fitted_b, stats, 1.0), fitted_b)
    for b in (least_squares, fitted_b):
        assert correction_error(b, stats) == pytest.approx(float((wanted - latent @ b.T).square().sum()), rel=1e-9)


def _palu(weight, stats: PairedStats, mix: float, ranks: list[int]) -> torch.Tensor:
    """Palu's G-LRD (heads of 8 rows, one head a group) of the mixed problem's target W R in the norm of H."""
    correction, hessian = mixed_problem(stats, mix)
    target = weight if correction is None else weight @ correction
    factors = group_factors(target, whitening_factor(hessian.gram.clone()), 8, 1, ranks)
    return torch.cat([f.up @ f.down for f in factors])


def _cap(weight, stats: PairedStats, mix: float, keep: int, density: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(the first `keep` triples' sum, every unit's sum) of CAP's units of the mixed problem's target W R,
    whitened by H."""
    correction, hessian = mixed_problem(stats, mix)
    target = weight if correction is None else weight @ correction
    options = METHODS.get("cap").options(name="cap", max_density=density)
    units, _ = rpca_units(options, target, hessian.gram, hessian.count, whitening_factor(hessian.gram.clone()))
    triples = units["u"] * units["sigma"] @ units["vh"]
    sparse = torch.zeros(weight.numel(), dtype=torch.float64)
    sparse[units["sparse_indices"]] = units["sparse_values"]
    prefix = units["u"][:, :keep] * units["sigma"][:keep] @ units["vh"][:keep]
    return prefix, triples + sparse.view_as(weight)


@pytest.mark.parametrize("structure", ["palu", "cap"])
def test_palu_head_groups_and_cap_units_solve_the_mixed_problem(structure):
    """Palu's k/v head groups and CAP's triples are whitened structures too: fitted to W R in H's norm,
    they beat the plain and the anchored fits on the mixed objective at their weight; w = 1 and X̂ = X
    give the plain factors. CAP's units (sparse entries included) rebuild W R exactly."""
    x, x_hat = streams(8)
    weight, mix = torch.randn(16, N, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 0.5
    stats = paired(x, x_hat)
    fit = (lambda s, w: _palu(weight, s, w, [3, 3])) if structure == "palu" else (
        lambda s, w: _cap(weight, s, w, 6, 0.0)[0])
    scores = {w: objective(weight, fit(stats, w), x, x_hat, mix) for w in (mix, 1.0, 0.0)}
    assert scores[mix] < scores[1.0] and scores[mix] < scores[0.0]
    plain = fit(paired(x, x), 1.0)
    torch.testing.assert_close(fit(paired(x, x), mix), plain, rtol=1e-7, atol=1e-9)
    gram = x.T @ x
    if structure == "palu":
        direct = torch.cat([f.up @ f.down for f in group_factors(weight, torch.linalg.cholesky(gram), 8, 1, [3, 3])])
        torch.testing.assert_close(plain, direct, rtol=1e-7, atol=1e-9)
    else:
        correction, _ = mixed_problem(stats, mix)
        torch.testing.assert_close(_cap(weight, stats, mix, 0, 0.2)[1], weight @ correction, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("weight", [0.0, 0.4, 1.0])
def test_the_output_problem_is_the_whitened_distance_to_its_target(weight):
    """(1 − w) Σ‖e − W′x̂‖² + w ‖(W − W′)X‖² = ‖(W′ − M) L‖² + const for every W′ (output_mixed_problem),
    w = 1 is the plain problem, and output_error is the held-out Σ‖e − W′x̂‖²."""
    x, x_hat = streams(10)
    generator = torch.Generator().manual_seed(11)
    w = torch.randn(10, N, generator=generator, dtype=torch.float64)
    wanted = x @ w.T + 0.3 * torch.randn(TOKENS, 10, generator=generator, dtype=torch.float64)  # W x + drift
    output = OutputStats.zeros(10, N)
    output.add_(wanted, x_hat)
    stats = paired(x, x_hat)
    target, hessian = output_mixed_problem(w, stats, output, weight)
    factor = torch.linalg.cholesky(hessian.gram)
    gaps = []
    for seed in range(3):
        other = torch.randn(10, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        value = (1 - weight) * (wanted - x_hat @ other.T).square().sum() + weight * (x @ (w - other).T).square().sum()
        gaps.append(float(value) - float(((other - target) @ factor).square().sum()))
        assert output_error(other, stats, output) == pytest.approx(float((wanted - x_hat @ other.T).square().sum()),
                                                                   rel=1e-9)
    assert gaps[1] == pytest.approx(gaps[0], rel=1e-9, abs=1e-6) and gaps[2] == pytest.approx(gaps[0], rel=1e-9, abs=1e-6)
    if weight == 1.0:
        assert torch.equal(target, w) and torch.equal(hessian.gram, x.T @ x)
