"""The decompositions' defining properties, on synthetic data with realistic (correlated) inputs."""

from __future__ import annotations

import pytest
import torch

from rankfold.methods.asvd import asvd_factors
from rankfold.methods.svd import svd_factors
from rankfold.methods.svd_llm import svd_llm_factors, whitened_spectrum
from rankfold.methods.whitening import whitening_factor


def _correlated_inputs(n: int, tokens: int, seed: int = 0) -> torch.Tensor:
    """X (n × tokens) with a decaying spectrum and a few outlier channels, like LLM activations."""
    gen = torch.Generator().manual_seed(seed)
    mixing = torch.randn(n, n, generator=gen, dtype=torch.float64) * torch.logspace(0, -2, n, dtype=torch.float64)
    x = mixing @ torch.randn(n, tokens, generator=gen, dtype=torch.float64)
    x[:3] *= 20.0
    return x


def _output_error(weight, b, a, x) -> float:
    return float(((weight - b @ a) @ x).pow(2).sum())


@pytest.mark.parametrize("m, n, rank", [(48, 32, 10), (32, 48, 5), (40, 40, 39)])
def test_svd_llm_truncation_loss_equals_dropped_singular_values(m, n, rank):
    x = _correlated_inputs(n, 400)
    weight = torch.randn(m, n, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    factor = whitening_factor(x @ x.T)
    b, a = svd_llm_factors(weight, factor, rank)
    _, sigma, _ = whitened_spectrum(weight, factor)
    dropped = float(sigma[rank:].pow(2).sum())
    assert _output_error(weight, b, a, x) == pytest.approx(dropped, rel=1e-8)


def test_svd_llm_beats_svd_and_asvd_on_the_calibration_inputs():
    x = _correlated_inputs(64, 500)
    weight = torch.randn(96, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    rank = 16
    svd_llm = _output_error(weight, *svd_llm_factors(weight, whitening_factor(x @ x.T), rank), x)
    plain = _output_error(weight, *svd_factors(weight, rank), x)
    asvd = _output_error(weight, *asvd_factors(weight, x.abs().mean(1), rank), x)
    assert svd_llm < asvd < plain


def test_plain_svd_is_eckart_young_optimal():
    weight = torch.randn(30, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    b, a = svd_factors(weight, 7)
    sigma = torch.linalg.svdvals(weight)
    assert float((weight - b @ a).pow(2).sum()) == pytest.approx(float(sigma[7:].pow(2).sum()), rel=1e-10)


@pytest.mark.parametrize("decompose", ["svd", "asvd", "svd_llm"])
def test_full_rank_reconstructs_and_ranks_nest(decompose):
    x = _correlated_inputs(24, 300)
    weight = torch.randn(24, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    make = {"svd": lambda r: svd_factors(weight, r),
            "asvd": lambda r: asvd_factors(weight, x.abs().mean(1), r),
            "svd_llm": lambda r: svd_llm_factors(weight, whitening_factor(x @ x.T), r)}[decompose]
    b, a = make(24)
    torch.testing.assert_close(b @ a, weight, rtol=1e-8, atol=1e-8)
    # Nested: the rank-10 factors are the first 10 directions of the rank-24 ones.
    b10, a10 = make(10)
    torch.testing.assert_close(b10, b[:, :10])
    torch.testing.assert_close(a10, a[:10])


def test_whitening_of_singular_gram_shifts_instead_of_failing():
    x = _correlated_inputs(32, 10)  # 10 tokens for 32 channels: Gram has rank 10
    gram = x @ x.T
    assert torch.linalg.cholesky_ex(gram).info.item() != 0
    factor = whitening_factor(gram)
    assert torch.all(factor.diagonal() > 0)
    assert torch.allclose(factor @ factor.T, gram, rtol=0, atol=1e-6 * float(gram.diagonal().mean()))


def test_whitening_rejects_non_finite_gram():
    gram = torch.eye(4, dtype=torch.float64)
    gram[0, 0] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        whitening_factor(gram)


@pytest.mark.parametrize("n, block", [(7, 3), (64, 64), (100, 32)])
def test_mirror_upper_completes_the_lower_triangle_in_place(n, block):
    from rankfold.methods.whitening import mirror_upper_

    gen = torch.Generator().manual_seed(n)
    full = torch.randn(n, n, generator=gen, dtype=torch.float64)
    expected = torch.triu(full) + torch.triu(full, 1).T
    matrix = torch.triu(full) + torch.tril(torch.randn(n, n, generator=gen, dtype=torch.float64), -1)  # junk below
    result = mirror_upper_(matrix, block=block)
    assert result.data_ptr() == matrix.data_ptr() and torch.equal(matrix, expected)


def test_whitening_gives_up_on_a_gram_no_small_ridge_can_fix():
    gram = -torch.eye(6, dtype=torch.float64)  # not a Gram of any inputs: negative definite
    with pytest.raises(ValueError, match="Cholesky failed even after shifting"):
        whitening_factor(gram)


def test_singular_gram_is_shifted_by_the_smallest_ridge_that_works():
    x = _correlated_inputs(32, 10)
    gram = x @ x.T
    factor = whitening_factor(gram.clone())
    ridge = float(((factor @ factor.T) - gram).diagonal().mean())
    assert 0 < ridge <= 1e-6 * float(gram.diagonal().mean())
