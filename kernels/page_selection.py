"""Query-aware page selection for decode (Quest: Tang et al., 2024, "Quest: Query-Aware Sparsity for Efficient
Long-Context LLM Inference"): each decode token attends to a few KV blocks of its sequence instead of all of them.

Every cache block keeps a summary of its keys per KV head: the element-wise minimum and maximum over its written
rows. For a query ``q`` the block's score ``sum_d max(q_d * min_d, q_d * max_d)`` is an upper bound of ``q . k``
over every key of the block, so the blocks holding the keys a query attends to most score high.

Selection is per sequence, not per KV head: one reduced block table serves every head, so the unchanged paged
decode kernels (native CPU and Triton) read it as they read a full one. A block's score is the maximum of the bound
over all query heads, so a block stays if any head wants it. The first ``sink_blocks`` blocks (attention sinks) and
the blocks holding the last ``window_tokens`` tokens are always kept; the best-scored others fill the budget. The
selected blocks keep their order, and since the last (partially filled) block is always among them, the reduced
context is the selected blocks' tokens with the last block's fill unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PageSelectionPolicy:
    """Decode tokens of a sequence holding more than ``budget_blocks`` blocks attend to that many blocks only."""

    budget_blocks: int
    sink_blocks: int
    window_tokens: int
    block_size: int
    name: str = "quest"

    @classmethod
    def from_tokens(cls, budget: int, sink_tokens: int, window_tokens: int, block_size: int) -> PageSelectionPolicy:
        """Budgets in tokens (the KV-policy settings) rounded to whole blocks; ValueError for a budget too small
        to hold the sink blocks, the window's blocks and one block besides."""
        if sink_tokens < 0 or window_tokens < 1:
            raise ValueError(
                f"kv_sink_tokens must be >= 0 and kv_window_tokens >= 1, got {sink_tokens} and {window_tokens}"
            )
        sink_blocks = -(-sink_tokens // block_size)
        # The window's tokens can straddle one more block than they fill.
        least = (sink_blocks + -(-window_tokens // block_size) + 2) * block_size
        if budget < least:
            raise ValueError(
                f"kv_budget ({budget}) must be at least {least} for kv_policy quest: the sink blocks, the blocks of "
                f"the last kv_window_tokens tokens and one more, {block_size} tokens each"
            )
        return cls(budget // block_size, sink_blocks, window_tokens, block_size)


class BlockSummaries:
    """Per cache block and KV head, the element-wise min and max of the keys written to the block so far."""

    def __init__(self, key_cache: torch.Tensor) -> None:
        num_blocks, self.block_size, num_kv_heads, head_dim = key_cache.shape
        shape = (num_blocks, num_kv_heads, head_dim)
        self.minimum = torch.zeros(shape, dtype=key_cache.dtype, device=key_cache.device)
        self.maximum = torch.zeros(shape, dtype=key_cache.dtype, device=key_cache.device)

    def update(self, key_cache: torch.Tensor, written: WrittenBlocks) -> None:
        """Recompute the summaries of the blocks a step wrote, over rows 0 to the last one written. Rows are written
        in order, so that is every row the block holds, and a block reused for another sequence (or rows rewritten
        after rejected drafts) starts over rather than keeping stale keys."""
        if written.blocks.numel() == 0:
            return
        rows = key_cache.index_select(0, written.blocks)  # [blocks, block_size, KVH, D]
        unwritten = written.unwritten[:, :, None, None]
        self.minimum.index_copy_(0, written.blocks, rows.masked_fill(unwritten, float("inf")).amin(1))
        self.maximum.index_copy_(0, written.blocks, rows.masked_fill(unwritten, float("-inf")).amax(1))


@dataclass(frozen=True)
class WrittenBlocks:
    """The blocks one step writes K/V rows to, and which of their rows lie past the last row written."""

    blocks: torch.Tensor  # long [blocks]
    unwritten: torch.Tensor  # bool [blocks, block_size]

    @classmethod
    def of(cls, slot_mapping: torch.Tensor, block_size: int) -> WrittenBlocks:
        blocks, inverse = torch.unique(slot_mapping // block_size, return_inverse=True)
        last = torch.zeros_like(blocks).scatter_reduce_(0, inverse, slot_mapping % block_size, "amax")
        offsets = torch.arange(block_size, device=slot_mapping.device)
        return cls(blocks, offsets[None, :] > last[:, None])


def block_scores(
    query: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, block_tables: torch.Tensor
) -> torch.Tensor:
    """query [B, H, D], summaries [num_blocks, KVH, D], block_tables [B, blocks] -> fp32 [B, blocks]: per table
    entry, the maximum over query heads of the upper bound of q . k (padding entries score whatever block 0 does)."""
    batch, num_heads, head_dim = query.shape
    num_kv_heads = minimum.shape[1]
    q = query.float().view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)

    def gathered(summary: torch.Tensor) -> torch.Tensor:  # [B, KVH, D, blocks]
        rows = summary.index_select(0, block_tables.flatten()).view(batch, -1, num_kv_heads, head_dim)
        return rows.permute(0, 2, 3, 1).float()

    # max(q_d min_d, q_d max_d) takes max_d where q_d > 0 and min_d where q_d < 0: two matmuls over the channels
    # instead of elementwise passes over [B, blocks, heads, D].
    bound = q.clamp_min(0) @ gathered(maximum) + q.clamp_max(0) @ gathered(minimum)  # [B, KVH, group, blocks]
    return bound.flatten(1, 2).amax(1)


@dataclass(frozen=True)
class DecodeSelection:
    """A step's decodes under page selection: what is the same in every layer is worked out once per step, so a
    layer only scores, ranks and gathers."""

    block_tables: torch.Tensor  # [B, blocks + 1]: each decode's blocks, padding, and one spare column
    forced: torch.Tensor  # bool [B, blocks]: entries whose rank is fixed (protected or past the sequence)
    forced_rank: torch.Tensor  # fp32 [B, blocks]: +inf for the protected, -inf for entries past the sequence
    num_blocks: torch.Tensor  # long [B, 1]
    context_lens: torch.Tensor  # int32 [B]: of the reduced contexts
    max_context_len: int  # of the reduced contexts
    k: int

    @classmethod
    def of(
        cls, block_tables: list[list[int]], context_lens: list[int], policy: PageSelectionPolicy, device: torch.device
    ) -> DecodeSelection:
        """``block_tables``: each decode's blocks holding its context (no more)."""
        block_size = policy.block_size
        width = max(len(table) for table in block_tables)
        k = min(policy.budget_blocks, width)
        tables = torch.tensor([table + [0] * (width + 1 - len(table)) for table in block_tables], device=device)
        lens = torch.tensor(context_lens, device=device)
        num_blocks = torch.tensor([len(table) for table in block_tables], device=device)[:, None]
        index = torch.arange(width, device=device)
        first_window_block = ((lens - policy.window_tokens).clamp_min(0) // block_size)[:, None]
        protected = (index < policy.sink_blocks) | (index >= first_window_block)
        beyond = index >= num_blocks
        forced_rank = torch.zeros(tables.shape[0], width, device=device)
        forced_rank.masked_fill_(protected, float("inf")).masked_fill_(beyond, float("-inf"))
        # Every block left out is a full one (the last block is always in the window), so the reduced context is
        # short of the full one by whole blocks.
        reduced = [length - max(len(table) - k, 0) * block_size for table, length in zip(block_tables, context_lens)]
        reduced_lens = torch.tensor(reduced, dtype=torch.int32, device=device)
        return cls(tables.to(torch.int32), protected | beyond, forced_rank, num_blocks, reduced_lens, max(reduced), k)

    def choose(self, scores: torch.Tensor) -> torch.Tensor:
        """scores [B, blocks] fp32 -> int32 [B, k]: the chosen blocks of each decode in their order, then padding."""
        ranked = torch.where(self.forced, self.forced_rank, scores)
        chosen = ranked.topk(self.k, dim=1).indices
        # Entries past a sequence's blocks were only picked to fill k: move them to the spare column, at the end.
        chosen = torch.where(chosen < self.num_blocks, chosen, self.block_tables.shape[1] - 1).sort(dim=1).values
        return self.block_tables.gather(1, chosen)
