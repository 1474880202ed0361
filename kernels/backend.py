"""The interface every attention backend implements, and the per-step batch description it is given."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch


@dataclass(frozen=True)
class BatchLayout:
    """One model step's sequences, in the order their tokens appear in the flat batch.

    Decode sequences (exactly one query token) come first; ``query_lens[i]`` new tokens of sequence ``i`` attend to
    ``context_lens[i]`` tokens in total (its cached prefix plus themselves).
    """

    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    slot_mapping: torch.Tensor
    block_size: int
    # Under a block codec (kernels/codec_cache.py): per sequence, the residual buffer its filling block is read from
    # and the one it is written to.
    residual_buffers: list[tuple[int, int]] | None = None

    @property
    def num_decodes(self) -> int:
        count = 0
        for query_len in self.query_lens:
            if query_len != 1:
                break
            count += 1
        return count


def pad_block_tables(tables: list[list[int]], dtype: torch.dtype, device: torch.device | None = None) -> torch.Tensor:
    """[sequences, longest table], padded with block 0 (never read: kernels stop at each context length)."""
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=dtype, device=device)


class AttentionBackend(Protocol):
    """Writes a step's new K/V into the paged cache and computes attention over it.

    ``prepare`` runs once per step and returns backend-specific metadata shared by all layers.
    """

    name: str

    def prepare(self, layout: BatchLayout, dtype: torch.dtype) -> Any: ...

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: Any,
        scale: float,
    ) -> torch.Tensor:
        """query [T, H, D], key/value [T, KVH, D], caches [num_blocks, block_size, KVH, D] -> output [T, H, D]."""
        ...
