"""Page selection (kernels/page_selection.py) around an attention backend that reads dense paged caches.

Each step, the wrapped backend prepares the step as usual. Per layer, the decodes of sequences that hold more blocks
than the budget score their blocks against the layer's queries, and the wrapped backend attends with the reduced
block tables (``with_decode_tables``); prefill chunks attend in full. After the layer's K/V are written, the
summaries of the blocks the step wrote are recomputed, so the next step scores current keys. The step's own decode
row lands in the last block, which is always selected, so scoring before that write loses nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from kernels.backend import AttentionBackend, BatchLayout
from kernels.page_selection import BlockSummaries, DecodeSelection, PageSelectionPolicy, WrittenBlocks, block_scores

BlockScorer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class DecodeTablesBackend(AttentionBackend, Protocol):
    def with_decode_tables(
        self, metadata: Any, block_tables: torch.Tensor, context_lens: torch.Tensor, max_context_len: int
    ) -> Any:
        """The step's metadata with its decodes reading int32 ``block_tables`` up to ``context_lens`` instead."""
        ...


@dataclass(frozen=True)
class PageSelectionMetadata:
    inner: Any
    selection: DecodeSelection | None  # None: no decode of the step holds more blocks than the budget
    written: WrittenBlocks


class PageSelectingBackend:
    def __init__(
        self,
        inner: DecodeTablesBackend,
        policy: PageSelectionPolicy,
        key_caches: list[torch.Tensor],
        scorer: BlockScorer = block_scores,
    ) -> None:
        self.inner = inner
        self.name = inner.name
        self.policy = policy
        self.scorer = scorer
        # A layer's key cache identifies the layer: the model hands each layer's caches to ``forward``.
        self.summaries = {cache.data_ptr(): BlockSummaries(cache) for cache in key_caches}
        self.num_decodes = 0  # decode rows attended so far
        self.num_blocks_read = 0  # blocks those rows read per layer
        self.num_blocks_held = 0  # blocks their sequences held (what full attention reads)

    def prepare(self, layout: BatchLayout, dtype: torch.dtype) -> PageSelectionMetadata:
        num_decodes, block_size = layout.num_decodes, layout.block_size
        context_lens = layout.context_lens[:num_decodes]
        held = [-(-length // block_size) for length in context_lens]
        budget = self.policy.budget_blocks
        self.num_decodes += num_decodes
        self.num_blocks_held += sum(held)
        self.num_blocks_read += sum(min(count, budget) for count in held)
        selection = None
        device = layout.slot_mapping.device
        if num_decodes and max(held) > budget:
            tables = [table[:count] for table, count in zip(layout.block_tables[:num_decodes], held)]
            selection = DecodeSelection.of(tables, context_lens, self.policy, device)
        written = WrittenBlocks.of(layout.slot_mapping, block_size)
        return PageSelectionMetadata(self.inner.prepare(layout, dtype), selection, written)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: PageSelectionMetadata,
        scale: float,
    ) -> torch.Tensor:
        summaries = self.summaries[key_cache.data_ptr()]
        inner = metadata.inner
        selection = metadata.selection
        if selection is not None:
            decodes = query[: selection.block_tables.shape[0]]
            scores = self.scorer(decodes, summaries.minimum, summaries.maximum, selection.block_tables[:, :-1])
            tables = selection.choose(scores)
            inner = self.inner.with_decode_tables(inner, tables, selection.context_lens, selection.max_context_len)
        output = self.inner.forward(query, key, value, key_cache, value_cache, inner, scale)
        summaries.update(key_cache, metadata.written)
        return output
