"""Asymmetric uniform quantization to 2, 4 or 8 bits, and its levels packed into bytes along the last dimension (the
first in the lowest bits): what the per-token int8/int4 cache and the block codecs share."""

from __future__ import annotations

import functools

import torch
from torch.nn import functional as F


def quantize_levels(
    x: torch.Tensor, dim: int, bits: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """fp32 ``x`` in groups along ``dim`` -> uint8 levels (unpacked, shaped as ``x``), and per group (``dim`` kept
    with size 1) ``scale`` = range / (2^bits - 1) and ``zero`` = minimum, both in ``scale_dtype``. Levels are rounded
    to nearest against the stored (so rounded) scale and zero: ``floor((x - zero) / scale + 0.5)``, clamped."""
    max_level = (1 << bits) - 1
    low, high = x.amin(dim, keepdim=True), x.amax(dim, keepdim=True)
    scale, zero = ((high - low) / max_level).to(scale_dtype), low.to(scale_dtype)
    step = scale.float()
    # A constant group has scale 0: every level is 0 and its value is the zero point.
    inverse = torch.where(step > 0, 1 / torch.where(step > 0, step, 1), 0)
    levels = ((x - zero.float()) * inverse + 0.5).floor_().clamp_(0, max_level).to(torch.uint8)
    return levels, scale, zero


def pack_levels(levels: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 levels [..., n] below ``2 ** bits`` -> [..., n * bits // 8] bytes."""
    per_byte = 8 // bits
    if per_byte == 1:
        return levels
    grouped = levels.view(*levels.shape[:-1], -1, per_byte)
    packed = grouped[..., 0].clone()
    for i in range(1, per_byte):
        packed |= grouped[..., i] << (i * bits)
    return packed


@functools.cache
def _byte_levels(bits: int, device: torch.device) -> torch.Tensor:
    """Row b: the ``8 // bits`` levels packed in byte b, as fp32."""
    per_byte, mask = 8 // bits, (1 << bits) - 1
    table = [[(byte >> (i * bits)) & mask for i in range(per_byte)] for byte in range(256)]
    return torch.tensor(table, dtype=torch.float32, device=device)


def unpack_levels(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 [..., n] -> the levels as fp32 [..., n * 8 // bits]. Below 8 bits each byte is looked up in a table of
    its levels: one gather instead of a shift, a mask, a stack and a conversion per level (2-2.5x faster, the same
    values)."""
    if bits == 8:
        return packed.float()
    return F.embedding(packed.int(), _byte_levels(bits, packed.device)).flatten(-2)
