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
    def max_level(self) -> int:
        return (1 << self.bits) - 1
