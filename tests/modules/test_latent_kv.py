"""Palu's latent KV cache: the cache stores latents, and logits equal the same factors applied as plain
low-rank k/v projections with transformers' own attention and cache (the simulation)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from rankfold.methods.palu import GroupFactors, group_factors, rotate
from rankfold.modules.latent_cache import (
    LatentCache,
    LatentCacheConfig,
    LatentLayer,
    cache_nbytes,
)
from rankfold.modules.latent_kv import (
    LatentKVAttention,
    LatentKVShape,
    fold_allowed,
    latent_kv_state,
    replace_attention,
)


def _config(bias: bool = False) -> LlamaConfig:
    return LlamaConfig(vocab_size=64, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=6, num_key_value_heads=3, head_dim=16, max_position_embeddings=256,
                       attention_bias=bias)


def _dense(bias: bool = False, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(_config(bias)).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "bias" in name:
                param.copy_(torch.randn_like(param) * 0.5)
            elif param.ndim == 2 and "embed" not in name:
                param.mul_(8.0)
    return model


def _factors(weight: torch.Tensor, group_heads: int, ranks: list[int], hadamard: bool) -> list[GroupFactors]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(weight.shape[1], 4 * weight.shape[1], generator=gen, dtype=torch.float64)
    factor = torch.linalg.cholesky(x @ x.T)
    out = group_factors(weight, factor, 16, group_heads, ranks)
    return [rotate(f) for f in out] if hadamard else out


def _palu(dense: LlamaForCausalLM, group_heads: int, key_ranks: list[int], value_ranks: list[int],
          cache: LatentCacheConfig = LatentCacheConfig(), fold: bool | None = None, hadamard: bool = False  # noqa: B008 (a frozen default)
          ) -> tuple[LlamaForCausalLM, LlamaForCausalLM]:
    """(latent model, simulation: k_proj/v_proj replaced by the dense products L R of the same factors)."""
    latent, simulated = copy.deepcopy(dense), copy.deepcopy(dense)
    for i, layer in enumerate(latent.model.layers):
        attention = layer.self_attn
        keys = _factors(attention.k_proj.weight.detach(), group_heads, key_ranks, hadamard)
        values = _factors(attention.v_proj.weight.detach(), group_heads, value_ranks, hadamard)
        shape = LatentKVShape(6, 3, 16, group_heads, tuple(key_ranks), tuple(value_ranks), False)
        folding = fold_allowed(shape, attention.o_proj) if fold is None else fold
        options = {"group_heads": group_heads, "key_ranks": key_ranks, "value_ranks": value_ranks,
                   "fold_values": folding, "bits": cache.bits, "group": cache.group, "residual": cache.residual,
                   "value_bias": attention.v_proj.bias is not None}
        shape = LatentKVShape.from_options(attention.config, options)
        bias = lambda m: None if m.bias is None else m.bias.detach().double()  # noqa: E731
        state = latent_kv_state(shape, [(f.up, f.down) for f in keys], [(f.up, f.down) for f in values],
                                bias(attention.k_proj), bias(attention.v_proj), attention.o_proj.weight.detach().double(),
                                bias(attention.o_proj))
        replace_attention(layer, "self_attn", options)
        missing, unexpected = layer.self_attn.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
        assert not unexpected and all(k.startswith(("q_proj", "o_proj")) for k in missing)
        sim = simulated.model.layers[i].self_attn
        with torch.no_grad():
            sim.k_proj.weight.copy_(torch.cat([f.up @ f.down for f in keys]))
            sim.v_proj.weight.copy_(torch.cat([f.up @ f.down for f in values]))
    return latent, simulated


CASES = [(1, [8, 16, 12], [16, 8, 4]), (3, [24], [40])]  # per head (M-LRD), all heads (J-LRD)


@pytest.mark.parametrize("group_heads,key_ranks,value_ranks", CASES)
@pytest.mark.parametrize("bias", [False, True])
def test_latent_cache_logits_equal_the_simulation_prefill_and_decode(group_heads, key_ranks, value_ranks, bias):
    latent, simulated = _palu(_dense(bias), group_heads, key_ranks, value_ranks)
    assert isinstance(latent.model.layers[0].self_attn, LatentKVAttention)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    cache_l, cache_s = DynamicCache(config=latent.config), DynamicCache(config=simulated.config)
    a = latent(ids, attention_mask=mask, cache=cache_l, use_cache=True).logits
    b = simulated(ids, attention_mask=mask, cache=cache_s, use_cache=True).logits
    torch.testing.assert_close(a[mask.bool()], b[mask.bool()], rtol=1e-4, atol=1e-4)
    assert all(isinstance(layer, LatentLayer) for layer in cache_l.layers)
    assert cache_l.layers[0].keys.shape == (2, 9, sum(key_ranks))  # latents, not (2, heads, 9, d)
    for step in range(20):
        token = torch.randint(0, 64, (2, 1), generator=torch.Generator().manual_seed(10 + step))
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
        a = latent(token, attention_mask=mask, cache=cache_l, use_cache=True).logits
        b = simulated(token, attention_mask=mask, cache=cache_s, use_cache=True).logits
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_forward_without_a_cache_equals_the_simulation():
    latent, simulated = _palu(_dense(), 1, [8, 16, 12], [16, 8, 4])
    ids = torch.randint(0, 64, (3, 17), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(latent(ids).logits, simulated(ids).logits, rtol=1e-4, atol=1e-4)


def test_generate_greedy_batched_with_padding_and_sampling():
    latent, simulated = _palu(_dense(), 1, [8, 16, 12], [16, 8, 4])
    ids = torch.randint(1, 64, (2, 6), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kw = {"attention_mask": mask, "max_new_tokens": 12, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(latent.generate(ids, **kw), simulated.generate(ids, **kw))
    torch.manual_seed(5)
    sampled_l = latent.generate(ids, **{**kw, "do_sample": True, "top_k": 0})
    torch.manual_seed(5)
    sampled_s = simulated.generate(ids, **{**kw, "do_sample": True, "top_k": 0})
    assert torch.equal(sampled_l, sampled_s)


def test_unfolded_values_equal_folded():
    dense = _dense()
    folded, _ = _palu(dense, 1, [8, 16, 12], [16, 8, 4], fold=True)
    unfolded, _ = _palu(dense, 1, [8, 16, 12], [16, 8, 4], fold=False)
    assert folded.model.layers[0].self_attn.o_proj.in_features == 6 // 3 * 28 < 6 * 16
    ids = torch.randint(0, 64, (2, 11))
    torch.testing.assert_close(folded(ids).logits, unfolded(ids).logits, rtol=1e-4, atol=1e-4)


def test_folding_that_would_grow_o_proj_is_refused():
    shape = LatentKVShape(6, 3, 16, 3, (24,), (40,), True)
    assert not fold_allowed(shape, nn.Linear(96, 48))  # 6 heads × 40 > 96
    with pytest.raises(ValueError, match="cannot be folded"):
        _palu(_dense(), 3, [24], [40], fold=True)


def test_hadamard_leaves_unquantised_outputs_unchanged():
    dense = _dense()
    plain, _ = _palu(dense, 1, [8, 16, 12], [16, 8, 4])
    rotated, _ = _palu(dense, 1, [8, 16, 12], [16, 8, 4], hadamard=True)
    ids = torch.randint(0, 64, (2, 13))
    torch.testing.assert_close(plain(ids).logits, rotated(ids).logits, rtol=1e-4, atol=1e-4)


def test_quantised_cache_holds_packed_codes_and_the_residual_window():
    config = LatentCacheConfig(bits=3, group=8, residual=4)
    latent, _ = _palu(_dense(), 1, [8, 16, 8], [16, 8, 8], cache=config)
    cache = LatentCache(2, config)
    ids = torch.randint(0, 64, (1, 10))
    latent(ids, cache=cache, use_cache=True)
    layer = cache.layers[0]
    assert layer.keys.shape[1] == 4 and layer.quantized_keys.planes.shape == (1, 6, 3, 32 // 8)
    assert layer.get_seq_length() == 10
    # bytes: 6 tokens × (32 + 32 latents) × 3/8 + fp16 min/step per 8 + 4 fp32 tokens × 64
    expected = 6 * 64 * 3 // 8 + 6 * (64 // 8) * 2 * 2 + 4 * 64 * 4
    assert layer.nbytes == expected and cache_nbytes(cache) == 2 * expected


def test_quantised_cache_is_close_to_unquantised_and_worse_at_fewer_bits():
    dense = _dense()
    ids = torch.randint(0, 64, (2, 32))
    reference = _palu(dense, 1, [8, 16, 8], [16, 8, 8])[0](ids).logits.detach()
    errors = {}
    for bits in (2, 4, 8):
        model, _ = _palu(dense, 1, [8, 16, 8], [16, 8, 8], cache=LatentCacheConfig(bits, 8))
        errors[bits] = float((model(ids).logits.detach() - reference).abs().mean())
    assert errors[8] < errors[4] < errors[2] and errors[8] < 0.05 * errors[2]


def test_a_cache_already_holding_keys_is_refused():
    latent, simulated = _palu(_dense(), 1, [8, 16, 12], [16, 8, 4])
    cache = DynamicCache(config=simulated.config)
    ids = torch.randint(0, 64, (1, 5))
    simulated(ids, cache=cache, use_cache=True)
    with pytest.raises(ValueError, match="already holds keys"):
        latent(ids[:, :1], cache=cache, use_cache=True)


@pytest.mark.parametrize("cache", [LatentCacheConfig(), LatentCacheConfig(bits=4, group=8, residual=3)])
def test_decode_through_the_fused_score_kernel_equals_the_torch_path(cache, monkeypatch):
    """RANKFOLD_KERNELS=triton (interpreted on CPU): decode steps score keys in the kernel."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs a GPU or TRITON_INTERPRET=1")
    import rankfold.kernels.triton_latent_scores as kernel

    calls, launch = [], kernel.latent_key_scores_triton
    monkeypatch.setattr(kernel, "latent_key_scores_triton", lambda *a, **k: calls.append(1) or launch(*a, **k))
    latent, _ = _palu(_dense(), 1, [8, 16, 8], [16, 8, 8], cache=cache)
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(6))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :2] = 0
    runs = []
    for backend in ("torch", "triton"):
        monkeypatch.setenv("RANKFOLD_KERNELS", backend)
        kv = DynamicCache(config=latent.config)
        step_mask, logits = mask, [latent(ids, attention_mask=mask, cache=kv, use_cache=True).logits[:, -1]]
        for step in range(2):
            token = torch.full((2, 1), 5 + step)
            step_mask = torch.cat([step_mask, torch.ones(2, 1, dtype=torch.long)], dim=1)
            logits.append(latent(token, attention_mask=step_mask, cache=kv, use_cache=True).logits[:, -1])
        runs.append(torch.stack(logits))
    assert len(calls) >= 2 * 2  # every decode step of both layers went through the kernel
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("residual", [0, 1, 8])
def test_one_pass_reads_the_cache_as_token_by_token_decoding(residual):
    """A one-pass forward (the streamed perplexity), a prefill then decoding, and decoding token by token
    give the same logits at every position: each query reads token j quantised exactly when it is
    `residual` or more tokens older than the query, as its own decode step does."""
    config = LatentCacheConfig(bits=3, group=8, residual=residual)
    latent, _ = _palu(_dense(), 1, [8, 16, 8], [16, 8, 8], cache=config)
    ids = torch.randint(0, 64, (2, 24), generator=torch.Generator().manual_seed(7))
    one_pass = latent(ids).logits
    cache = LatentCache(2, config)
    stepwise = torch.cat([latent(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(24)], dim=1)
    torch.testing.assert_close(one_pass, stepwise, rtol=1e-4, atol=1e-4)
    cache = LatentCache(2, config)
    prefilled = torch.cat([latent(ids[:, :13], cache=cache, use_cache=True).logits]
                          + [latent(ids[:, t:t + 1], cache=cache, use_cache=True).logits for t in range(13, 24)], dim=1)
    torch.testing.assert_close(prefilled, stepwise, rtol=1e-4, atol=1e-4)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding: a boolean model mask on both copies
    padded = latent(ids, attention_mask=mask).logits
    torch.testing.assert_close(padded[0], one_pass[0], rtol=1e-4, atol=1e-4)
