"""Paged decode attention: one query token per sequence, K/V read through block tables, split-K over the context.

Flash-decoding: program (sequence, KV head, split) attends its query heads to one slice of the context with an
online softmax and writes an unnormalised partial output plus its running max and sum; a second kernel merges the
splits of each (sequence, query head). Without splits a batch of a few long sequences would occupy a few programs
while the GPU's other multiprocessors idle.

Launch choices:
- All query heads that share a KV head run in one program (``BLOCK_H`` = the GQA group rounded up to 16, the smallest
  M of a tensor-core ``tl.dot``), so every K/V tile is read from memory once per group rather than once per head.
- ``BLOCK_N = 64`` context tokens per iteration (four 16-token pages or two 32-token ones; each token's row is
  gathered through the block table): a 64 x 128 fp16 tile is 16 KiB, so K and V tiles double-buffered
  (``num_stages=2``) fit in the shared memory of every CUDA GPU since Volta. KIVI block caches in fp32 with
  head_dim above 64 take 32: their residual rows add a second pair of fp32 tiles, and at 64 tokens the program
  needs 108 KiB (sm_80), more than Ampere/Ada's 99 KiB per block. ``num_warps=4``: the tiles are small;
  more warps add synchronisation without adding memory parallelism in a bandwidth-bound kernel.
- Splits: enough programs to fill the device ~4 times over (multiprocessor count x 4), but no split shorter than 256
  tokens, where merging would cost more than it spreads.
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

BLOCK_N = 64
MIN_SPLIT_TOKENS = 256
PROGRAMS_PER_MULTIPROCESSOR = 4


@triton.jit
def _decode_split_kernel(
    query,
    key_cache,
    value_cache,
    cache_strides,
    key_scale_strides,
    value_scale_strides,
    block_tables,
    context_lens,
    residual_buffers,
    partial_out,
    partial_max,
    partial_sum,
    sm_scale,
    split_tokens,
    stride_query_token,
    stride_query_head,
    stride_table,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT_BITS: tl.constexpr,
    CODEC: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_kv_heads = tl.num_programs(1)
    num_splits = tl.num_programs(2)
    context_len = tl.load(context_lens + seq)
    begin = split * split_tokens
    end = tl.minimum(context_len, begin + split_tokens)
    residual_base, residual_start = residual_window(residual_buffers, seq, context_len, cache_strides, PAGE, CODEC)

    lanes = tl.arange(0, BLOCK_H)
    head_mask = lanes < GROUP
    heads = kv_head * GROUP + lanes
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(
        query + seq * stride_query_token + heads[:, None] * stride_query_head + dims[None, :],
        mask=head_mask[:, None] & dim_mask[None, :],
        other=0.0,
    )
    running_max = tl.full([BLOCK_H], float("-inf"), tl.float32)
    running_sum = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start in range(begin, end, BLOCK_N):
        positions = start + tl.arange(0, BLOCK_N)
        valid = positions < end
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
            valid[None, :],
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

    # Partials are laid out [sequence, query head, split]; a split past the context leaves max -inf, sum 0.
    slots = (seq * num_kv_heads * GROUP + heads) * num_splits + split
    tl.store(partial_max + slots, running_max, mask=head_mask)
    tl.store(partial_sum + slots, running_sum, mask=head_mask)
    tl.store(partial_out + slots[:, None] * HEAD_DIM + dims[None, :], acc, mask=head_mask[:, None] & dim_mask[None, :])


@triton.jit
def _merge_splits_kernel(
    partial_out,
    partial_max,
    partial_sum,
    output,
    num_splits,
    stride_out_token,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    num_heads = tl.num_programs(1)
    splits = tl.arange(0, BLOCK_S)
    split_mask = splits < num_splits
    slots = (seq * num_heads + head) * num_splits + splits
    maxima = tl.load(partial_max + slots, mask=split_mask, other=float("-inf"))
    sums = tl.load(partial_sum + slots, mask=split_mask, other=0.0)
    weights = tl.exp(maxima - tl.max(maxima, 0))  # split 0 always holds tokens, so the max is finite
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    parts = tl.load(
        partial_out + slots[:, None] * HEAD_DIM + dims[None, :], mask=split_mask[:, None] & dim_mask[None, :], other=0.0
    )
    merged = tl.sum(parts * weights[:, None], 0) / tl.sum(sums * weights, 0)
    tl.store(
        output + seq * stride_out_token + head * stride_out_head + dims,
        merged.to(output.dtype.element_ty),
        mask=dim_mask,
    )


def decode_launch(group: int, head_dim: int, page: int, bits: int, codec: bool, dtype: torch.dtype) -> dict[str, Any]:
    """Compile-time constants and launch options of the split kernel (see the module docstring for the reasoning)."""
    return {
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "BLOCK_H": max(16, triton.next_power_of_2(group)),
        "BLOCK_N": BLOCK_N // 2 if codec and dtype == torch.float32 and head_dim > 64 else BLOCK_N,
        "PAGE": page,
        "QUANT_BITS": bits,
        "CODEC": codec,
        "EXACT_FP32": exact_fp32_dot(dtype),
        "num_warps": 4,
        "num_stages": 2,
        "enable_fp_fusion": True,
    }


def merge_launch(head_dim: int, num_splits: int) -> dict[str, Any]:
    return {
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "BLOCK_S": max(triton.next_power_of_2(num_splits), 2),
        "num_warps": 4,
        "enable_fp_fusion": True,
    }


def _multiprocessors(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # the interpreter on the CPU: the count only shapes the split choice


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context_len: int, device: torch.device) -> int:
    wanted_programs = _multiprocessors(device) * PROGRAMS_PER_MULTIPROCESSOR
    by_occupancy = triton.cdiv(wanted_programs, max(num_seqs * num_kv_heads, 1))
    by_length = max(max_context_len // MIN_SPLIT_TOKENS, 1)
    return max(1, min(by_occupancy, by_length))


def paged_decode_attention(
    query: torch.Tensor,
    key_cache: KVCache,
    value_cache: KVCache,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    max_context_len: int,
    scale: float,
    num_splits: int | None = None,
    residual_buffers: torch.Tensor | None = None,
) -> torch.Tensor:
    """query [B, H, D] (last dim contiguous) -> [B, H, D]; int32 block_tables [B, max blocks], context_lens [B] >= 1.
    Codec caches also need each sequence's residual buffer (int32 [B]) that the step wrote."""
    key_args, cache_args = cache_arguments(key_cache, value_cache)
    num_seqs, num_heads, head_dim = query.shape
    num_kv_heads = key_args.data.shape[2]
    output = torch.empty_like(query)
    if num_seqs == 0:
        return output
    if query.stride(-1) != 1:
        raise ValueError("query rows must be contiguous")
    if num_splits is None:
        num_splits = choose_num_splits(num_seqs, num_kv_heads, max_context_len, query.device)
    split_tokens = triton.cdiv(triton.cdiv(max_context_len, num_splits), BLOCK_N) * BLOCK_N
    num_splits = triton.cdiv(max_context_len, split_tokens)
    partial_out = torch.empty((num_seqs, num_heads, num_splits, head_dim), dtype=torch.float32, device=query.device)
    partial_max = torch.empty((num_seqs, num_heads, num_splits), dtype=torch.float32, device=query.device)
    partial_sum = torch.empty_like(partial_max)
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        query,
        *cache_args,
        block_tables,
        context_lens,
        residual_buffers_argument(key_args, residual_buffers, context_lens),
        partial_out,
        partial_max,
        partial_sum,
        scale,
        split_tokens,
        query.stride(0),
        query.stride(1),
        block_tables.stride(0),
        **decode_launch(
            num_heads // num_kv_heads, head_dim, key_args.block_size, key_args.bits, key_args.codec, query.dtype
        ),
    )
    _merge_splits_kernel[(num_seqs, num_heads)](
        partial_out,
        partial_max,
        partial_sum,
        output,
        num_splits,
        output.stride(0),
        output.stride(1),
        **merge_launch(head_dim, num_splits),
    )
    return output
