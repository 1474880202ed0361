"""The physical paged KV store: per layer, K and V of [num_blocks, block_size, kv_heads, head_dim], stored in the
model's dtype or quantized to 8 or 4 bits (``kv_cache_dtype``, kernels/quantized_cache.py)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from engine.model_spec import ModelSpec
from kernels.quantized_cache import PagedCache, QuantizedCache

KV_CACHE_BITS = {"int8": 8, "int4": 4}  # kv_cache_dtype names beside "auto" (the model's dtype)


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype
    kv_cache_dtype: str = "auto"

    @classmethod
    def for_model(
        cls, spec: ModelSpec, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto"
    ) -> KVCacheLayout:
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype, kv_cache_dtype)

    @property
    def bits(self) -> int | None:
        """Quantization bits, or None for the model's dtype."""
        return KV_CACHE_BITS.get(self.kv_cache_dtype)

    @property
    def bytes_per_token(self) -> int:
        if self.bits is None:
            per_head = self.head_dim * torch.empty((), dtype=self.dtype).element_size()
        else:
            per_head = self.head_dim * self.bits // 8 + 8  # levels, then an fp32 scale and zero point
        return 2 * self.num_layers * self.num_kv_heads * per_head

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, budget_bytes: int, extra_bytes_per_block: int = 0) -> int:
        """Blocks in ``budget_bytes``; ``extra_bytes_per_block``: what else each block holds (a draft model's rows)."""
        per_block = self.bytes_per_block + extra_bytes_per_block
        blocks = budget_bytes // per_block
        if blocks < 1:
            raise ConfigError(
                f"kv_cache_memory of {budget_bytes} bytes holds no block (one block takes {per_block} bytes)"
            )
        return int(blocks)


def allocate_kv_cache(
    layout: KVCacheLayout, num_blocks: int, device: torch.device
) -> list[tuple[PagedCache, PagedCache]]:
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    bits = layout.bits

    def one() -> PagedCache:
        if bits is None:
            return torch.zeros(shape, dtype=layout.dtype, device=device)
        return QuantizedCache.allocate(*shape, bits, device)

    return [(one(), one()) for _ in range(layout.num_layers)]
