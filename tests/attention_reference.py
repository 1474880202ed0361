"""The naive attention reference every attention kernel is checked against, and builders of paged test batches.

The reference writes each new K/V row into a copy of the cache with plain indexing, gathers every sequence's context
token by token through its block table, repeats K/V heads for grouped-query attention and computes causal softmax
attention in fp32.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kernels.backend import BatchLayout
from kernels.quantized_cache import QuantizedCache

# --- the reference ---------------------------------------------------------------------------------------------------


def reference_write(key_cache, value_cache, key, value, slots: list[int]) -> None:
    block_size = key_cache.shape[1]
    for row, slot in enumerate(slots):
        key_cache[slot // block_size, slot % block_size] = key[row]
        value_cache[slot // block_size, slot % block_size] = value[row]


def reference_attention(query, key_cache, value_cache, layout: BatchLayout, scale: float) -> torch.Tensor:
    """query [T, H, D] -> [T, H, D] in fp32, reading the (already written) caches."""
    num_heads = query.shape[1]
    block_size = key_cache.shape[1]
    out = torch.empty(query.shape, dtype=torch.float32)
    start = 0
    for query_len, context_len, table in zip(layout.query_lens, layout.context_lens, layout.block_tables):
        keys = torch.stack([key_cache[table[p // block_size], p % block_size] for p in range(context_len)]).float()
        values = torch.stack([value_cache[table[p // block_size], p % block_size] for p in range(context_len)]).float()
        group = num_heads // keys.shape[1]
        keys = keys.repeat_interleave(group, dim=1)  # [L, H, D]
        values = values.repeat_interleave(group, dim=1)
        q = query[start : start + query_len].float()  # [Lq, H, D]
        scores = torch.einsum("qhd,khd->hqk", q, keys) * scale
        query_positions = torch.arange(context_len - query_len, context_len)
        visible = torch.arange(context_len)[None, :] <= query_positions[:, None]  # [Lq, L]
        scores = scores.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out[start : start + query_len] = torch.einsum("hqk,khd->qhd", probs, values)
        start += query_len
    assert start == query.shape[0]
    return out


# --- the quantized-cache format (kernels/quantized_cache.py), by its definition ------------------------------------


def reference_quantize(rows: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """rows [..., D] -> integer levels [..., D], scale [...], zero [...] (the format of kernels.quantized_cache)."""
    x = rows.float()
    low, high = x.amin(-1), x.amax(-1)
    step = (high - low) / (2**bits - 1)
    inverse = torch.where(step > 0, 1 / torch.where(step > 0, step, 1), 0)
    levels = torch.clamp(torch.floor((x - low[..., None]) * inverse[..., None] + 0.5), 0, 2**bits - 1)
    return levels.to(torch.uint8), step, low


def unpack_levels(cache: QuantizedCache) -> torch.Tensor:
    if cache.bits == 8:
        return cache.data
    return torch.stack([cache.data & 0xF, cache.data >> 4], dim=-1).flatten(-2)


def dequantize(cache: QuantizedCache) -> torch.Tensor:
    return unpack_levels(cache).float() * cache.scale[..., None] + cache.zero[..., None]


def quantized_copy(cache: torch.Tensor, bits: int) -> QuantizedCache:
    """A quantized cache holding ``cache``'s content, built with the reference quantizer."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    quantized = QuantizedCache.allocate(num_blocks, block_size, num_kv_heads, head_dim, bits, torch.device("cpu"))
    levels, scale, zero = reference_quantize(cache, bits)
    if bits == 4:
        levels = levels[..., 0::2] | (levels[..., 1::2] << 4)
    quantized.data.copy_(levels)
    quantized.scale.copy_(scale)
    quantized.zero.copy_(zero)
    return quantized


# --- building a batch ------------------------------------------------------------------------------------------------


@dataclass
class Case:
    layout: BatchLayout
    query: torch.Tensor
    key: torch.Tensor
    value: torch.Tensor
    key_cache: torch.Tensor
    value_cache: torch.Tensor
    slots: list[int]


def make_case(
    rng: random.Random,
    decode_context_lens: list[int],
    prefills: list[tuple[int, int]],  # (cached prefix length, new tokens)
    block_size: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: torch.dtype,
    spare_blocks: int = 3,
) -> Case:
    """Decodes first, then prefill chunks; blocks are handed out from a shuffled pool, so tables are scattered."""
    query_lens = [1] * len(decode_context_lens) + [new for _, new in prefills]
    context_lens = list(decode_context_lens) + [prefix + new for prefix, new in prefills]
    # Some sequences hold one more block than their context needs (allocated ahead of time).
    needed = [-(-length // block_size) + rng.randint(0, 1) for length in context_lens]
    num_blocks = sum(needed) + spare_blocks
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, cursor = [], 0
    for count in needed:
        tables.append(pool[cursor : cursor + count])
        cursor += count
    slots = [
        table[p // block_size] * block_size + p % block_size
        for query_len, context_len, table in zip(query_lens, context_lens, tables)
        for p in range(context_len - query_len, context_len)
    ]
    generator = torch.Generator().manual_seed(rng.randrange(2**31))

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(dtype)

    tokens = sum(query_lens)
    return Case(
        layout=BatchLayout(query_lens, context_lens, tables, torch.tensor(slots, dtype=torch.long), block_size),
        query=randn(tokens, num_heads, head_dim),
        key=randn(tokens, num_kv_heads, head_dim),
        value=randn(tokens, num_kv_heads, head_dim),
        # The whole cache starts as noise: stale or padding entries that leak into a result are visible.
        key_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        value_cache=randn(num_blocks, block_size, num_kv_heads, head_dim),
        slots=slots,
    )


TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}
HEADS = {1: (4, 4), 3: (9, 3), 4: (8, 2)}  # GQA ratio -> (query heads, KV heads)


def mixed_batch(rng: random.Random, block_size: int) -> tuple[list[int], list[tuple[int, int]]]:
    """Decodes at assorted lengths, then prefills: fresh, after a cached prefix, block-aligned, one token."""
    decodes = [1, block_size, block_size + 1, 5 * block_size - 3, rng.randint(2, 12 * block_size)]
    prefills = [
        (0, 3 * block_size + 5),  # a fresh prompt ending mid-block
        (2 * block_size + 3, 4 * block_size + 2),  # after a prefix ending mid-block, crossing several blocks
        (3 * block_size, block_size),  # block-aligned prefix and chunk
        (rng.randint(1, 6 * block_size), 1),  # a one-token chunk after the decodes
        (0, 2),
    ]
    return decodes, prefills
