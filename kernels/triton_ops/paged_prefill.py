"""Prefill / chunked-prefill attention over the paged cache (FlashAttention-2 style, no score matrix in memory).

Each sequence contributes ``query_len`` new tokens at the end of a ``context_len``-token context whose K/V (the new
rows included) are already in the cache. Program (query tile, query head, sequence) keeps a BLOCK_M x head_dim
accumulator with an online softmax and walks the context in BLOCK_N-token tiles gathered through the block table,
stopping at the tile's last query position (causal); tiles past a sequence's queries do nothing.

Launch choices: ``BLOCK_M = 64`` query rows per program (tensor-core friendly, and chunked prefill chunks are
typically hundreds of tokens). ``BLOCK_N = 64`` for head_dim <= 64 and 32 above: the Q tile plus double-buffered K
and V tiles (``num_stages=2``) then stay within ~64 KiB of shared memory at head_dim 128 in fp16, which Ampere and
later give every program with room for two per multiprocessor. ``num_warps=4`` matches a 64-row tile (16 rows per
warp for the mma instructions).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.triton_ops.cache_tiles import (
    KVCache,
    attend_tile,
    cache_arguments,
    exact_fp32_dot,
    head_dim_block,
    residual_buffers_argument,
    residual_window,
)

BLOCK_M = 64


@triton.jit
def _prefill_kernel(
    query,
    key_cache,
    value_cache,
    cache_strides,
    key_scale_strides,
    value_scale_strides,
    output,
    block_tables,
    query_starts,
    query_lens,
    context_lens,
    residual_buffers,
    sm_scale,
    stride_query_token,
    stride_query_head,
    stride_out_token,
    stride_out_head,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT_BITS: tl.constexpr,
    CODEC: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.program_id(2)
    kv_head = head // GROUP
    query_len = tl.load(query_lens + seq)
    context_len = tl.load(context_lens + seq)
    first_row = tl.load(query_starts + seq)
    prefix_len = context_len - query_len
    residual_base, residual_start = residual_window(residual_buffers, seq, context_len, cache_strides, PAGE, CODEC)

    rows = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < query_len
    query_positions = prefix_len + rows
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        query + (first_row + rows)[:, None] * stride_query_token + head * stride_query_head + dims[None, :],
        mask=row_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    # Keys this tile can see: up to its last real query's position; none for a tile past the queries.
    visible_end = tl.minimum(context_len, prefix_len + (tile + 1) * BLOCK_M)
    visible_end = tl.where(tile * BLOCK_M < query_len, visible_end, 0)

    running_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start in range(0, visible_end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < visible_end
        # Every real row sees position 0 in the first tile, so its running max is finite from then on; padding
        # rows sit past the context and see every valid key.
        visible = valid[None, :] & (positions[None, :] <= query_positions[:, None])
        running_max, running_sum, acc = attend_tile(
            q,
            running_max,
            running_sum,
            acc,
            key_cache,
            value_cache,
            block_tables + seq * stride_table,
            positions,
            valid,
            visible,
            kv_head,
            sm_scale,
            residual_base,
            residual_start,
            cache_strides,
            key_scale_strides,
            value_scale_strides,
            dims,
            HEAD_DIM,
            PAGE,
            QUANT_BITS,
            CODEC,
            EXACT_FP32,
        )

    out = acc / tl.where(row_mask, running_sum, 1.0)[:, None]  # rows past the queries saw nothing
    tl.store(
        output + (first_row + rows)[:, None] * stride_out_token + head * stride_out_head + dims[None, :],
        out.to(output.dtype.element_ty),
        mask=row_mask[:, None] & dim_mask[None, :],
    )


def prefill_launch(group: int, head_dim: int, page: int, bits: int, codec: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Compile-time constants and launch options (see the module docstring for the reasoning)."""
    return {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "BLOCK_M": BLOCK_M,
        "BLOCK_N": 64 if head_dim <= 64 else 32,
        "PAGE": page,
        "QUANT_BITS": bits,
        "CODEC": codec,
        "EXACT_FP32": exact_fp32_dot(dtype),
        "num_warps": 4,
        "num_stages": 2,
        "enable_fp_fusion": True,
    }


def paged_prefill_attention(
    query: torch.Tensor,
    key_cache: KVCache,
    value_cache: KVCache,
    output: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    query_lens: torch.Tensor,
    context_lens: torch.Tensor,
    max_query_len: int,
    scale: float,
    residual_buffers: torch.Tensor | None = None,
) -> None:
    """Write into ``output`` [T, H, D] the attention of the prefill rows of ``query`` [T, H, D].

    Sequence i owns rows query_starts[i] .. + query_lens[i] and a context of context_lens[i] tokens, all already in
    the cache; block_tables [S, max blocks] and the three [S] tensors are int32. Codec caches also need each
    sequence's residual buffer (int32 [S]) that the step wrote.
    """
    num_seqs = query_lens.shape[0]
    if num_seqs == 0:
        return
    key_args, cache_args = cache_arguments(key_cache, value_cache)
    _, num_heads, head_dim = query.shape
    num_kv_heads = key_args.data.shape[2]
    _prefill_kernel[(triton.cdiv(max_query_len, BLOCK_M), num_heads, num_seqs)](
        query,
        *cache_args,
        output,
        block_tables,
        query_starts,
        query_lens,
        context_lens,
        residual_buffers_argument(key_args, residual_buffers, context_lens),
        scale,
        query.stride(0),
        query.stride(1),
        output.stride(0),
        output.stride(1),
        block_tables.stride(0),
        **prefill_launch(
            num_heads // num_kv_heads, head_dim, key_args.block_size, key_args.bits, key_args.codec, query.dtype
        ),
    )
