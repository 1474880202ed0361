"""Spindle's Triton kernels against the naive PyTorch reference, run in Triton's interpreter on the CPU.

The default grid covers every head dim, block size, dtype and GQA ratio, each in a few combinations; the exhaustive
product is marked slow (``scripts/test-slow.sh``).
"""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from kernels.quantized_cache import QuantizedCache
from kernels.triton_ops.kv_write import write_kv
from kernels.triton_ops.paged_decode import paged_decode_attention
from kernels.triton_ops.paged_prefill import paged_prefill_attention
from tests.attention_reference import (
    TOLERANCE,
    Case,
    dequantize,
    make_case,
    quantized_copy,
    reference_attention,
    reference_quantize,
    reference_write,
    unpack_levels,
)

HEAD_DIMS, BLOCK_SIZES, GQA_RATIOS = (64, 96, 128), (16, 32), (1, 3, 4, 8)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CPU = torch.device("cpu")

EXHAUSTIVE = list(itertools.product(HEAD_DIMS, BLOCK_SIZES, DTYPES, GQA_RATIOS))
# Every value of every axis, and every pair of (head dim, block size) and (dtype, GQA ratio), in 12 cases.
COVERING = [(HEAD_DIMS[i % 3], BLOCK_SIZES[i // 3 % 2], list(DTYPES)[i // 4], GQA_RATIOS[i % 4]) for i in range(12)]


def grid(function):
    cases = [pytest.param(*case, id="-".join(map(str, case))) for case in COVERING]
    cases += [
        pytest.param(*case, id="-".join(map(str, case)), marks=pytest.mark.slow)
        for case in EXHAUSTIVE
        if case not in COVERING
    ]
    return pytest.mark.parametrize(("head_dim", "block_size", "dtype_name", "gqa"), cases)(function)


def heads_for(gqa: int) -> tuple[int, int]:
    num_kv_heads = 2 if gqa < 8 else 1
    return gqa * num_kv_heads, num_kv_heads


def padded_tables(tables: list[list[int]]) -> torch.Tensor:
    width = max(len(table) for table in tables)
    return torch.tensor([table + [0] * (width - len(table)) for table in tables], dtype=torch.int32)


def written_reference(case: Case) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference caches with the case's new rows written, and the reference attention output."""
    key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
    reference_write(key_cache, value_cache, case.key, case.value, case.slots)
    scale = case.query.shape[-1] ** -0.5
    return key_cache, value_cache, reference_attention(case.query, key_cache, value_cache, case.layout, scale)


def decode(case: Case, key_cache, value_cache, num_splits: int | None = None) -> torch.Tensor:
    lengths = case.layout.context_lens
    return paged_decode_attention(
        case.query,
        key_cache,
        value_cache,
        padded_tables(case.layout.block_tables),
        torch.tensor(lengths, dtype=torch.int32),
        max(lengths),
        case.query.shape[-1] ** -0.5,
        num_splits,
    )


def prefill(case: Case, key_cache, value_cache) -> torch.Tensor:
    query_lens = case.layout.query_lens
    starts = [sum(query_lens[:i]) for i in range(len(query_lens))]
    output = torch.full_like(case.query, float("nan"))  # every row must be written
    paged_prefill_attention(
        case.query,
        key_cache,
        value_cache,
        output,
        padded_tables(case.layout.block_tables),
        torch.tensor(starts, dtype=torch.int32),
        torch.tensor(query_lens, dtype=torch.int32),
        torch.tensor(case.layout.context_lens, dtype=torch.int32),
        max(query_lens),
        case.query.shape[-1] ** -0.5,
    )
    return output


# --- KV write --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_write_kv_scatters_rows_by_slot(dtype_name: str, head_dim: int) -> None:
    case = make_case(random.Random(head_dim), [5, 40, 17], [(3, 9)], 16, 6, 2, head_dim, DTYPES[dtype_name])
    expected_key, expected_value, _ = written_reference(case)
    write_kv(case.key, case.value, case.key_cache, case.value_cache, case.layout.slot_mapping)
    assert torch.equal(case.key_cache, expected_key)
    assert torch.equal(case.value_cache, expected_value)


def test_write_kv_skips_padding_slots() -> None:
    case = make_case(random.Random(0), [5, 9], [], 16, 4, 2, 64, torch.float32)
    before = case.key_cache.clone()
    write_kv(case.key, case.value, case.key_cache, case.value_cache, torch.tensor([-1, -1]))
    assert torch.equal(case.key_cache, before)


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype_name", ["fp32", "bf16"])
@pytest.mark.parametrize("head_dim", [64, 96])
def test_quantized_write_matches_reference_quantizer(bits: int, dtype_name: str, head_dim: int) -> None:
    case = make_case(random.Random(bits), [5, 40, 17], [(3, 9)], 16, 6, 2, head_dim, DTYPES[dtype_name])
    case.key[0, 1] = 0.25  # a constant row: step 0, every value must come back exactly
    shape = case.key_cache.shape
    key_cache = QuantizedCache.allocate(shape[0], shape[1], shape[2], head_dim, bits, CPU)
    value_cache = QuantizedCache.allocate(shape[0], shape[1], shape[2], head_dim, bits, CPU)
    write_kv(case.key, case.value, key_cache, value_cache, case.layout.slot_mapping)

    for cache, rows in ((key_cache, case.key), (value_cache, case.value)):
        levels, scale, zero = reference_quantize(rows, bits)
        flat_levels = unpack_levels(cache).flatten(0, 1)[case.layout.slot_mapping]
        assert torch.equal(flat_levels, levels)
        assert torch.equal(cache.scale.flatten(0, 1)[case.layout.slot_mapping], scale)
        assert torch.equal(cache.zero.flatten(0, 1)[case.layout.slot_mapping], zero)
        # Round to nearest: every value within half a step of the original.
        restored = dequantize(cache).flatten(0, 1)[case.layout.slot_mapping]
        assert torch.all((restored - rows.float()).abs() <= scale[..., None] / 2 + 1e-6)
    assert torch.all(dequantize(key_cache).flatten(0, 1)[case.layout.slot_mapping[0], 1] == 0.25)


# --- decode ----------------------------------------------------------------------------------------------------------


def decode_case(seed: int, block_size: int, gqa: int, head_dim: int, dtype: torch.dtype) -> Case:
    """Batch of 1..8 sequences, lengths ending mid-block, on block boundaries and crossing many blocks."""
    rng = random.Random(seed)
    batch = rng.randint(1, 8)
    lengths = [rng.choice([1, block_size, block_size + 1, 7 * block_size - 3, rng.randint(2, 40 * block_size)])]
    lengths += [rng.randint(1, 12 * block_size) for _ in range(batch - 1)]
    return make_case(rng, lengths, [], block_size, *heads_for(gqa), head_dim, dtype)


@grid
def test_decode_matches_reference(head_dim: int, block_size: int, dtype_name: str, gqa: int) -> None:
    dtype = DTYPES[dtype_name]
    case = decode_case(head_dim * block_size + gqa, block_size, gqa, head_dim, dtype)
    key_cache, value_cache, expected = written_reference(case)
    out = decode(case, key_cache, value_cache)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])


@pytest.mark.parametrize("num_splits", [1, 2, 5, 40])
def test_decode_split_k_merges_exactly(num_splits: int) -> None:
    """Any split count gives the reference: splits past a short sequence's context contribute nothing."""
    case = make_case(random.Random(7), [1500, 3, 700], [], 16, 9, 3, 64, torch.float32)
    key_cache, value_cache, expected = written_reference(case)
    torch.testing.assert_close(decode(case, key_cache, value_cache, num_splits), expected, atol=1e-5, rtol=1e-5)


# --- prefill ---------------------------------------------------------------------------------------------------------


def prefill_case(seed: int, block_size: int, gqa: int, head_dim: int, dtype: torch.dtype) -> Case:
    """Fresh prompts and chunks after a cached prefix; chunks longer than one 64-row query tile; one-token chunks."""
    rng = random.Random(seed)
    prefills = [
        (0, rng.randint(2, 3 * block_size)),
        (rng.randint(1, 5 * block_size), rng.randint(65, 150)),
        (4 * block_size, block_size),
        (rng.randint(1, 3 * block_size), 1),
    ]
    return make_case(rng, [], prefills[: rng.randint(1, 4)], block_size, *heads_for(gqa), head_dim, dtype)


@grid
def test_prefill_matches_reference(head_dim: int, block_size: int, dtype_name: str, gqa: int) -> None:
    dtype = DTYPES[dtype_name]
    case = prefill_case(head_dim + block_size * gqa, block_size, gqa, head_dim, dtype)
    key_cache, value_cache, expected = written_reference(case)
    out = prefill(case, key_cache, value_cache)
    torch.testing.assert_close(out.float(), expected, atol=TOLERANCE[dtype][0], rtol=TOLERANCE[dtype][1])


# --- quantized caches ------------------------------------------------------------------------------------------------

# Worst error against full-precision attention over unit-normal K/V in this test's cases, measured: int8 0.0065
# (decode) and 0.0135 (prefill: one-token contexts return a single quantized value row); int4 0.17 and 0.22, about
# half of one 4-bit step. The bounds leave a 1.5x margin.
FULL_PRECISION_BOUND = {8: 0.02, 4: 0.35}


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind", ["decode", "prefill"])
def test_quantized_attention(bits: int, kind: str) -> None:
    build, run = (decode_case, decode) if kind == "decode" else (prefill_case, prefill)
    case = build(bits, 16, 3, 64, torch.float32)
    key_cache, value_cache, full_precision = written_reference(case)
    quantized_keys, quantized_values = quantized_copy(key_cache, bits), quantized_copy(value_cache, bits)
    out = run(case, quantized_keys, quantized_values)
    # Exact against the reference applied to the dequantized cache...
    keys, values = dequantize(quantized_keys), dequantize(quantized_values)
    expected = reference_attention(case.query, keys, values, case.layout, 64**-0.5)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # ... and close to full precision.
    error = (out - full_precision).abs().max().item()
    print(f"{kind} int{bits}: max abs error against full precision {error:.4f}")
    assert error < FULL_PRECISION_BOUND[bits]
