"""Scatter a step's new K/V rows into the paged cache by slot (block * block_size + offset), quantizing if asked.

One program per (token, KV head) row: a row is at most a few hundred bytes, so the grid is what gives the GPU its
parallelism, and one warp is enough per program (``num_warps=1``). Slots < 0 mark padding tokens and are skipped.
Quantized caches get each row's min and range as its zero point and scale (see ``kernels.quantized_cache``);
levels are ``floor((x - zero) / scale + 0.5)`` clamped to [0, 2^bits - 1].
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from kernels.quantized_cache import QuantizedCache
from kernels.triton_ops.cache_tiles import CacheArgs, head_dim_block


@triton.jit
def _quantize(x, low, inverse_step, MAX_LEVEL: tl.constexpr):
    return tl.minimum(tl.maximum(tl.floor((x - low) * inverse_step + 0.5), 0.0), MAX_LEVEL).to(tl.int32)


@triton.jit
def _store_row(
    source,
    data,
    scale,
    zero,
    row,
    scale_row,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT_BITS: tl.constexpr,
):
    dims = tl.arange(0, BLOCK_D)
    mask = dims < HEAD_DIM
    if QUANT_BITS == 0:
        tl.store(data + row + dims, tl.load(source + dims, mask=mask), mask=mask)
    else:
        MAX_LEVEL: tl.constexpr = (1 << QUANT_BITS) - 1
        x = tl.load(source + dims, mask=mask, other=0.0).to(tl.float32)
        low = tl.min(tl.where(mask, x, float("inf")), 0)
        high = tl.max(tl.where(mask, x, float("-inf")), 0)
        step = (high - low) / MAX_LEVEL
        # A constant row has step 0: every level is 0 and its value is the zero point.
        inverse_step = tl.where(step > 0, 1.0 / tl.where(step > 0, step, 1.0), 0.0)
        tl.store(scale + scale_row, step)
        tl.store(zero + scale_row, low)
        if QUANT_BITS == 8:
            tl.store(data + row + dims, _quantize(x, low, inverse_step, MAX_LEVEL).to(tl.uint8), mask=mask)
        else:
            pairs = tl.arange(0, BLOCK_D // 2)
            pair_mask = pairs < HEAD_DIM // 2
            even = tl.load(source + 2 * pairs, mask=pair_mask, other=0.0).to(tl.float32)
            odd = tl.load(source + 2 * pairs + 1, mask=pair_mask, other=0.0).to(tl.float32)
            packed = _quantize(even, low, inverse_step, MAX_LEVEL) | (_quantize(odd, low, inverse_step, MAX_LEVEL) << 4)
            tl.store(data + row + pairs, packed.to(tl.uint8), mask=pair_mask)


@triton.jit
def _write_kv_kernel(
    key,
    value,
    slots,
    key_data,
    key_scale,
    key_zero,
    value_data,
    value_scale,
    value_zero,
    stride_key_token,
    stride_key_head,
    stride_value_token,
    stride_value_head,
    stride_block,
    stride_token,
    stride_head,
    scale_stride_block,
    scale_stride_token,
    PAGE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    QUANT_BITS: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slots + token).to(tl.int64)
    if slot >= 0:
        block = slot // PAGE
        offset = slot % PAGE
        row = block * stride_block + offset * stride_token + head * stride_head
        scale_row = block * scale_stride_block + offset * scale_stride_token + head
        _store_row(
            key + token * stride_key_token + head * stride_key_head,
            key_data,
            key_scale,
            key_zero,
            row,
            scale_row,
            HEAD_DIM,
            BLOCK_D,
            QUANT_BITS,
        )
        _store_row(
            value + token * stride_value_token + head * stride_value_head,
            value_data,
            value_scale,
            value_zero,
            row,
            scale_row,
            HEAD_DIM,
            BLOCK_D,
            QUANT_BITS,
        )


def write_kv_launch(head_dim: int, page: int, bits: int) -> dict[str, Any]:
    # No fused multiply-adds: quantization levels then round exactly as ``floor((x - zero) * (1 / scale) + 0.5)``
    # computed step by step, on every device and in every implementation of the format.
    return {
        "PAGE": page,
        "HEAD_DIM": head_dim,
        "BLOCK_D": head_dim_block(head_dim),
        "QUANT_BITS": bits,
        "num_warps": 1,
        "enable_fp_fusion": False,
    }


def write_kv(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor | QuantizedCache,
    value_cache: torch.Tensor | QuantizedCache,
    slots: torch.Tensor,
) -> None:
    """key/value [T, KVH, D] (last dim contiguous) into the caches at ``slots`` [T] (int64; < 0: skip)."""
    key_args, value_args = CacheArgs.of(key_cache), CacheArgs.of(value_cache)
    layout = (key_args.strides(), key_args.scale_strides, key_args.bits)
    if layout != (value_args.strides(), value_args.scale_strides, value_args.bits):
        raise ValueError("key and value caches must share one layout")
    num_tokens, num_kv_heads, head_dim = key.shape
    if num_tokens == 0:
        return
    if key.stride(-1) != 1 or value.stride(-1) != 1:
        raise ValueError("key/value rows must be contiguous")
    _write_kv_kernel[(num_tokens, num_kv_heads)](
        key,
        value,
        slots,
        *key_args.pointers()[:3],
        *value_args.pointers()[:3],
        key.stride(0),
        key.stride(1),
        value.stride(0),
        value.stride(1),
        *key_args.strides()[:3],
        *key_args.scale_strides[:2],
        **write_kv_launch(head_dim, key_args.block_size, key_args.bits),
    )
