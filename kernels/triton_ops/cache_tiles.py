"""What the Triton kernels share: the paged cache's arguments, loading K/V rows from it, and one attention step.

A cache is either a plain tensor [num_blocks, block_size, kv_heads, head_dim] in the model's dtype or a
``QuantizedCache`` (uint8 levels + per-(token, head) fp32 scale and zero point). Kernels take both through one
argument list; ``QUANT_BITS`` (0, 8 or 4) is a compile-time constant, so each format gets its own specialised binary.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.quantized_cache import QuantizedCache


@dataclass(frozen=True)
class CacheArgs:
    """Pointers and strides of one cache, in the order the kernels take them."""

    data: torch.Tensor
    scale: torch.Tensor  # the data tensor itself for a plain cache: never read there
    zero: torch.Tensor
    stride_block: int
    stride_token: int
    stride_head: int
    scale_stride_block: int
    scale_stride_token: int
    bits: int  # 0 for a plain cache

    @classmethod
    def of(cls, cache: torch.Tensor | QuantizedCache) -> CacheArgs:
        if isinstance(cache, QuantizedCache):
            data = cache.data
            strides = (cache.scale.stride(0), cache.scale.stride(1))
            return cls(data, cache.scale, cache.zero, *data.stride()[:3], *strides, cache.bits)
        return cls(cache, cache, cache, *cache.stride()[:3], 0, 0, 0)

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    def pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.data, self.scale, self.zero

    def strides(self) -> tuple[int, int, int, int, int]:
        return (
            self.stride_block,
            self.stride_token,
            self.stride_head,
            self.scale_stride_block,
            self.scale_stride_token,
        )


def head_dim_block(head_dim: int) -> int:
    """Tiles are powers of two: head_dim 96 is loaded as 128 lanes with the last 32 masked."""
    return triton.next_power_of_2(head_dim)


@triton.jit
def load_rows(data, scale, zero, rows, scale_rows, dims, row_mask, HEAD_DIM: tl.constexpr, QUANT_BITS: tl.constexpr):
    """Rows [N, BLOCK_D] of a cache: ``rows`` [N] are each row's offset in ``data``, ``scale_rows`` [N] in ``scale``.

    Plain caches come back in their own dtype; quantized ones are dequantized to fp32.
    """
    mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    if QUANT_BITS == 0:
        tile = tl.load(data + rows[:, None] + dims[None, :], mask=mask, other=0.0)
    else:
        if QUANT_BITS == 8:
            levels = tl.load(data + rows[:, None] + dims[None, :], mask=mask, other=0).to(tl.float32)
        else:  # 4 bits: element 2i in the low nibble of byte i, 2i + 1 in the high one
            packed = tl.load(data + rows[:, None] + dims[None, :] // 2, mask=mask, other=0).to(tl.int32)
            levels = ((packed >> ((dims[None, :] % 2) * 4)) & 0xF).to(tl.float32)
        step = tl.load(scale + scale_rows, mask=row_mask, other=0.0)
        low = tl.load(zero + scale_rows, mask=row_mask, other=0.0)
        tile = tl.where(mask, levels * step[:, None] + low[:, None], 0.0)
    return tile


def exact_fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the kernels' matmuls run as exact fp32 (``dot(..., EXACT_FP32=True)``).

    fp32 models must not be silently rounded to TF32. Triton's CPU interpreter multiplies bf16 operands as raw bits
    (numpy has no bfloat16), so there bf16 operands are widened to fp32 as well; on a GPU they use tensor cores.
    """
    return dtype == torch.float32 or (dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


@triton.jit
def dot(a, b, EXACT_FP32: tl.constexpr):
    """a @ b with fp32 accumulation; see ``exact_fp32_dot`` for when the operands are taken as exact fp32."""
    return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee") if EXACT_FP32 else tl.dot(a, b)


@triton.jit
def attend_tile(
    q,
    running_max,
    running_sum,
    acc,
    key_data,
    key_scale,
    key_zero,
    value_data,
    value_scale,
    value_zero,
    table,
    positions,
    valid,
    visible,
    kv_head,
    sm_scale,
    stride_block,
    stride_token,
    stride_head,
    scale_stride_block,
    scale_stride_token,
    dims,
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT_BITS: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    """One online-softmax step (FlashAttention-2) of query rows ``q`` [M, BLOCK_D] over the context tokens at
    ``positions`` [N], gathered through the sequence's block ``table``; ``visible`` [M, N] masks scores (padding,
    causality). Rows must have seen at least one visible key by their first step. Returns the updated running max,
    running sum and unnormalised output accumulator."""
    block = tl.load(table + positions // PAGE, mask=valid, other=0).to(tl.int64)
    offset = positions % PAGE
    rows = block * stride_block + offset * stride_token + kv_head * stride_head
    scale_rows = block * scale_stride_block + offset * scale_stride_token + kv_head
    keys = load_rows(key_data, key_scale, key_zero, rows, scale_rows, dims, valid, HEAD_DIM, QUANT_BITS)
    scores = dot(q, tl.trans(keys.to(q.dtype)), EXACT_FP32) * sm_scale
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    alpha = tl.exp(running_max - new_max)
    probs = tl.exp(scores - new_max[:, None])
    running_sum = running_sum * alpha + tl.sum(probs, 1)
    values = load_rows(value_data, value_scale, value_zero, rows, scale_rows, dims, valid, HEAD_DIM, QUANT_BITS)
    acc = acc * alpha[:, None] + dot(probs.to(q.dtype), values.to(q.dtype), EXACT_FP32)
    return new_max, running_sum, acc
