"""Attention over a quantized or block-compressed paged cache for backends that read dense caches (the CPU ones).

Each step, the blocks the batch reads are decoded once per layer into a dense working set, and the wrapped backend
runs on it through block tables renumbered into that set. New rows are stored first (quantized, or staged and
sealed by a block codec) and handed on as stored, so every row is attended in its stored form, as the Triton
kernels do for int8/int4. Decoding costs a pass over the batch's resident KV per layer: memory is what this buys,
not speed (docs/kv-policies.md measures both).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from kernels.backend import AttentionBackend, BatchLayout
from kernels.codec_cache import CodecCache, CodecStep, codec_step
from kernels.quantized_cache import QuantizedCache


@dataclass(frozen=True)
class DequantizingMetadata:
    slot_mapping: torch.Tensor  # where new rows go in the cache
    working_blocks: torch.Tensor  # the cache blocks the step reads, in working-set order
    working_slots: torch.Tensor  # where new rows are in the working set
    inner: Any  # the wrapped backend's metadata, over the working set
    codec: CodecStep | None  # under a block codec


class DequantizingBackend:
    def __init__(self, inner: AttentionBackend, query_decay: float = 0.0) -> None:
        """``query_decay``: per token, how much of ThinK's query energy is kept (kernels/codec_cache.py)."""
        self.inner = inner
        self.name = inner.name
        self.query_decay = query_decay

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
        step = None
        if layout.residual_buffers is not None:
            step = codec_step(layout, layout.residual_buffers, index, self.query_decay)
        return DequantizingMetadata(slots, working, working_slots, self.inner.prepare(inner_layout, dtype), step)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: QuantizedCache | CodecCache,
        value_cache: QuantizedCache | CodecCache,
        metadata: DequantizingMetadata,
        scale: float,
    ) -> torch.Tensor:
        dtype, blocks = query.dtype, metadata.working_blocks
        if isinstance(key_cache, CodecCache):
            assert isinstance(value_cache, CodecCache) and metadata.codec is not None
            key_cache.write(key, metadata.codec, query)
            value_cache.write(value, metadata.codec)
            working_keys = key_cache.read_blocks(blocks, dtype, metadata.codec)
            working_values = value_cache.read_blocks(blocks, dtype, metadata.codec)
        else:
            assert isinstance(value_cache, QuantizedCache)
            key_cache.write_rows(key, metadata.slot_mapping)
            value_cache.write_rows(value, metadata.slot_mapping)
            working_keys = key_cache.read_blocks(blocks, dtype)
            working_values = value_cache.read_blocks(blocks, dtype)
        stored_key = working_keys.flatten(0, 1).index_select(0, metadata.working_slots)
        stored_value = working_values.flatten(0, 1).index_select(0, metadata.working_slots)
        return self.inner.forward(query, stored_key, stored_value, working_keys, working_values, metadata.inner, scale)
