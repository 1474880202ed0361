"""CUDA backend that runs prefill attention in xFormers' memory-efficient kernels (``--attention-backend xformers``).

K/V writes and decode attention stay in Spindle's Triton kernels (a paged decode is what xFormers lacks); each
step's prefills are one xFormers call over all of them: their contexts are gathered from the paged cache into one
packed sequence, with a block-diagonal causal mask aligned to each sequence's last key ("from bottom right": the new
tokens sit after the cached prefix). Needs the ``cuda`` extra (``pip install 'spindle[cuda]'``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from kernels.triton_backend import TritonAttentionBackend, TritonAttentionMetadata

# (query [Tq, H, D], key [Tk, KVH, D], value [Tk, KVH, D], query lengths, context lengths, scale) -> [Tq, H, D]
PackedPrefill = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int], float], torch.Tensor]


def xformers_packed_prefill(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    query_lens: list[int],
    context_lens: list[int],
    scale: float,
) -> torch.Tensor:
    from xformers.ops import memory_efficient_attention
    from xformers.ops.fmha.attn_bias import BlockDiagonalCausalFromBottomRightMask

    num_heads, num_kv_heads = query.shape[1], key.shape[1]
    group = num_heads // num_kv_heads
    # Grouped-query attention in xFormers' 5-D layout [batch, tokens, kv groups, heads per group, dim]; K/V are
    # broadcast over the heads of their group without a copy.
    q = query.view(1, query.shape[0], num_kv_heads, group, query.shape[2])
    k = key.unsqueeze(0).unsqueeze(3).expand(-1, -1, -1, group, -1)
    v = value.unsqueeze(0).unsqueeze(3).expand(-1, -1, -1, group, -1)
    mask = BlockDiagonalCausalFromBottomRightMask.from_seqlens(q_seqlen=query_lens, kv_seqlen=context_lens)
    out = memory_efficient_attention(q, k, v, attn_bias=mask, scale=scale)
    return out.reshape(query.shape)


def _context_slots(block_table: torch.Tensor, length: int, block_size: int) -> torch.Tensor:
    """Flat cache slots of positions 0 .. length - 1 of a sequence."""
    positions = torch.arange(length, device=block_table.device)
    return block_table[positions // block_size].long() * block_size + positions % block_size


class XFormersAttentionBackend(TritonAttentionBackend):
    name = "xformers"

    def __init__(self, device: torch.device, packed_prefill: PackedPrefill = xformers_packed_prefill) -> None:
        super().__init__(device)
        self._packed_prefill = packed_prefill

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        metadata: TritonAttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        prefill = metadata.prefill
        decodes_only = replace(metadata, prefill=None)
        output = super().forward(query, key, value, key_cache, value_cache, decodes_only, scale)
        if prefill is None:
            return output
        query_lens = prefill.query_lens.tolist()
        context_lens = prefill.context_lens.tolist()
        # Every prefill's context, gathered from the cache (which now holds the step's new rows too).
        block_size = key_cache.shape[1]
        slots = torch.cat(
            [_context_slots(table, length, block_size) for table, length in zip(prefill.block_tables, context_lens)]
        )
        keys = key_cache.flatten(0, 1).index_select(0, slots)
        values = value_cache.flatten(0, 1).index_select(0, slots)
        rows = slice(metadata.num_decodes, metadata.num_decodes + sum(query_lens))
        output[rows] = self._packed_prefill(query[rows], keys, values, query_lens, context_lens, scale)
        return output
