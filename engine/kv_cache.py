"""The physical paged KV store: per layer, K and V tensors of [num_blocks, block_size, kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.errors import ConfigError
from engine.model_spec import ModelSpec


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype: torch.dtype

    @classmethod
    def for_model(cls, spec: ModelSpec, block_size: int, dtype: torch.dtype) -> KVCacheLayout:
        return cls(spec.num_layers, spec.num_kv_heads, spec.head_dim, block_size, dtype)

    @property
    def bytes_per_token(self) -> int:
        element = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @property
    def bytes_per_block(self) -> int:
        return self.bytes_per_token * self.block_size

    def num_blocks_for(self, budget_bytes: int) -> int:
        blocks = budget_bytes // self.bytes_per_block
        if blocks < 1:
            raise ConfigError(
                f"kv_cache_memory of {budget_bytes} bytes holds no block (one block takes {self.bytes_per_block} bytes)"
            )
        return int(blocks)


def allocate_kv_cache(
    layout: KVCacheLayout, num_blocks: int, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks, layout.block_size, layout.num_kv_heads, layout.head_dim)
    return [
        (torch.zeros(shape, dtype=layout.dtype, device=device), torch.zeros(shape, dtype=layout.dtype, device=device))
        for _ in range(layout.num_layers)
    ]
