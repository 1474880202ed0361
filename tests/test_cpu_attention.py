"""The CPU paged-attention backend (native decode kernel and pure-PyTorch paths) against the naive reference."""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend, write_kv
from kernels.native import DecodeBatch, load_native_kernels
from tests.attention_reference import (
    HEADS,
    TOLERANCE,
    Case,
    make_case,
    mixed_batch,
    reference_attention,
    reference_write,
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
        ([90, 12], [(400, 5), (33, 2), (70, 16), (20, 17)]),  # verifications as decode rows, then a prefill
        # A 750-token partition (set by the long decode) leaves the verification's last partition 2 tokens, which
        # its first three rows do not see.
        ([3000], [(747, 5)]),
        # Fresh prompts batched by padded length (bf16/fp16: 35 and 37 rows both pad to 40), beside a cached prefix.
        ([9], [(0, 37), (0, 35), (0, 37), (0, 70), (12, 20), (0, 1)]),
    ],
    ids=[
        "decodes",
        "one-prompt",
        "prefills",
        "long",
        "many-decodes",
        "partitioned",
        "single",
        "few-query-tokens",
        "rows-past-a-partition",
        "fresh-prompts",
    ],
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


# Prompts of new lengths, with and without a cached prefix, after the start-up warm-up; prints the RSS growth in MiB.
NEW_LENGTHS_PROGRAM = """
import random, sys, psutil, torch
from kernels.cpu_attention import prefill_attention, warm_up_prefill_attention
process, rng = psutil.Process(), random.Random(0)
warm_up_prefill_attention(9, 3, 64, torch.bfloat16, 1024)
before = process.memory_info().rss
for _ in range(80):
    rows, prefix = rng.randint(17, 1000), rng.choice([0, rng.randint(1, 2000)])
    query = torch.zeros(rows, 9, 64, dtype=torch.bfloat16)
    key = torch.zeros(prefix + rows, 3, 64, dtype=torch.bfloat16)
    prefill_attention(query, key, key, prefix, 0.125)
print((process.memory_info().rss - before) / 2**20)
"""


def test_new_prompt_lengths_compile_no_new_attention_kernels() -> None:
    # Unpadded, each new pair of lengths kept about 2.7 MiB of compiled kernels (over 200 MiB for these 80).
    run = subprocess.run([sys.executable, "-c", NEW_LENGTHS_PROGRAM], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert float(run.stdout) < 40


def test_native_decode_refuses_batches_and_caches_it_cannot_read() -> None:
    tables, lengths, rows = torch.zeros(2, 4, dtype=torch.int32), torch.tensor([5, 9], dtype=torch.int32), torch.ones(2)
    with pytest.raises(ValueError, match="contiguous int32"):
        DecodeBatch(tables, lengths, rows)  # float row counts
    with pytest.raises(ValueError, match="one context length and one row count per block table"):
        DecodeBatch(tables, lengths[:1], rows.int())
    batch = DecodeBatch(tables, lengths, rows.int())
    cache = torch.zeros(4, 16, 3, 64)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
        load_native_kernels().decode_attention(torch.zeros(2, 9, 64), cache, cache.bfloat16(), batch, 0.125)


@pytest.mark.parametrize("head_dim", [64, 96, 128])
@pytest.mark.parametrize("gqa", sorted(HEADS))
@pytest.mark.parametrize("block_size", [16, 32])
def test_native_bf16_decode_is_the_fp32_result_rounded_once(block_size: int, gqa: int, head_dim: int) -> None:
    """The native kernel computes bf16 attention in fp32 from the cache's values and rounds only its output, so it
    is within one bf16 rounding of the fp32 reference: far tighter than the shared bf16 tolerance, which allows for
    kernels that round their intermediates (and which a 1 % error in the scores passes)."""
    rng = random.Random(f"rounded-once-{block_size}-{gqa}-{head_dim}")
    decodes = [1, block_size + 1, 5 * block_size - 3, 300, rng.randint(2, 12 * block_size)]
    num_heads, num_kv_heads = HEADS[gqa]
    case = make_case(rng, decodes, [], block_size, num_heads, num_kv_heads, head_dim, torch.bfloat16)
    scale = head_dim**-0.5
    write_kv(case.key, case.value, case.key_cache, case.value_cache, torch.tensor(case.slots))
    expected = reference_attention(case.query, case.key_cache, case.value_cache, case.layout, scale)
    width = max(len(table) for table in case.layout.block_tables)
    batch = DecodeBatch(
        torch.tensor([table + [0] * (width - len(table)) for table in case.layout.block_tables], dtype=torch.int32),
        torch.tensor(case.layout.context_lens, dtype=torch.int32),
        torch.ones(len(decodes), dtype=torch.int32),
    )
    out = load_native_kernels().decode_attention(case.query, case.key_cache, case.value_cache, batch, scale)
    assert ((out.float() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-5).all()


@pytest.mark.skipif(not load_native_kernels().has_prompt_attention, reason="this CPU has no AVX512-BF16")
@pytest.mark.parametrize("head_dim", [64, 80, 128])
@pytest.mark.parametrize("gqa", sorted(HEADS))
def test_native_prompt_attention_is_the_fp32_result_rounded_once(gqa: int, head_dim: int) -> None:
    """Fresh prompts' causal attention by the native kernel, from rows with strided value heads (as the fused QKV
    projection leaves them), against float64 attention of the same bf16 values: within one bf16 rounding."""
    torch.manual_seed(gqa * 1000 + head_dim)
    num_heads, num_kv_heads = HEADS[gqa]
    lengths = [1, 15, 16, 17, 36, 130, 5]
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    total = sum(lengths)
    query = torch.randn(total, num_heads, head_dim).bfloat16()
    key = (torch.randn(total, num_kv_heads, head_dim) * 2).bfloat16()
    value = torch.randn(total, 2 * num_kv_heads, head_dim).bfloat16()[:, num_kv_heads:]  # rows strided
    output = torch.full_like(query, float("nan"))
    scale = head_dim**-0.5
    prompts = torch.tensor(list(zip(starts, lengths)), dtype=torch.int32)
    load_native_kernels().prompt_attention(query, key, value, output, prompts, scale)
    group = num_heads // num_kv_heads
    for start, length in zip(starts, lengths):
        rows = slice(start, start + length)
        q = query[rows].double().transpose(0, 1)  # [H, L, D]
        k = key[rows].double().repeat_interleave(group, dim=1).transpose(0, 1)
        v = value[rows].double().repeat_interleave(group, dim=1).transpose(0, 1)
        scores = (q @ k.transpose(1, 2)) * scale
        scores.masked_fill_(~torch.ones(length, length, dtype=torch.bool).tril(), float("-inf"))
        expected = (scores.softmax(-1) @ v).transpose(0, 1)
        assert ((output[rows].double() - expected).abs() <= expected.abs() * 2.0**-8 + 1e-5).all()
