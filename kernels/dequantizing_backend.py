"""Attention over a quantized paged cache for backends that read dense caches (the CPU ones).

Each step, the blocks the batch reads are dequantized once per layer into a dense working set, and the wrapped
backend runs on it through block tables renumbered into that set. New rows are written quantized first and handed
on dequantized, so every row is attended in its stored form, as the Triton kernels do. Dequantizing costs a pass
over the batch's resident KV per layer: memory is what this buys, not speed (the README measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.backend import AttentionBackend, BatchLayout
from kernels.quantized_cache import QuantizedCache


@dataclass(frozen=True)
class DequantizingMetadata:
    slot_mapping: torch.Tensor  # where new rows go in the quantized cache
    working_blocks: torch.Tensor  # the cache blocks the step reads, in working-set order
    inner: Any  # the wrapped backend's metadata, over the working set


class DequantizingBackend:
    def __init__(self, inner: AttentionBackend) -> None:
        self.inner = inner
        self.name = inner.name

    def prepare(self, layout: BatchLayout, dtype: torch.dtype) -> DequantizingMetadata:
        block_size = layout.block_size
        index: dict[int, int] = {}
        tables = []
        for table, context_len in zip(layout.block_tables, layout.context_lens):
            tables.append([index.setdefault(block, len(index)) for block in table[: -(-context_len // block_size)]])
        slots = layout.slot_mapping
        working = torch.tensor(list(index), dtype=torch.long, device=slots.device)
        remap = torch.full((int(working.max()) + 1 if len(index) else 1,), -1, dtype=torch.long, device=slots.device)
        remap[working] = torch.arange(len(index), device=slots.device)
        working_slots = remap[slots // block_size] * block_size + slots % block_size
        inner_layout = BatchLayout(layout.query_lens, layout.context_lens, tables, working_slots, block_size)
        return DequantizingMetadata(slots, working, self.inner.prepare(inner_layout, dtype))

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: QuantizedCache,
        value_cache: QuantizedCache,
        metadata: DequantizingMetadata,
        scale: float,
    ) -> torch.Tensor:
        slots, dtype = metadata.slot_mapping, query.dtype
        key_cache.write_rows(key, slots)
        value_cache.write_rows(value, slots)
        working_keys = key_cache.read_blocks(metadata.working_blocks, dtype)
        working_values = value_cache.read_blocks(metadata.working_blocks, dtype)
        stored_key, stored_value = key_cache.read_rows(slots, dtype), value_cache.read_rows(slots, dtype)
        return self.inner.forward(query, stored_key, stored_value, working_keys, working_values, metadata.inner, scale)
