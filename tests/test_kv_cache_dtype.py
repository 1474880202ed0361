"""Quantized KV caches (kv_cache_dtype int8 / int4): the torch quantizer against the format's definition, the CPU
backends over a quantized cache against the naive reference, memory per token, and greedy output against HF."""

from __future__ import annotations

import random

import pytest
import torch

from engine.config import build_config
from engine.errors import ConfigError
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams
from kernels.cpu_attention import CpuAttentionBackend
from kernels.dequantizing_backend import DequantizingBackend
from kernels.native import load_native_kernels
from kernels.quantized_cache import QuantizedCache
from kernels.registry import get_attention_backend
from tests.attention_reference import (
    HEADS,
    dequantize,
    make_case,
    mixed_batch,
    quantized_copy,
    reference_attention,
    reference_quantize,
    reference_write,
    unpack_levels,
)
from tests.conftest import hf_greedy, long_text

CPU = torch.device("cpu")


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_write_and_read_rows_match_the_format(bits: int, dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(bits)
    cache = QuantizedCache.allocate(6, 16, 3, 64, bits, CPU)
    rows = (torch.randn(20, 3, 64, generator=generator) * 3).to(dtype)
    rows[4, 1] = 0.5  # a constant row comes back exactly
    slots = torch.randperm(96, generator=generator)[:20]
    cache.write_rows(rows, slots)
    levels, scale, zero = reference_quantize(rows, bits)
    assert torch.equal(unpack_levels(cache).flatten(0, 1)[slots], levels)
    assert torch.equal(cache.scale.flatten(0, 1)[slots], scale) and torch.equal(cache.zero.flatten(0, 1)[slots], zero)
    expected = dequantize(cache)
    assert torch.equal(cache.read_rows(slots, torch.float32), expected.flatten(0, 1)[slots])
    assert torch.equal(cache.read_blocks(torch.tensor([5, 0, 2]), torch.float32), expected[[5, 0, 2]])
    assert torch.all(cache.read_rows(slots[4:5], torch.float32)[0, 1] == 0.5)


@pytest.fixture(params=["cpu", "torch"])
def inner(request) -> CpuAttentionBackend:
    return CpuAttentionBackend(load_native_kernels()) if request.param == "cpu" else CpuAttentionBackend()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("gqa", sorted(HEADS))
def test_cpu_backends_over_a_quantized_cache(inner: CpuAttentionBackend, bits: int, gqa: int) -> None:
    """Equal to the reference run on the dequantized cache (new rows quantized like the rest), mixed batches."""
    rng = random.Random(f"{bits}-{gqa}")
    decodes, prefills = mixed_batch(rng, 16)
    num_heads, num_kv_heads = HEADS[gqa]
    case = make_case(rng, decodes, prefills, 16, num_heads, num_kv_heads, 64, torch.float32)
    written_keys, written_values = case.key_cache.clone(), case.value_cache.clone()
    reference_write(written_keys, written_values, case.key, case.value, case.slots)
    expected_keys, expected_values = dequantize(quantized_copy(written_keys, bits)), None
    expected_values = dequantize(quantized_copy(written_values, bits))
    scale = 64**-0.5
    expected = reference_attention(case.query, expected_keys, expected_values, case.layout, scale)

    backend = DequantizingBackend(inner)
    key_cache, value_cache = quantized_copy(case.key_cache, bits), quantized_copy(case.value_cache, bits)
    metadata = backend.prepare(case.layout, torch.float32)
    out = backend.forward(case.query, case.key, case.value, key_cache, value_cache, metadata, scale)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(dequantize(key_cache), expected_keys) and torch.equal(dequantize(value_cache), expected_values)


def test_registry_wraps_cpu_backends_for_quantized_caches() -> None:
    assert isinstance(get_attention_backend("cpu", CPU, 64, quantized_cache=True), DequantizingBackend)
    assert isinstance(get_attention_backend("torch", CPU, 64, quantized_cache=False), CpuAttentionBackend)


# ---------------------------------------------------------------------------------------------------------------
# The engine
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


def make_engine(source: ModelSource, kv_cache_dtype: str, **overrides) -> LLMEngine:
    config = build_config("fp32", {"kv_cache_dtype": kv_cache_dtype, "kv_cache_memory": "64MiB", **overrides})
    return LLMEngine(config, source=source, progress=False)


def test_memory_per_token_and_capacity(source) -> None:
    spec = source.spec
    per_head_bytes = {"auto": spec.head_dim * 4, "int8": spec.head_dim + 8, "int4": spec.head_dim // 2 + 8}
    engines = {name: make_engine(source, name) for name in per_head_bytes}
    for name, engine in engines.items():
        assert engine.kv_layout.bytes_per_token == 2 * spec.num_layers * spec.num_kv_heads * per_head_bytes[name]
        assert engine.num_kv_blocks == 64 * 2**20 // (engine.kv_layout.bytes_per_token * 16)
    assert engines["int8"].num_kv_blocks > 3 * engines["auto"].num_kv_blocks  # fp32 -> int8: 256 -> 72 bytes
    with pytest.raises(ConfigError, match="kv_cache_dtype must be auto, int8 or int4"):
        build_config(None, {"kv_cache_dtype": "fp8"})


def test_greedy_output_against_the_reference(source, hf_model) -> None:
    """int8 keeps most greedy continuations identical to full precision."""
    tokenizer = source.tokenizer
    prompts = [
        tokenizer.encode_chat([{"role": "user", "content": question}])
        for question in ("What is a prime number?", "Name three rivers.", "Why is the sky blue?")
    ] + [tokenizer.encode(text) for text in ("Once upon a time", long_text(600), long_text(1500)[700:])]
    references = [hf_greedy(hf_model, prompt, 24)[0] for prompt in prompts]
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    engine = make_engine(source, "int8")
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks
    same = sum(tokens[str(i)] == ref for i, ref in enumerate(references))
    print(f"int8: greedy continuations identical to full precision: {same} of {len(prompts)}")
    assert same >= len(prompts) // 2
