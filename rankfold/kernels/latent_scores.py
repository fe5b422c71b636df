"""Decode-time attention scores against latent keys (Palu): s[b, h, t] = scale · q[b, h] · RoPE_pos(k[b, h, t]),
with the key rebuilt from the cache's latent, k = L_h · latent[b, t, group(h)] + bias_h, at position
pos = t + offset[b]. One function, two paths: `latent_key_scores_torch` (the reference; CPU) and a
Triton kernel that rebuilds keys tile by tile in registers, applies RoPE in-kernel (angles from
inv_freq) and takes the product with the query in the same pass — keys never reach memory. With
quantised latents it dequantises the packed codes (kernels/latent_quant.py) on load.

Shapes: q (B, H, d) after RoPE; latents (B, S, R) — every head group's latent side by side, group k at
columns [start_k, start_k + r_k) — or a QuantizedLatents of them; up (n_kv·d, R_max): row block kv·d…
of KV head kv is L's rows for that head (its group's L, zero-padded to R_max columns); ranks and starts
(G,) int; offsets (B,) int; inv_freq (d/2,) float32; out (B, H, S) float32. Any head count, KV-head
count, head dim (even), group size and rank; fp32 / fp16 / bf16 inputs, fp32 accumulation.
"""

from __future__ import annotations

import torch

from rankfold.kernels.latent_quant import QuantizedLatents, dequantize


def rope_tables(positions: torch.Tensor, inv_freq: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin (…, d/2) float32 at integer `positions` (…)."""
    angles = positions.float()[..., None] * inv_freq.float()
    return angles.cos() * scaling, angles.sin() * scaling


def latent_key_scores_torch(q: torch.Tensor, latents: torch.Tensor | QuantizedLatents, up: torch.Tensor,
                            ranks: torch.Tensor, starts: torch.Tensor, group_heads: int, offsets: torch.Tensor,
                            inv_freq: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                            rope_scaling: float = 1.0) -> torch.Tensor:
    heads, d = q.shape[1:]
    if isinstance(latents, QuantizedLatents):
        latents = dequantize(latents, torch.float32)
    latents = latents.float()
    kv_heads = up.shape[0] // d
    rep = heads // kv_heads
    keys = []
    for kv in range(kv_heads):
        k = kv // group_heads
        lat = latents[..., int(starts[k]):int(starts[k]) + int(ranks[k])]
        key = lat @ up[kv * d:(kv + 1) * d, :int(ranks[k])].float().T  # (B, S, d)
        keys.append(key + (bias[kv * d:(kv + 1) * d].float() if bias is not None else 0.0))
    keys = torch.stack(keys, dim=1)  # (B, kv, S, d)
    positions = torch.arange(keys.shape[2], device=q.device)[None] + offsets.to(q.device)[:, None]
    cos, sin = rope_tables(positions, inv_freq, rope_scaling)  # (B, S, d/2)
    half = d // 2
    k1, k2 = keys[..., :half], keys[..., half:]
    rotated = torch.cat([k1 * cos[:, None] - k2 * sin[:, None], k2 * cos[:, None] + k1 * sin[:, None]], dim=-1)
    rotated = rotated.repeat_interleave(rep, dim=1)  # (B, H, S, d)
    return torch.einsum("bhd,bhsd->bhs", q.float(), rotated) * scale


def latent_key_scores(q, latents, up, ranks, starts, group_heads, offsets, inv_freq, scale, bias=None,
                      rope_scaling: float = 1.0, backend: str = "auto") -> torch.Tensor:
    """Scores of one decode step (see the module docstring); Triton on CUDA, torch elsewhere."""
    from rankfold.kernels import choose_backend, triton_kernel

    if choose_backend(q, backend) == "triton":
        kernel = triton_kernel("triton_latent_scores", "latent_key_scores_triton")
        return kernel(q, latents, up, ranks, starts, group_heads, offsets, inv_freq, scale, bias, rope_scaling)
    return latent_key_scores_torch(q, latents, up, ranks, starts, group_heads, offsets, inv_freq, scale, bias,
                                   rope_scaling)
