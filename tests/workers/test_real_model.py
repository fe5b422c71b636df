"""Quality facts on the real SmolLM2-135M and its real activations (not random matrices)."""

from __future__ import annotations

import pytest
import torch

from rankfold.data.text import calibration_samples, load_text, tokenize
from rankfold.jobs.spec import TextSource
from rankfold.methods.asvd import asvd_factors
from rankfold.methods.ranks import rank_for_ratio
from rankfold.methods.svd import svd_factors
from rankfold.methods.svd_llm import svd_llm_factors
from rankfold.methods.whitening import whitening_factor
from rankfold.orchestrator.executor import LocalExecutor
from rankfold.orchestrator.pipeline import perplexity
from rankfold.workers.activations import Activations
from rankfold.workers.calibrate import propagate_layer
from rankfold.workers.evaluate import make_windows
from rankfold.workers.layers import LayerRunner, embed, materialize_layer, runtime_config

pytestmark = pytest.mark.realmodel

# Measured with this test's settings (torch 2.13.0 CPU, fp32): 30.384. The window allows for BLAS
# summation-order differences between machines, not for a changed model, tokenizer or text.
DENSE_PPL_512x4096 = 30.384


def _layer_stats(source, tokens: torch.Tensor, layers: int):
    """Input statistics of the first `layers` layers, through the same workers the pipeline uses."""
    arch, config = source.architecture, runtime_config(source.config)
    runner = LayerRunner(arch, config)
    hidden = Activations(1 << 30)
    for batch in tokens.split(8):
        hidden.append(embed(batch, source.embedding(), torch.float32))
    stats = []
    for i in range(layers):
        layer = materialize_layer(arch, config, i, source.layer_state(i), torch.float32)
        outputs = Activations(1 << 30)
        stats.append(propagate_layer(layer, runner, hidden, outputs, arch.groups))
        hidden = outputs
    return stats


def _weighted_error(weight, b, a, gram) -> float:
    """‖(W − BA) X‖_F² = tr(E G Eᵀ) with G = X Xᵀ."""
    error = weight.double() - b @ a
    return float(torch.einsum("ij,jk,ik->", error, gram, error))


def test_whitened_svd_beats_plain_svd_on_real_activations(smollm2, shared_data):
    text = load_text(TextSource(path=shared_data / "calibration" / "enwiki_excerpt.txt"))
    tokens = tokenize(text, smollm2.tokenizer())
    fit = _layer_stats(smollm2, calibration_samples(tokens, 16, 256, seed=0), layers=2)
    held_out = _layer_stats(smollm2, calibration_samples(tokens, 16, 256, seed=1), layers=2)
    arch = smollm2.architecture
    for i in range(2):
        state = smollm2.layer_state(i)
        for group in arch.groups:
            stats, test_gram = fit[i][group.name], held_out[i][group.name].symmetric_gram()
            factor = whitening_factor(stats.symmetric_gram())
            for member in group.members:
                weight = state[f"{member}.weight"]
                rank = rank_for_ratio(*weight.shape, 0.4)
                errors = {
                    "svd": svd_factors(weight, rank),
                    "asvd": asvd_factors(weight, stats.mean_abs, rank),
                    "svd_llm": svd_llm_factors(weight, factor, rank),
                }
                fit_err = {k: _weighted_error(weight, *f, stats.symmetric_gram()) for k, f in errors.items()}
                test_err = {k: _weighted_error(weight, *f, test_gram) for k, f in errors.items()}
                assert fit_err["svd_llm"] < fit_err["asvd"] < fit_err["svd"], (i, member, fit_err)
                assert test_err["svd_llm"] < test_err["svd"], (i, member, test_err)


def test_dense_smollm2_wikitext2_perplexity(smollm2, shared_data, tmp_path):
    source = TextSource(path=shared_data / "wikitext2" / "wiki.test.raw", lines_as_rows=True)
    windows = make_windows(tokenize(load_text(source), smollm2.tokenizer()), 512, 4096)
    ppl = perplexity(smollm2, windows, torch.float32, 2, LocalExecutor(None), "ppl", None, tmp_path)
    assert ppl == pytest.approx(DENSE_PPL_512x4096, rel=2e-4)
