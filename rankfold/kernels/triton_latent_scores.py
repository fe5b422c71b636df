"""Triton kernel of `latent_key_scores` (kernels/latent_scores.py): decode scores against latent keys.

Program (b·H + h, i) owns query head h of batch row b and key tile i (BLOCK_T cached tokens). It
loads the tile's latents of h's head group (dequantising packed codes on load when quantised),
rebuilds the two halves of h's KV head's keys in registers, k₁ = lat·L₁ᵀ and k₂ = lat·L₂ᵀ (BLOCK_R
rank slices, fp32 accumulation), rotates them at positions t + offset[b] with angles computed
in-kernel, and reduces with the query: s = scale · Σ (q₁·(k₁cos − k₂sin) + q₂·(k₂cos + k₁sin)).
Tails (tokens, rank, half head dim) are masked, so no shape needs padding.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from rankfold.kernels.latent_quant import QuantizedLatents


@triton.jit
def _latent_tile(lat_ptr, planes_ptr, min_ptr, step_ptr, b, t, t_ok, cols, col_ok,
                 s_lb, s_lt, s_pb, s_pt, s_pbit, s_mb, s_mt,
                 QUANT: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr):
    """(BLOCK_T, BLOCK_R) latents at token rows t and latent columns cols, float32."""
    mask = t_ok[:, None] & col_ok[None, :]
    if QUANT:
        code = tl.zeros(mask.shape, dtype=tl.int32)
        for bit in tl.static_range(BITS):
            byte = tl.load(planes_ptr + b * s_pb + t[:, None] * s_pt + bit * s_pbit + (cols // 8)[None, :],
                           mask=mask, other=0).to(tl.int32)
            code += ((byte >> (cols % 8)[None, :]) & 1) << bit
        offs = b * s_mb + t[:, None] * s_mt + (cols // QGROUP)[None, :]
        lo = tl.load(min_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        step = tl.load(step_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        return tl.where(mask, lo + step * code.to(tl.float32), 0.0)
    return tl.load(lat_ptr + b * s_lb + t[:, None] * s_lt + cols[None, :], mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _latent_scores_kernel(
    q_ptr, lat_ptr, planes_ptr, min_ptr, step_ptr, up_ptr, bias_ptr, ranks_ptr, starts_ptr, offsets_ptr,
    freq_ptr, out_ptr,
    heads, rep, group_heads, tokens, half, scale, rope_scaling,
    s_qb, s_qh, s_lb, s_lt, s_pb, s_pt, s_pbit, s_mb, s_mt, s_up, s_ob, s_oh,
    QUANT: tl.constexpr, BITS: tl.constexpr, QGROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    bh = tl.program_id(0)
    b, h = bh // heads, bh % heads
    kv = h // rep
    group = kv // group_heads
    rank = tl.load(ranks_ptr + group)
    start = tl.load(starts_ptr + group)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < tokens
    i = tl.arange(0, BLOCK_D)
    i_ok = i < half
    row1 = kv * 2 * half + i  # L's rows of the key's first half, then the second half
    k1 = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    k2 = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for r0 in range(0, rank, BLOCK_R):
        j = r0 + tl.arange(0, BLOCK_R)
        j_ok = j < rank
        lat = _latent_tile(lat_ptr, planes_ptr, min_ptr, step_ptr, b, t, t_ok, start + j, j_ok,
                           s_lb, s_lt, s_pb, s_pt, s_pbit, s_mb, s_mt, QUANT, BITS, QGROUP)
        u_mask = j_ok[:, None] & i_ok[None, :]
        u1 = tl.load(up_ptr + row1[None, :] * s_up + j[:, None], mask=u_mask, other=0.0).to(tl.float32)
        u2 = tl.load(up_ptr + (row1 + half)[None, :] * s_up + j[:, None], mask=u_mask, other=0.0).to(tl.float32)
        k1 += tl.dot(lat, u1, input_precision="ieee")
        k2 += tl.dot(lat, u2, input_precision="ieee")
    if HAS_BIAS:
        k1 += tl.load(bias_ptr + row1, mask=i_ok, other=0.0).to(tl.float32)[None, :]
        k2 += tl.load(bias_ptr + row1 + half, mask=i_ok, other=0.0).to(tl.float32)[None, :]
    position = (t + tl.load(offsets_ptr + b)).to(tl.float32)
    angle = position[:, None] * tl.load(freq_ptr + i, mask=i_ok, other=0.0)[None, :]
    cos, sin = tl.cos(angle) * rope_scaling, tl.sin(angle) * rope_scaling
    q1 = tl.load(q_ptr + b * s_qb + h * s_qh + i, mask=i_ok, other=0.0).to(tl.float32)
    q2 = tl.load(q_ptr + b * s_qb + h * s_qh + half + i, mask=i_ok, other=0.0).to(tl.float32)
    score = tl.sum((k1 * cos - k2 * sin) * q1[None, :] + (k2 * cos + k1 * sin) * q2[None, :], axis=1)
    tl.store(out_ptr + b * s_ob + h * s_oh + t, score * scale, mask=t_ok)


def latent_key_scores_triton(q: torch.Tensor, latents: torch.Tensor | QuantizedLatents, up: torch.Tensor,
                             ranks: torch.Tensor, starts: torch.Tensor, group_heads: int, offsets: torch.Tensor,
                             inv_freq: torch.Tensor, scale: float, bias: torch.Tensor | None = None,
                             rope_scaling: float = 1.0, block_t: int = 32) -> torch.Tensor:
    batch, heads, d = q.shape
    if d % 2:
        raise ValueError(f"RoPE needs an even head dim, got {d}")
    kv_heads = up.shape[0] // d
    quant = isinstance(latents, QuantizedLatents)
    tokens = (latents.minimum if quant else latents).shape[1]
    out = torch.empty(batch, heads, tokens, device=q.device, dtype=torch.float32)
    if tokens == 0:
        return out
    q, up = q.contiguous(), up.contiguous()
    if quant:
        planes, lo, step = latents.planes.contiguous(), latents.minimum.contiguous(), latents.step.contiguous()
        lat = lo  # unused pointer
        lat_strides = (0, 0)
        extra = {"BITS": latents.bits, "QGROUP": latents.group}
    else:
        lat = latents if latents.stride(-1) == 1 else latents.contiguous()
        planes = lo = step = lat
        lat_strides = (lat.stride(0), lat.stride(1))
        extra = {"BITS": 1, "QGROUP": 8}
    p_strides = (planes.stride(0), planes.stride(1), planes.stride(2)) if quant else (0, 0, 0)
    m_strides = (lo.stride(0), lo.stride(1)) if quant else (0, 0)
    max_rank = up.shape[1]  # up is (kv_heads·d, max rank), zero-padded: no read of `ranks` (a GPU sync a step)
    grid = (batch * heads, triton.cdiv(tokens, block_t))
    _latent_scores_kernel[grid](
        q, lat, planes, lo, step, up, bias if bias is not None else up,
        ranks.to(device=q.device, dtype=torch.int32).contiguous(), starts.to(device=q.device, dtype=torch.int32).contiguous(),
        offsets.to(device=q.device, dtype=torch.int32).contiguous(), inv_freq.to(device=q.device, dtype=torch.float32).contiguous(),
        out, heads, heads // kv_heads, group_heads, tokens, d // 2, float(scale), float(rope_scaling),
        q.stride(0), q.stride(1), *lat_strides, *p_strides, *m_strides, up.stride(0), out.stride(0), out.stride(1),
        QUANT=quant, HAS_BIAS=bias is not None, BLOCK_T=block_t,
        BLOCK_R=max(16, min(64, triton.next_power_of_2(max_rank))), BLOCK_D=max(16, triton.next_power_of_2(d // 2)),
        **extra)
    return out
