"""Triton kernel for the shared (optionally skip) low-rank linear: one launch yields every member.

Program (i, j) owns token block i and slice j of the rank dimension. It builds z[i, j] =
x[P[r:]]·A′ᵀ (+ x[P[:r]] for skip) in registers — the gather is folded into the loads, the identity
block is a plain add — and multiplies it straight into every member's output: y_c += z[i, j]·B_cᵀ[j].
z never reaches global memory, and each z element is computed once. Rank slices meet in y through an
fp32 atomic add (one slice: plain store), so summation order, hence the last bit, is not fixed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

MAX_MEMBERS = 3  # q/k/v; groups with more members are launched in chunks of three


@triton.jit
def _emit(z, b_ptr, y_ptr, n_out, stride_b, stride_y, rows, row_ok, zcols, zcol_ok,
          ATOMIC: tl.constexpr, BLOCK_N: tl.constexpr):
    """y[rows, :] (+)= z · B[:, zcols]ᵀ, in BLOCK_N column tiles."""
    for n0 in range(0, n_out, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)
        col_ok = cols < n_out
        b_tile = tl.load(b_ptr + cols[None, :] * stride_b + zcols[:, None],
                         mask=zcol_ok[:, None] & col_ok[None, :], other=0.0)  # (BLOCK_R, BLOCK_N) of Bᵀ
        part = tl.dot(z, b_tile)
        targets = y_ptr + rows[:, None] * stride_y + cols[None, :]
        mask = row_ok[:, None] & col_ok[None, :]
        if ATOMIC:
            tl.atomic_add(targets, part, mask=mask)
        else:
            tl.store(targets, part.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _shared_lowrank_kernel(
    x_ptr, perm_ptr, a_ptr,
    b0_ptr, b1_ptr, b2_ptr, y0_ptr, y1_ptr, y2_ptr,
    n0_out, n1_out, n2_out,
    tokens, n_in, rank,
    stride_x, stride_a, stride_b0, stride_b1, stride_b2, stride_y0, stride_y1, stride_y2,
    SKIP: tl.constexpr, MEMBERS: tl.constexpr, ATOMIC: tl.constexpr, FP32_IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < tokens
    zcols = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    zcol_ok = zcols < rank
    if SKIP:
        inner = n_in - rank
    else:
        inner = n_in

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, inner, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        k_ok = ks < inner
        if SKIP:
            channels = tl.load(perm_ptr + rank + ks, mask=k_ok, other=0)  # x[P[r:]]: gathered on load
        else:
            channels = ks
        x_tile = tl.load(x_ptr + rows[:, None] * stride_x + channels[None, :],
                         mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        a_tile = tl.load(a_ptr + zcols[None, :] * stride_a + ks[:, None],
                         mask=zcol_ok[None, :] & k_ok[:, None], other=0.0)  # (BLOCK_K, BLOCK_R) of Aᵀ
        if FP32_IEEE:
            acc += tl.dot(x_tile, a_tile, input_precision="ieee")
        else:
            acc += tl.dot(x_tile, a_tile)
    if SKIP:  # the identity block: z += x[P[:r]]
        kept = tl.load(perm_ptr + zcols, mask=zcol_ok, other=0)
        acc += tl.load(x_ptr + rows[:, None] * stride_x + kept[None, :],
                       mask=row_ok[:, None] & zcol_ok[None, :], other=0.0).to(tl.float32)
    z = acc.to(a_ptr.dtype.element_ty)  # same rounding point as the torch path

    _emit(z, b0_ptr, y0_ptr, n0_out, stride_b0, stride_y0, rows, row_ok, zcols, zcol_ok, ATOMIC, BLOCK_N)
    if MEMBERS > 1:
        _emit(z, b1_ptr, y1_ptr, n1_out, stride_b1, stride_y1, rows, row_ok, zcols, zcol_ok, ATOMIC, BLOCK_N)
    if MEMBERS > 2:
        _emit(z, b2_ptr, y2_ptr, n2_out, stride_b2, stride_y2, rows, row_ok, zcols, zcol_ok, ATOMIC, BLOCK_N)


def default_blocks(tokens: int, rank: int) -> dict[str, int]:
    """Decode (few tokens) wants many small rank slices to fill the GPU; prefill wants big tiles."""
    if tokens <= 16:
        return {"BLOCK_M": 16, "BLOCK_R": 32, "BLOCK_K": 128, "BLOCK_N": 64}
    return {"BLOCK_M": 64, "BLOCK_R": 64 if rank <= 64 else 128, "BLOCK_K": 32, "BLOCK_N": 64}


def shared_lowrank_triton(x: torch.Tensor, a: torch.Tensor, bs: Sequence[torch.Tensor],
                          permutation: torch.Tensor | None = None,
                          biases: Sequence[torch.Tensor | None] | None = None,
                          blocks: dict[str, int] | None = None) -> list[torch.Tensor]:
    """[B_c · z + bias_c for every member c], z = A x or the skip form; x (…, n), outputs (…, m_c)."""
    rank, n_in = a.shape[0], x.shape[-1]
    inner = n_in - rank if permutation is not None else n_in
    if a.shape[1] != inner:
        raise ValueError(f"A is {tuple(a.shape)}; expected ({rank}, {inner}) for input width {n_in}")
    for b in bs:
        if b.dim() != 2 or b.shape[1] != rank or b.dtype != a.dtype:
            raise ValueError(f"every B must be (m, {rank}) in {a.dtype}; got {tuple(b.shape)} {b.dtype}")
    if x.dtype != a.dtype:
        raise ValueError(f"input is {x.dtype} but factors are {a.dtype}")
    lead = x.shape[:-1]
    flat = x.reshape(-1, n_in).contiguous()
    tokens = flat.shape[0]
    a = a if a.stride(-1) == 1 else a.contiguous()  # row strides are kernel arguments: prefix views need
    bs = [b if b.stride(-1) == 1 else b.contiguous() for b in bs]  # no copy (progressive decoding)
    perm = permutation.to(device=x.device, dtype=torch.int64).contiguous() if permutation is not None else a
    blocks = blocks or default_blocks(tokens, rank)
    rank_slices = triton.cdiv(rank, blocks["BLOCK_R"])
    atomic = rank_slices > 1
    outputs = []
    for start in range(0, len(bs), MAX_MEMBERS):
        chunk = bs[start:start + MAX_MEMBERS]
        ys = [torch.zeros(tokens, b.shape[0], device=x.device, dtype=torch.float32) if atomic
              else torch.empty(tokens, b.shape[0], device=x.device, dtype=x.dtype) for b in chunk]
        if tokens:
            padded_b, padded_y = chunk + [chunk[0]] * (MAX_MEMBERS - len(chunk)), ys + [ys[0]] * (MAX_MEMBERS - len(ys))
            grid = (triton.cdiv(tokens, blocks["BLOCK_M"]), rank_slices)
            _shared_lowrank_kernel[grid](
                flat, perm, a, *padded_b, *padded_y, *(b.shape[0] for b in padded_b),
                tokens, n_in, rank, flat.stride(0), a.stride(0), *(b.stride(0) for b in padded_b),
                *(y.stride(0) for y in padded_y),
                SKIP=permutation is not None, MEMBERS=len(chunk), ATOMIC=atomic,
                FP32_IEEE=a.dtype == torch.float32, **blocks)
        outputs.extend(ys)
    biases = list(biases) if biases is not None else [None] * len(bs)
    return [_finish(y, bias, x.dtype, lead) for y, bias in zip(outputs, biases)]


def _finish(y: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype, lead: torch.Size) -> torch.Tensor:
    y = y.to(dtype)
    if bias is not None:
        y = y + bias
    return y.reshape(*lead, y.shape[-1])
