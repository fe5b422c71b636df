"""Shared projections: one A·x per input for every member, exact skip forward, loadable layouts."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaAttention, LlamaRotaryEmbedding

from rankfold.modules.layout import CompressedModule, apply_layout
from rankfold.modules.shared import SharedLowRankLinear, SharedProjection
from rankfold.modules.skip import SkipFactors, skip_apply, skip_reparameterize


def _fill(module: torch.nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


def _attention():
    config = LlamaConfig(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
                         vocab_size=16, max_position_embeddings=64)
    config._attn_implementation = "sdpa"
    return config, LlamaAttention(config, layer_idx=0)


@pytest.mark.parametrize("skip", [False, True])
def test_attention_computes_the_shared_projection_once_per_forward(skip):
    config, attention = _attention()
    members = ("q_proj", "k_proj", "v_proj")
    apply_layout(attention, [CompressedModule("shared", members, 12, "attn_in", skip)])
    _fill(attention)
    if skip:
        attention.attn_in.permutation.copy_(torch.randperm(32, generator=torch.Generator().manual_seed(1)))
    calls = []
    original = SharedProjection.group_outputs
    SharedProjection.group_outputs = lambda self, x: (calls.append(1), original(self, x))[1]
    try:
        hidden = torch.randn(2, 5, 32)
        position = LlamaRotaryEmbedding(config)(hidden, torch.arange(5)[None])
        out1 = attention(hidden, position_embeddings=position, attention_mask=None)[0]
        out2 = attention(hidden, position_embeddings=position, attention_mask=None)[0]
    finally:
        SharedProjection.group_outputs = original
    assert len(calls) == 2  # once per forward, not once per member
    assert torch.equal(out1, out2)
    assert attention.attn_in._cached_outputs is None  # released after the last member


def test_cache_never_serves_a_different_input():
    shared = SharedProjection(8, 3, skip=False, consumers=2)
    _fill(shared)
    member, other = SharedLowRankLinear(shared, 4), SharedLowRankLinear(shared, 5)
    _fill(member, 1)
    _fill(other, 2)
    x, y = torch.randn(2, 8), torch.randn(2, 8)
    first = member(x)
    second = member(y)  # same member twice with a new tensor: must recompute
    torch.testing.assert_close(second, torch.nn.functional.linear(y @ shared.A.T, member.B))
    torch.testing.assert_close(first, torch.nn.functional.linear(x @ shared.A.T, member.B))
    torch.testing.assert_close(other(y), torch.nn.functional.linear(y @ shared.A.T, other.B))


def test_projection_refuses_to_run_without_all_members():
    shared = SharedProjection(8, 3, skip=False, consumers=2)
    _fill(shared)
    member = SharedLowRankLinear(shared, 4)
    with pytest.raises(RuntimeError, match="1 of its 2 members"):
        member(torch.randn(2, 8))
    SharedLowRankLinear(shared, 4)
    with pytest.raises(ValueError, match="already feeds"):
        SharedLowRankLinear(shared, 4)


def test_skip_module_matches_reference_forward():
    gen = torch.Generator().manual_seed(2)
    b, a = torch.randn(10, 6, generator=gen, dtype=torch.float64), torch.randn(6, 16, generator=gen, dtype=torch.float64)
    factors: SkipFactors = skip_reparameterize(b, a)
    shared = SharedProjection(16, 6, skip=True, consumers=1, dtype=torch.float64)
    member = SharedLowRankLinear(shared, 10, dtype=torch.float64)
    with torch.no_grad():
        shared.A_prime.copy_(factors.a_prime)
        shared.permutation.copy_(factors.permutation)
        member.B.copy_(factors.b_prime)
    x = torch.randn(3, 16, generator=gen, dtype=torch.float64)
    torch.testing.assert_close(member(x), skip_apply(factors, x))
    torch.testing.assert_close(member(x), x @ (b @ a).T)
