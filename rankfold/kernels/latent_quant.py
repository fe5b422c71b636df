"""Per-token asymmetric round-to-nearest quantisation of cache latents, packed into real bytes.

Each token's latent (its last dimension) is cut into groups of `group` numbers; each group keeps its
minimum m and step s = (max − m)/(2^b − 1) in float16, and its numbers as b-bit codes
q = round((x − m)/s) ∈ [0, 2^b − 1]; x̂ = m + s·q, so |x − x̂| ≤ s/2 (plus the float16 rounding of
m and s). Per-token groups make appending a token independent of the tokens before it.

Codes are packed as b bit-planes of 8 codes per byte: exactly b/8 bytes per number for any b in
1..8 (2, 3 and 4 bits alike). A width that is not a multiple of the group is padded by repeating each
token's last number (the group's range is unchanged); the padding's codes are stored and counted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SCALE_DTYPE = torch.float16
_PLANE = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


@dataclass
class QuantizedLatents:
    """b-bit codes of (..., n) latents: planes (..., bits, n′/8) uint8; minimum and step (..., n′/group)
    float16, n′ = n rounded up to the group."""

    planes: torch.Tensor
    minimum: torch.Tensor
    step: torch.Tensor
    bits: int
    group: int
    width: int

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.planes, self.minimum, self.step))

    def map(self, fn) -> QuantizedLatents:
        """The same codes with `fn` applied to every tensor's leading (token) dimensions, e.g. a batch index."""
        return QuantizedLatents(fn(self.planes), fn(self.minimum), fn(self.step), self.bits, self.group, self.width)


def check_quantization(bits: int, group: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"latent bits must be in 1..8 (16 = not quantised), got {bits}")
    if group < 8 or group % 8:
        raise ValueError(f"quantisation group must be a positive multiple of 8 (codes pack 8 per byte), got {group}")


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """(..., n) uint8 codes < 2^bits -> (..., bits, n/8) uint8 bit-planes."""
    grouped = codes.reshape(*codes.shape[:-1], 1, -1, 8)
    shifts = torch.arange(bits, dtype=torch.uint8, device=codes.device)[:, None, None]
    planes = (grouped >> shifts) & 1  # (..., bits, n/8, 8)
    return (planes * _PLANE.to(codes.device)).sum(-1, dtype=torch.uint8)


def unpack_bits(planes: torch.Tensor) -> torch.Tensor:
    """(..., bits, n/8) bit-planes -> (..., n) uint8 codes."""
    bits = planes.shape[-2]
    unpacked = (planes[..., None] & _PLANE.to(planes.device)) != 0  # (..., bits, n/8, 8)
    weights = (1 << torch.arange(bits, device=planes.device, dtype=torch.int32))[:, None, None]
    return (unpacked.to(torch.int32) * weights).sum(-3).reshape(*planes.shape[:-2], -1).to(torch.uint8)


def quantize(latents: torch.Tensor, bits: int, group: int) -> QuantizedLatents:
    """Per-token, per-group asymmetric RTN of (..., n) latents (any float dtype)."""
    check_quantization(bits, group)
    width = latents.shape[-1]
    x = latents.float()
    if width % group:
        x = torch.cat([x, x[..., -1:].expand(*x.shape[:-1], group - width % group)], dim=-1)
    x = x.reshape(*latents.shape[:-1], -1, group)
    minimum = x.amin(-1).to(SCALE_DTYPE)
    step = ((x.amax(-1) - minimum.float()) / (2 ** bits - 1)).to(SCALE_DTYPE)
    safe = torch.where(step > 0, step.float(), torch.ones_like(step, dtype=torch.float32))
    codes = ((x - minimum.float()[..., None]) / safe[..., None]).round_().clamp_(0, 2 ** bits - 1)
    return QuantizedLatents(pack_bits(codes.to(torch.uint8).flatten(-2), bits), minimum, step, bits, group, width)


def dequantize(q: QuantizedLatents, dtype: torch.dtype) -> torch.Tensor:
    """x̂ = minimum + step · code, (..., n) in `dtype`."""
    codes = unpack_bits(q.planes).float().reshape(*q.minimum.shape, q.group)
    return (q.minimum.float()[..., None] + q.step.float()[..., None] * codes).flatten(-2)[..., :q.width].to(dtype)


def concat(parts: list[QuantizedLatents], dim: int) -> QuantizedLatents:
    """Join quantised latents along a leading dimension (tokens)."""
    first = parts[0]
    return QuantizedLatents(*(torch.cat([getattr(p, name) for p in parts], dim) for name in
                              ("planes", "minimum", "step")), first.bits, first.group, first.width)
