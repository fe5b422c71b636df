"""Latent-key decode scores: the Triton kernel (TRITON_INTERPRET=1 on CPU) against the torch reference,
and the reference against keys rebuilt and rotated the way transformers does it."""

from __future__ import annotations

import os

import pytest
import torch

from rankfold.kernels.latent_quant import quantize
from rankfold.kernels.latent_scores import latent_key_scores_torch

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"


def _problem(batch, heads, kv_heads, d, group_heads, ranks, tokens, dtype, bias=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    groups = kv_heads // group_heads
    assert len(ranks) == groups
    starts = torch.tensor([0] + list(torch.tensor(ranks).cumsum(0)[:-1]))
    up = torch.zeros(kv_heads * d, max(ranks))
    for kv in range(kv_heads):
        up[kv * d:(kv + 1) * d, :ranks[kv // group_heads]] = torch.randn(d, ranks[kv // group_heads], generator=gen) / 4
    return dict(q=torch.randn(batch, heads, d, generator=gen).to(dtype),
                latents=torch.randn(batch, tokens, sum(ranks), generator=gen).to(dtype),
                up=up.to(dtype), ranks=torch.tensor(ranks), starts=starts, group_heads=group_heads,
                offsets=torch.arange(batch) * 3, inv_freq=1.0 / (10000 ** (torch.arange(0, d, 2).float() / d)),
                scale=d ** -0.5, bias=(torch.randn(kv_heads * d, generator=gen) / 4).to(dtype) if bias else None)


def test_reference_equals_transformers_rope_on_rebuilt_keys():
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    p = _problem(2, 6, 3, 16, 1, [8, 5, 12], 11, torch.float64, bias=True)
    keys = []
    for kv in range(3):
        lat = p["latents"][..., int(p["starts"][kv]):int(p["starts"][kv]) + int(p["ranks"][kv])]
        keys.append(lat @ p["up"][kv * 16:(kv + 1) * 16, :int(p["ranks"][kv])].T + p["bias"][kv * 16:(kv + 1) * 16])
    keys = torch.stack(keys, 1)
    positions = torch.arange(11)[None] + p["offsets"][:, None]
    freqs = positions.double()[..., None] * p["inv_freq"].double()
    emb = torch.cat([freqs, freqs], -1)
    _, rotated = apply_rotary_pos_emb(keys, keys, emb.cos(), emb.sin())
    expected = torch.einsum("bhd,bhsd->bhs", p["q"], rotated.repeat_interleave(2, 1)) * p["scale"]
    torch.testing.assert_close(latent_key_scores_torch(**p).double(), expected, rtol=1e-5, atol=1e-5)


SHAPES = [  # (heads, kv heads, head dim, group heads, ranks, tokens)
    (9, 3, 64, 1, [32, 24, 40], 37),      # SmolLM2, per head, ragged length
    (9, 3, 64, 3, [96], 33),              # SmolLM2, joint
    (32, 8, 128, 4, [256, 200], 19),      # Llama-2/3-style, groups of 4
    (4, 2, 16, 1, [5, 16], 70),           # tiny, odd rank, > two tiles
]


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_kernel_matches_reference(shape, dtype):
    from rankfold.kernels.triton_latent_scores import latent_key_scores_triton

    heads, kv_heads, d, g, ranks, tokens = shape
    p = _problem(1 if heads > 16 else 2, heads, kv_heads, d, g, ranks, tokens, dtype, bias=shape[0] == 4)
    device = "cuda" if torch.cuda.is_available() and not INTERPRETED else "cpu"
    p = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in p.items()}
    expected = latent_key_scores_torch(**p)
    got = latent_key_scores_triton(**p)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="Triton needs a GPU or TRITON_INTERPRET=1")
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kernel_dequantises_packed_latents_on_load(bits):
    from rankfold.kernels.triton_latent_scores import latent_key_scores_triton

    p = _problem(2, 9, 3, 64, 1, [32, 24, 40], 21, torch.float32)
    p["latents"] = quantize(p["latents"], bits, 32)  # 96 latents per token: 3 groups of 32
    torch.testing.assert_close(latent_key_scores_triton(**p), latent_key_scores_torch(**p), rtol=1e-4, atol=1e-4)
