"""The output correction's target (workers/anchored_shard.py correction_pair) and the output fit's
(wanted_output): their statistics give the residual error where each output projection lands, and the
least-squares fit from them lowers it."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from rankfold.methods.anchored import (
    CorrectionStats,
    OutputStats,
    PairedStats,
    corrected_output,
    correction_error,
    output_error,
    output_mixed_problem,
    relative_weights,
)
from rankfold.models.architecture import ARCHITECTURES
from rankfold.modules.lowrank import LowRankLinear
from rankfold.workers.anchored_shard import (
    adds_to_residual,
    capture_input,
    correction_pair,
    dense_side,
    residual_at,
    wanted_output,
)
from rankfold.workers.layers import LayerRunner


def _layers(path: str, rank: int):
    """A random Llama layer and a copy whose `path` is its rank-`rank` truncated SVD."""
    config = LlamaConfig(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                         rms_norm_eps=1e-5)
    torch.manual_seed(0)
    dense = LlamaDecoderLayer(config, layer_idx=0).eval()
    with torch.no_grad():
        for param in dense.parameters():
            param.normal_(0.0, 0.3) if param.ndim == 2 else None
    compressed = copy.deepcopy(dense)
    parent, name = path.rsplit(".", 1)
    weight = dense.get_submodule(path).weight.detach()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    lowrank = LowRankLinear(weight.shape[1], weight.shape[0], rank)
    with torch.no_grad():
        lowrank.A.copy_(s[:rank, None] * vh[:rank])
        lowrank.B.copy_(u[:, :rank])
    setattr(compressed.get_submodule(parent), name, lowrank)
    return dense, compressed, LayerRunner(ARCHITECTURES.get("llama"), config)


@pytest.mark.parametrize("path, point", [("self_attn.o_proj", "post_attention_layernorm"), ("mlp.down_proj", None)])
def test_the_correction_statistics_give_the_residual_error_and_the_fit_lowers_it(path, point):
    dense, compressed, runner = _layers(path, rank=4)
    torch.manual_seed(1)
    x = torch.randn(3, 16, 32)
    x_hat = x + 0.3 * torch.randn_like(x)  # a drifted compressed stream
    stats = CorrectionStats.zeros(32, 4)
    with torch.no_grad():
        wanted, latent = correction_pair(dense, compressed, path, point, runner, x, x_hat)
        stats.add_(wanted, latent)
        assert adds_to_residual(compressed, compressed.get_submodule(path), runner, x_hat, point)
        module = compressed.get_submodule(path)

        def error() -> float:  # ‖dense residual − compressed residual‖² at the projection's target
            return float((residual_at(dense, point, runner, x) -
                          residual_at(compressed, point, runner, x_hat)).double().square().sum())

        before = error()
        assert correction_error(module.B, stats) == pytest.approx(before, rel=1e-4)
        fitted = corrected_output(module.B, stats, 0.0)
        module.B.copy_(fitted.float())
        after = error()
    assert correction_error(fitted, stats) == pytest.approx(after, rel=1e-3)
    assert after < 0.9 * before


def test_a_projection_behind_a_norm_is_not_linear_at_the_residual():
    """o_proj's output reaches the layer's output through the MLP too: no closed-form correction there."""
    dense, compressed, runner = _layers("self_attn.o_proj", rank=4)
    x = torch.randn(2, 8, 32)
    module = compressed.get_submodule("self_attn.o_proj")
    assert not adds_to_residual(compressed, module, runner, x, None)


def test_the_output_statistics_give_the_layer_output_error_and_the_output_fit_lowers_it():
    """fitting.output_mix: with up_proj compressed and the two streams apart, the statistics of the still
    dense down_proj (wanted_output) give the layer-output error, and its least-squares target M (w = 0)
    lowers it to what output_error predicts."""
    dense, compressed, runner = _layers("mlp.up_proj", rank=8)
    torch.manual_seed(2)
    x = torch.randn(8, 32, 32)  # 256 tokens: more than down_proj's 64 inputs, so the fit cannot interpolate
    x_hat = x + 0.3 * torch.randn_like(x)
    path, module = "mlp.down_proj", compressed.get_submodule("mlp.down_proj")
    with torch.no_grad():
        wanted, inputs = wanted_output(dense, compressed, path, None, runner, x, x_hat)
        output, stats = OutputStats.zeros(32, 64), PairedStats.zeros(64)
        output.add_(wanted, inputs)
        stats.add_(capture_input(dense, path, runner, x), inputs)

        def error() -> float:  # ‖dense layer(X) − compressed layer(X̂)‖²
            return float((runner(dense, x) - runner(compressed, x_hat)).double().square().sum())

        before = error()
        assert output_error(module.weight, stats, output) == pytest.approx(before, rel=1e-4)
        target, _ = output_mixed_problem(module.weight, stats, output, 0.0)
        module.weight.copy_(target.float())
        after = error()
    assert output_error(target, stats, output) == pytest.approx(after, rel=1e-3)
    assert after < 0.9 * before


def _relative_problem(dense, compressed, runner, x, x_hat, path="mlp.down_proj"):
    """fitting.token_weights relative as AnchoredShard._output_sums builds it: (OutputStats, PairedStats) of
    the rows scaled by √c, c = relative_weights(dense layer output)."""
    residual, dense_input = dense_side(dense, path, None, runner, x)
    wanted, inputs = wanted_output(dense, compressed, path, None, runner, x, x_hat, residual)
    scale = relative_weights(residual).sqrt().unsqueeze(-1).float()
    output, stats = OutputStats.zeros(32, 64), PairedStats.zeros(64)
    output.add_(wanted * scale, inputs * scale)
    stats.add_(dense_input * scale, inputs * scale)
    return output, stats


def test_relative_token_weights_fit_each_tokens_error_relative_to_its_residual():
    """With one position's residual 100× the others' (a massive activation), the absolute fit spends itself
    on that position; the relative statistics give Σ_t ‖y_t − ŷ_t‖² / mean(y_t²) and their fit lowers that
    below what the absolute fit reaches (and the absolute error, the other way round)."""
    dense, compressed, runner = _layers("mlp.up_proj", rank=8)
    torch.manual_seed(3)
    x = torch.randn(8, 32, 32)
    x[:, 0] *= 100.0  # the first position's residual dominates the absolute error
    x_hat = x + 0.3 * torch.randn_like(x)
    path, module = "mlp.down_proj", compressed.get_submodule("mlp.down_proj")
    with torch.no_grad():
        residual, dense_input = dense_side(dense, path, None, runner, x)
        assert torch.equal(residual, runner(dense, x)) and torch.equal(dense_input, capture_input(dense, path, runner, x))
        relative, relative_stats = _relative_problem(dense, compressed, runner, x, x_hat)
        absolute, absolute_stats = OutputStats.zeros(32, 64), PairedStats.zeros(64)
        wanted, inputs = wanted_output(dense, compressed, path, None, runner, x, x_hat)
        absolute.add_(wanted, inputs)
        absolute_stats.add_(dense_input, inputs)

        def errors() -> tuple[float, float]:  # (absolute, relative) layer-output error
            squared = (runner(dense, x) - runner(compressed, x_hat)).double().square().sum(-1)
            return float(squared.sum()), float((squared * relative_weights(residual)).sum())

        assert output_error(module.weight, relative_stats, relative) == pytest.approx(errors()[1], rel=1e-4)
        fits = {}
        for name, (out, stats) in {"absolute": (absolute, absolute_stats), "relative": (relative, relative_stats)}.items():
            target, _ = output_mixed_problem(module.weight, stats, out, 0.0)
            module.weight.copy_(target.float())
            fits[name] = errors()
    # each the minimiser of its own objective (full rank at w = 0): apart by more than rounding
    assert fits["relative"][1] < 0.98 * fits["absolute"][1] and fits["absolute"][0] < 0.98 * fits["relative"][0], fits
