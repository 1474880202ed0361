"""What the Triton kernels share: the paged cache's arguments, loading K/V rows from it, and one attention step.

A cache is one of three formats, each a compile-time specialisation of every kernel:

- plain: a tensor [num_blocks, block_size, kv_heads, head_dim] in the model's dtype (``QUANT_BITS = 0``);
- quantized: a ``QuantizedCache``, uint8 levels with an fp32 scale and zero point per (token, KV head)
  (``QUANT_BITS`` 8 or 4);
- KIVI blocks: a ``CodecCache`` whose sealed blocks hold 2-, 4- or 8-bit levels with fp16 scales and zero points,
  per channel for keys and per token for values, and whose filling block of each sequence lives in that sequence's
  residual buffer in the model's dtype (``CODEC``; see kernels/codec_cache.py). A position at or past the last full
  block of its context (``context_len // page * page``) is read from the residual buffer the step wrote.

Kernels take all three through one argument list; arguments a format does not use point at its data tensor and are
never read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from kernels.codec_cache import CodecCache
from kernels.kv_codecs import GroupQuantizer
from kernels.quantized_cache import QuantizedCache

KVCache = torch.Tensor | QuantizedCache | CodecCache


@dataclass(frozen=True)
class CacheArgs:
    """Pointers and strides of one cache, in the order the kernels take them."""

    data: torch.Tensor
    scale: torch.Tensor  # the data tensor itself for a plain cache: never read there
    zero: torch.Tensor
    residual: torch.Tensor  # a codec cache's residual buffers; the data tensor otherwise
    stride_block: int
    stride_token: int
    stride_head: int
    scale_strides: tuple[int, int, int, int]  # block, token, head, channel; 0 along a dimension the scale is shared
    residual_strides: tuple[int, int, int]  # buffer, token, head
    bits: int  # 0 for a plain cache
    codec: bool

    @classmethod
    def of(cls, cache: KVCache) -> CacheArgs:
        if isinstance(cache, CodecCache):
            codec = cache.codec
            if not isinstance(codec, GroupQuantizer):
                raise ValueError(f"the Triton kernels read KIVI-quantized blocks, not {type(codec).__name__}")
            levels, scale, residual = cache.sealed["levels"], cache.sealed["scale"], cache.residual
            shared = [size == 1 for size in scale.shape]
            scale_strides = tuple(0 if one else stride for one, stride in zip(shared, scale.stride()))
            return cls(
                levels,
                scale,
                cache.sealed["zero"],
                residual,
                *levels.stride()[:3],
                scale_strides,  # type: ignore[arg-type]
                residual.stride()[:3],
                codec.bits,
                codec=True,
            )
        if isinstance(cache, QuantizedCache):
            data = cache.data
            scale_strides = (cache.scale.stride(0), cache.scale.stride(1), 1, 0)
            strides = data.stride()[:3]
            return cls(data, cache.scale, cache.zero, data, *strides, scale_strides, (0, 0, 0), cache.bits, False)
        return cls(cache, cache, cache, cache, *cache.stride()[:3], (0, 0, 0, 0), (0, 0, 0), 0, False)

    @property
    def block_size(self) -> int:
        return self.data.shape[1]

    def pointers(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.data, self.scale, self.zero, self.residual

    def strides(self) -> tuple[int, ...]:
        """The strides keys and values share: the data's (block, token, head), then the residual buffers'."""
        return (self.stride_block, self.stride_token, self.stride_head, *self.residual_strides)


def cache_arguments(key_cache: KVCache, value_cache: KVCache) -> tuple[CacheArgs, list[tuple]]:
    """Both caches' arguments, and the kernels' cache arguments in order (tuples): key pointers, value pointers, the
    shared strides, the key scale's strides, the value scale's."""
    key, value = CacheArgs.of(key_cache), CacheArgs.of(value_cache)
    if (key.bits, key.codec, key.strides()) != (value.bits, value.codec, value.strides()):
        raise ValueError("keys and values must be stored in the same format and layout")
    return key, [key.pointers(), value.pointers(), key.strides(), key.scale_strides, value.scale_strides]


def residual_buffers_argument(
    args: CacheArgs, residual_buffers: torch.Tensor | None, context_lens: torch.Tensor
) -> torch.Tensor:
    """The kernels' per-sequence residual buffers: required under a codec, a never-read stand-in otherwise."""
    if not args.codec:
        return context_lens
    if residual_buffers is None:
        raise ValueError("a codec cache's filling rows are in residual buffers: pass each sequence's buffer")
    return residual_buffers


def head_dim_block(head_dim: int) -> int:
    """Tiles are powers of two: head_dim 96 is loaded as 128 lanes with the last 32 masked."""
    return triton.next_power_of_2(head_dim)


@triton.jit
def load_rows(
    data,
    scale,
    zero,
    rows,
    scale_rows,
    scale_stride_channel,
    dims,
    row_mask,
    HEAD_DIM: tl.constexpr,
    QUANT_BITS: tl.constexpr,
    SCALES_BY_CHANNEL: tl.constexpr,
):
    """Rows [N, BLOCK_D] of a cache: ``rows`` [N] are each row's offset in ``data``, ``scale_rows`` [N] in ``scale``
    (plus ``dims * scale_stride_channel`` where each channel has its own scale).

    Plain caches come back in their own dtype; quantized ones are dequantized to fp32, ``8 // QUANT_BITS`` levels a
    byte along ``head_dim``, the first in the lowest bits.
    """
    mask = row_mask[:, None] & (dims < HEAD_DIM)[None, :]
    if QUANT_BITS == 0:
        tile = tl.load(data + rows[:, None] + dims[None, :], mask=mask, other=0.0)
    else:
        PER_BYTE: tl.constexpr = 8 // QUANT_BITS
        packed = tl.load(data + rows[:, None] + dims[None, :] // PER_BYTE, mask=mask, other=0).to(tl.int32)
        shift = (dims[None, :] % PER_BYTE) * QUANT_BITS
        levels = ((packed >> shift) & ((1 << QUANT_BITS) - 1)).to(tl.float32)
        if SCALES_BY_CHANNEL:
            groups = scale_rows[:, None] + dims[None, :] * scale_stride_channel
            step = tl.load(scale + groups, mask=mask, other=0.0).to(tl.float32)
            low = tl.load(zero + groups, mask=mask, other=0.0).to(tl.float32)
        else:
            step = tl.load(scale + scale_rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
            low = tl.load(zero + scale_rows, mask=row_mask, other=0.0).to(tl.float32)[:, None]
        tile = tl.where(mask, levels * step + low, 0.0)
    return tile


@triton.jit
def load_kv_rows(
    cache,
    scale_strides,
    tile,
    HEAD_DIM: tl.constexpr,
    QUANT_BITS: tl.constexpr,
    SCALES_BY_CHANNEL: tl.constexpr,
    CODEC: tl.constexpr,
):
    """``load_rows`` of ``cache`` (its pointers: data, scale, zero point, residual buffers) at ``tile`` (each row's
    block, offset in it, KV head, data offset, residual offset and whether it is a residual row; the channels; which
    rows are valid), except that under a codec the residual rows come from the residual buffers."""
    data, scale, zero, residual = cache
    block, offset, kv_head, rows, residual_rows, in_residual, dims, valid = tile
    groups = block * scale_strides[0] + offset * scale_strides[1] + kv_head * scale_strides[2]
    if CODEC:
        sealed = load_rows(
            data,
            scale,
            zero,
            rows,
            groups,
            scale_strides[3],
            dims,
            valid & ~in_residual,
            HEAD_DIM,
            QUANT_BITS,
            SCALES_BY_CHANNEL,
        )
        mask = (valid & in_residual)[:, None] & (dims < HEAD_DIM)[None, :]
        filling = tl.load(residual + residual_rows[:, None] + dims[None, :], mask=mask, other=0.0)
        loaded = tl.where(in_residual[:, None], filling.to(tl.float32), sealed)
    else:
        loaded = load_rows(data, scale, zero, rows, groups, scale_strides[3], dims, valid, HEAD_DIM, QUANT_BITS, False)
    return loaded


@triton.jit
def residual_window(residual_buffers, seq, context_len, cache_strides, PAGE: tl.constexpr, CODEC: tl.constexpr):
    """Where sequence ``seq``'s residual rows start in the residual buffers, and the first context position they
    hold (its filling block's first); without a codec, no position is in them."""
    if CODEC:
        base = tl.load(residual_buffers + seq).to(tl.int64) * cache_strides[3]
        start = context_len // PAGE * PAGE
    else:
        base = 0
        start = context_len
    return base, start


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
    key_cache,
    value_cache,
    table,
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
    HEAD_DIM: tl.constexpr,
    PAGE: tl.constexpr,
    QUANT_BITS: tl.constexpr,
    CODEC: tl.constexpr,
    EXACT_FP32: tl.constexpr,
):
    """One online-softmax step (FlashAttention-2) of query rows ``q`` [M, BLOCK_D] over the context tokens at
    ``positions`` [N], gathered through the sequence's block ``table``; ``visible`` [M, N] masks scores (padding,
    causality). Rows must have seen at least one visible key by their first step. The caches are tuples of pointers
    (``CacheArgs.pointers``), ``cache_strides`` and the scale strides tuples of ints (``CacheArgs.strides``,
    ``CacheArgs.scale_strides``); ``residual_base`` and ``residual_start`` come from ``residual_window``. Returns
    the updated running max, running sum and unnormalised output accumulator."""
    block = tl.load(table + positions // PAGE, mask=valid, other=0).to(tl.int64)
    offset = positions % PAGE
    rows = block * cache_strides[0] + offset * cache_strides[1] + kv_head * cache_strides[2]
    residual_rows = residual_base + offset * cache_strides[4] + kv_head * cache_strides[5]
    in_residual = positions >= residual_start
    tile = (block, offset, kv_head, rows, residual_rows, in_residual, dims, valid)
    keys = load_kv_rows(key_cache, key_scale_strides, tile, HEAD_DIM, QUANT_BITS, CODEC, CODEC)  # KIVI: per channel
    scores = dot(q, tl.trans(keys.to(q.dtype)), EXACT_FP32) * sm_scale
    scores = tl.where(visible, scores, float("-inf"))
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    alpha = tl.exp(running_max - new_max)
    probs = tl.exp(scores - new_max[:, None])
    running_sum = running_sum * alpha + tl.sum(probs, 1)
    values = load_kv_rows(value_cache, value_scale_strides, tile, HEAD_DIM, QUANT_BITS, False, CODEC)  # per token
    acc = acc * alpha[:, None] + dot(probs.to(q.dtype), values.to(q.dtype), EXACT_FP32)
    return new_max, running_sum, acc
