"""A paged KV cache stored as 8-bit or 4-bit integers.

Each token's vector for one KV head (``head_dim`` values) is one quantization group with its own fp32 scale and
zero point (asymmetric: ``value = level * scale + zero``, ``zero`` = the group's minimum, ``scale`` = range /
(2^bits - 1)). A group is written once, when its token is, so appending to a partly filled block never re-quantizes
earlier tokens. 4-bit levels are packed two per byte along ``head_dim``: element ``2i`` in the low nibble, ``2i + 1``
in the high one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.packed_levels import pack_levels, quantize_levels, unpack_levels

SUPPORTED_BITS = (8, 4)


@dataclass(frozen=True)
class QuantizedCache:
    data: torch.Tensor  # uint8 [num_blocks, block_size, kv_heads, head_dim * bits / 8]
    scale: torch.Tensor  # float32 [num_blocks, block_size, kv_heads]
    zero: torch.Tensor  # float32 [num_blocks, block_size, kv_heads]
    bits: int

    @classmethod
    def allocate(
        cls, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int, bits: int, device: torch.device
    ) -> QuantizedCache:
        if bits not in SUPPORTED_BITS:
            raise ValueError(f"quantized KV cache supports {SUPPORTED_BITS} bits, not {bits}")
        if head_dim * bits % 8:
            raise ValueError(f"head_dim {head_dim} does not pack into whole bytes at {bits} bits")
        groups = (num_blocks, block_size, num_kv_heads)
        return cls(
            data=torch.zeros(*groups, head_dim * bits // 8, dtype=torch.uint8, device=device),
            scale=torch.zeros(groups, dtype=torch.float32, device=device),
            zero=torch.zeros(groups, dtype=torch.float32, device=device),
            bits=bits,
        )

    @property
    def head_dim(self) -> int:
        return self.data.shape[-1] * 8 // self.bits

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.data.shape[2]

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token takes in this cache (all KV heads): packed levels plus an fp32 scale and zero per head."""
        return self.num_kv_heads * (self.data.shape[-1] + 8)

    def write_rows(self, rows: torch.Tensor, slots: torch.Tensor) -> None:
        """Quantize rows [T, KVH, D] into flat slots [T] (block * block_size + offset), exactly as the Triton write
        kernel does: ``level = floor((x - zero) / scale + 0.5)`` clamped to the level range."""
        levels, scale, zero = quantize_levels(rows.float(), -1, self.bits, torch.float32)
        self.data.view(-1, *self.data.shape[2:]).index_copy_(0, slots, pack_levels(levels, self.bits))
        self.scale.view(-1, self.num_kv_heads).index_copy_(0, slots, scale.squeeze(-1))
        self.zero.view(-1, self.num_kv_heads).index_copy_(0, slots, zero.squeeze(-1))

    def read_rows(self, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized rows [len(slots), KVH, D] at flat slots."""
        data = self.data.view(-1, *self.data.shape[2:]).index_select(0, slots)
        scale = self.scale.view(-1, self.num_kv_heads).index_select(0, slots)
        zero = self.zero.view(-1, self.num_kv_heads).index_select(0, slots)
        return self._dequantize(data, scale, zero, dtype)

    def read_blocks(self, block_ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Dequantized blocks [len(block_ids), block_size, KVH, D]."""
        return self._dequantize(
            self.data.index_select(0, block_ids),
            self.scale.index_select(0, block_ids),
            self.zero.index_select(0, block_ids),
            dtype,
        )

    def _dequantize(self, data: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype):
        # Multiply, then add (not one fused multiply-add): the rounding the Triton kernels and the format specify.
        return (unpack_levels(data, self.bits) * scale[..., None] + zero[..., None]).to(dtype)


PagedCache = torch.Tensor | QuantizedCache  # [num_blocks, block_size, kv_heads, head_dim] dense, or quantized


def read_rows(cache: PagedCache, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows [len(slots), KVH, D] of a dense or quantized paged cache at flat slots, as ``dtype``."""
    if isinstance(cache, QuantizedCache):
        return cache.read_rows(slots, dtype)
    return cache.view(-1, *cache.shape[2:]).index_select(0, slots).to(dtype)


def write_rows(cache: PagedCache, rows: torch.Tensor, slots: torch.Tensor) -> None:
    """Store rows [T, KVH, D] at flat slots of a dense or quantized paged cache."""
    if isinstance(cache, QuantizedCache):
        cache.write_rows(rows, slots)
    else:
        cache.view(-1, *cache.shape[2:]).index_copy_(0, slots, rows.to(cache.dtype))
