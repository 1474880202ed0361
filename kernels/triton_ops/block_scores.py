"""Page-selection scores (kernels/page_selection.py) of every block-table entry of a decode batch.

Program (sequence, tile of ``BLOCK_B`` table entries) loads each entry's key summaries (min and max per KV head, one
row of head_dim each) through the block table, bounds q . k for the query heads of each KV head and keeps the
maximum over all heads. The selection itself (top-k, sort, gather) is left to PyTorch, and the reduced block tables
go to the unchanged paged decode kernel.

Launch choices: ``BLOCK_B = 16`` entries per program: the [group, entries, head_dim] product of one KV head stays
within a program's registers for group sizes up to 8 at head_dim 128; the kernel reads 2 x head_dim values per
block and head against the block_size x head_dim of attention, so it is not where decode time goes.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.triton_ops.cache_tiles import head_dim_block

BLOCK_B = 16


@triton.jit
def _block_scores_kernel(
    query,
    minimum,
    maximum,
    block_tables,
    scores,
    num_entries,
    stride_query_token,
    stride_query_head,
    stride_summary_block,
    stride_summary_head,
    stride_table,
    stride_scores,
    NUM_KV_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    seq = tl.program_id(0)
    entries = tl.program_id(1) * BLOCK_B + tl.arange(0, BLOCK_B)
    entry_mask = entries < num_entries
    blocks = tl.load(block_tables + seq * stride_table + entries, mask=entry_mask, other=0).to(tl.int64)
    lanes = tl.arange(0, BLOCK_G)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    best = tl.full([BLOCK_B], float("-inf"), tl.float32)
    for kv_head in range(NUM_KV_HEADS):
        heads = kv_head * GROUP + lanes
        q = tl.load(
            query + seq * stride_query_token + heads[:, None] * stride_query_head + dims[None, :],
            mask=(lanes < GROUP)[:, None] & dim_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        rows = blocks[:, None] * stride_summary_block + kv_head * stride_summary_head + dims[None, :]
        summary_mask = entry_mask[:, None] & dim_mask[None, :]
        low = tl.load(minimum + rows, mask=summary_mask, other=0.0).to(tl.float32)
        high = tl.load(maximum + rows, mask=summary_mask, other=0.0).to(tl.float32)
        bound = tl.sum(tl.maximum(q[:, None, :] * low[None, :, :], q[:, None, :] * high[None, :, :]), 2)
        bound = tl.where((lanes < GROUP)[:, None], bound, float("-inf"))  # [BLOCK_G, BLOCK_B]
        best = tl.maximum(best, tl.max(bound, 0))
    tl.store(scores + seq * stride_scores + entries, best, mask=entry_mask)


def scores_launch(num_kv_heads: int, group: int, head_dim: int) -> dict[str, Any]:
    return {
        "NUM_KV_HEADS": num_kv_heads,
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_G": max(2, triton.next_power_of_2(group)),
        "BLOCK_D": head_dim_block(head_dim),
        "BLOCK_B": BLOCK_B,
        "num_warps": 4,
        "enable_fp_fusion": True,
    }


def block_scores(
    query: torch.Tensor, minimum: torch.Tensor, maximum: torch.Tensor, block_tables: torch.Tensor
) -> torch.Tensor:
    """The contract of ``kernels.page_selection.block_scores``: query [B, H, D] (rows contiguous), summaries
    [num_blocks, KVH, D] (contiguous), block_tables [B, entries] -> fp32 [B, entries]."""
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = minimum.shape[1]
    num_entries = block_tables.shape[1]
    if query.stride(-1) != 1 or not minimum.is_contiguous() or not maximum.is_contiguous():
        raise ValueError("query rows and block summaries must be contiguous")
    scores = torch.empty((num_seqs, num_entries), dtype=torch.float32, device=query.device)
    if num_seqs == 0 or num_entries == 0:
        return scores
    _block_scores_kernel[(num_seqs, triton.cdiv(num_entries, BLOCK_B))](
        query,
        minimum,
        maximum,
        block_tables,
        scores,
        num_entries,
        query.stride(0),
        query.stride(1),
        minimum.stride(0),
        minimum.stride(1),
        block_tables.stride(0),
        scores.stride(0),
        **scores_launch(num_kv_heads, num_heads // num_kv_heads, head_dim),
    )
    return scores
