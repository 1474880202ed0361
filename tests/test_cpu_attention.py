"""The CPU paged-attention backend (native decode kernel and pure-PyTorch paths) against a naive reference here.

The reference writes each new K/V row into a copy of the cache with plain indexing, gathers every sequence's context
token by token through its block table, repeats K/V heads for grouped-query attention and computes causal softmax
attention in fp32.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend, write_kv
from kernels.native import load_native_kernels

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


@pytest.fixture(params=["cpu", "torch"])
def backend(request) -> CpuAttentionBackend:
    """Both decode paths: the native kernel (the test fails if it can't be built here) and vectorised PyTorch."""
    return CpuAttentionBackend(load_native_kernels()) if request.param == "cpu" else CpuAttentionBackend()


def check(case: Case, atol: float, rtol: float, backend: CpuAttentionBackend) -> None:
    scale = case.query.shape[-1] ** -0.5
    expected_key_cache, expected_value_cache = case.key_cache.clone(), case.value_cache.clone()
    reference_write(expected_key_cache, expected_value_cache, case.key, case.value, case.slots)
    expected = reference_attention(case.query, expected_key_cache, expected_value_cache, case.layout, scale)

    metadata = backend.prepare(case.layout, case.query.dtype)
    out = backend.forward(case.query, case.key, case.value, case.key_cache, case.value_cache, metadata, scale)

    assert torch.equal(case.key_cache, expected_key_cache)
    assert torch.equal(case.value_cache, expected_value_cache)
    assert out.shape == case.query.shape and out.dtype == case.query.dtype
    torch.testing.assert_close(out.float(), expected, atol=atol, rtol=rtol)


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


DTYPES = pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=["fp32", "fp16", "bf16"])


@DTYPES
@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("gqa", sorted(HEADS))
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_mixed_batch_matches_reference(
    block_size: int, gqa: int, head_dim: int, dtype: torch.dtype, backend: CpuAttentionBackend
) -> None:
    rng = random.Random(f"{block_size}-{gqa}-{head_dim}-{dtype}")
    decodes, prefills = mixed_batch(rng, block_size)
    num_heads, num_kv_heads = HEADS[gqa]
    case = make_case(rng, decodes, prefills, block_size, num_heads, num_kv_heads, head_dim, dtype)
    check(case, *TOLERANCE[dtype], backend)


@pytest.mark.parametrize(
    ("decodes", "prefills"),
    [
        ([7, 40, 1, 33], []),  # only decodes
        ([], [(0, 37)]),  # one fresh prompt
        ([], [(19, 30), (0, 1), (64, 17)]),  # only prefills
        ([300], [(250, 70)]),  # long contexts over many blocks
        ([(i * 37) % 200 + 1 for i in range(40)], [(5, 9)]),  # more decodes than one decode group holds
        ([3000, 1100, 5], []),  # contexts split into several partitions whose partial results are merged
        ([200], []),  # one sequence: split so that both threads work
    ],
    ids=["decodes", "one-prompt", "prefills", "long", "many-decodes", "partitioned", "single"],
)
@DTYPES
def test_batch_shapes(
    decodes: list[int], prefills: list[tuple[int, int]], dtype: torch.dtype, backend: CpuAttentionBackend
) -> None:
    case = make_case(random.Random(len(decodes) * 7 + len(prefills)), decodes, prefills, 16, 9, 3, 64, dtype)
    check(case, *TOLERANCE[dtype], backend)


@settings(max_examples=60, deadline=None)
@given(
    data=st.data(),
    block_size=st.sampled_from([1, 2, 4, 8]),
    heads=st.sampled_from([(1, 1), (2, 1), (6, 2), (4, 4), (8, 2)]),
    head_dim=st.sampled_from([64, 80]),
    native=st.booleans(),
)
def test_random_batches_match_reference(
    data, block_size: int, heads: tuple[int, int], head_dim: int, native: bool
) -> None:
    decodes = data.draw(st.lists(st.integers(1, 40), max_size=4), label="decode context lengths")
    prefills = data.draw(
        st.lists(st.tuples(st.integers(0, 30), st.integers(1, 20)), min_size=0 if decodes else 1, max_size=3),
        label="(prefix, new tokens)",
    )
    seed = data.draw(st.integers(0, 2**16), label="seed")
    case = make_case(random.Random(seed), decodes, prefills, block_size, *heads, head_dim, torch.float32)
    check(case, *TOLERANCE[torch.float32], CpuAttentionBackend(load_native_kernels() if native else None))


def test_prepare_requires_no_rebuild_across_layers(backend: CpuAttentionBackend) -> None:
    """One prepare() serves every layer of a step: a second layer's caches give that layer's own result."""
    rng = random.Random(5)
    decodes, prefills = mixed_batch(rng, 8)
    first = make_case(rng, decodes, prefills, 8, 9, 3, 64, torch.float32)
    other = {name: torch.randn_like(getattr(first, name)) for name in ("query", "key", "value")}
    other |= {name: torch.randn_like(getattr(first, name)) for name in ("key_cache", "value_cache")}
    second = dataclasses.replace(first, **other)  # the next layer: same step and block tables, other tensors
    metadata = backend.prepare(first.layout, torch.float32)
    scale = 64**-0.5
    for case in (first, second):
        key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
        reference_write(key_cache, value_cache, case.key, case.value, case.slots)
        expected = reference_attention(case.query, key_cache, value_cache, first.layout, scale)
        out = backend.forward(case.query, case.key, case.value, case.key_cache, case.value_cache, metadata, scale)
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_kv_puts_each_row_at_its_slot(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    num_blocks, block_size, kv_heads, head_dim = 7, 4, 3, 16
    key_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    value_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).to(dtype)
    slots = random.Random(1).sample(range(num_blocks * block_size), 11)
    key = torch.randn(len(slots), kv_heads, head_dim, generator=generator).to(dtype)
    value = torch.randn(len(slots), kv_heads, head_dim, generator=generator).to(dtype)
    expected_key, expected_value = key_cache.clone(), value_cache.clone()
    for row, slot in enumerate(slots):
        expected_key[slot // block_size, slot % block_size] = key[row]
        expected_value[slot // block_size, slot % block_size] = value[row]
    write_kv(key, value, key_cache, value_cache, torch.tensor(slots))
    assert torch.equal(key_cache, expected_key)
    assert torch.equal(value_cache, expected_value)


def test_reference_is_causal_and_grouped() -> None:
    """Sanity of the reference itself on a case small enough to work out by hand."""
    key_cache = torch.zeros(2, 2, 1, 1)  # equal scores everywhere: attention is a plain average of visible values
    value_cache = torch.full((2, 2, 1, 1), 100.0)  # an unused slot (block 0, offset 1) must never be read
    # A sequence of 3 tokens in blocks [1, 0]: positions 0, 1 in block 1, position 2 in block 0.
    value_cache[1, 0, 0, 0], value_cache[1, 1, 0, 0], value_cache[0, 0, 0, 0] = 1.0, 2.0, 6.0
    layout = BatchLayout([2], [3], [[1, 0]], torch.tensor([3, 0]), 2)
    query = torch.zeros(2, 2, 1)  # two query heads sharing the one KV head
    out = reference_attention(query, key_cache, value_cache, layout, 1.0)
    assert out[:, 0, 0].tolist() == [1.5, 3.0]  # position 1 sees values 1, 2; position 2 sees 1, 2, 6
    assert torch.equal(out[:, 0], out[:, 1])
