"""Continuous batching over the paged cache gives exactly the reference's greedy tokens, whatever the batch.

The reference is HF transformers decoding each prompt alone (tests/conftest.py); the engine runs fp32 under block
sizes, chunked prefill, forced preemption, prefix-cache hits, staggered arrivals and aborts.
"""

from __future__ import annotations

import dataclasses

import pytest

from engine.config import build_config
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams
from tests.conftest import hf_greedy, long_text

NEW_TOKENS = 24
SYSTEM = "You are a careful assistant. Answer briefly and precisely. " + long_text(400)
QUESTIONS = ["What is a prime number?", "Name three rivers.", "Why is the sky blue?", "What is 7 times 8?"]


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


@pytest.fixture(scope="module")
def prompts(source: ModelSource) -> list[list[int]]:
    tokenizer = source.tokenizer
    shared_prefix = [
        tokenizer.encode_chat([{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}])
        for q in QUESTIONS
    ]
    raw = [tokenizer.encode(text) for text in ("Once upon a time", "import numpy as np\n", long_text(700)[200:])]
    return shared_prefix + raw


@pytest.fixture(scope="module")
def references(hf_model, prompts: list[list[int]]) -> list[list[int]]:
    return [hf_greedy(hf_model, prompt, NEW_TOKENS)[0] for prompt in prompts]


def make_engine(source: ModelSource, block_size: int = 16, num_blocks: int | None = None, **scheduler) -> LLMEngine:
    config = build_config("fp32", {"block_size": block_size, **scheduler})
    if num_blocks is not None:
        layout = KVCacheLayout.for_model(source.spec, block_size, config.model.torch_dtype)
        config.cache = dataclasses.replace(config.cache, kv_cache_memory=str(num_blocks * layout.bytes_per_block))
    return LLMEngine(config, source=source, progress=False)


GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


def run(engine: LLMEngine, prompts: list[list[int]], arrival_gap: int = 0, abort: dict[int, int] | None = None):
    """Add prompt i at step i * arrival_gap; abort request r at step abort[r]. Returns tokens per request."""
    abort = abort or {}
    tokens: dict[int, list[int]] = {i: [] for i in range(len(prompts))}
    step = 0
    pending = list(range(len(prompts)))
    while pending or engine.has_unfinished_requests():
        while pending and pending[0] * arrival_gap <= step:
            i = pending.pop(0)
            engine.add_request(str(i), prompts[i], GREEDY)
        for i, at in abort.items():
            if at == step:
                engine.abort_request(str(i))
        for output in engine.step():
            tokens[int(output.request_id)].extend(output.new_token_ids)
        step += 1
        assert step < 10_000, "the engine stopped making progress"
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return tokens


@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_block_sizes(source, prompts, references, block_size: int) -> None:
    tokens = run(make_engine(source, block_size=block_size), prompts)
    assert [tokens[i] for i in range(len(prompts))] == references


def test_chunked_prefill_smaller_than_prompts(source, prompts, references) -> None:
    engine = make_engine(source, max_num_batched_tokens=48, enable_prefix_caching=False)
    assert max(len(p) for p in prompts) > 48
    tokens = run(engine, prompts, arrival_gap=2)
    assert [tokens[i] for i in range(len(prompts))] == references


def test_forced_preemption_with_tiny_kv_budget(source, prompts, references) -> None:
    longest = max(len(p) for p in prompts) + NEW_TOKENS
    engine = make_engine(source, block_size=8, num_blocks=-(-longest // 8) + 6, enable_prefix_caching=False)
    tokens = run(engine, prompts)
    assert engine.stats().num_preemptions > 0
    assert [tokens[i] for i in range(len(prompts))] == references


def test_staggered_arrivals_with_prefix_hits(source, prompts, references) -> None:
    engine = make_engine(source, max_num_batched_tokens=64)
    tokens = run(engine, prompts, arrival_gap=5)
    stats = engine.stats()
    assert stats.prefix_cache_hits > 0
    assert [tokens[i] for i in range(len(prompts))] == references


def test_aborts_mid_stream_leave_others_exact(source, prompts, references) -> None:
    tokens = run(make_engine(source), prompts, abort={1: 6, 4: 3})
    for i, expected in enumerate(references):
        if i in (1, 4):
            assert tokens[i] == expected[: len(tokens[i])] and len(tokens[i]) < NEW_TOKENS
        else:
            assert tokens[i] == expected


def test_repeated_prompt_prefills_only_the_uncached_tail(source, prompts, references) -> None:
    engine = make_engine(source, block_size=16)
    prompt = prompts[0]
    first = run(engine, [prompt])[0]
    computed_before = engine.counters.prompt_tokens
    second = run(engine, [prompt])[0]
    recomputed = engine.counters.prompt_tokens - computed_before
    cached = (len(prompt) - 1) // 16 * 16
    assert recomputed == len(prompt) - cached < 17
    assert first == second == references[0]


def test_context_window_fits_the_kv_cache(source) -> None:
    engine = make_engine(source, block_size=16, num_blocks=20)
    assert engine.max_model_len == 320  # capped from the model's 8192 to what 20 blocks hold
    with pytest.raises(ConfigError, match="does not fit the KV cache"):
        make_engine(source, block_size=16, num_blocks=20, max_model_len=1024)
