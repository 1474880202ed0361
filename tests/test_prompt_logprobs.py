"""Prompt logprobs equal the HF transformers reference's, under chunked prefill, prefix-cache hits and preemption."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import build_config
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from tests.conftest import long_text

TOP = 5
PARAMS = SamplingParams(temperature=0.0, max_tokens=2, prompt_logprobs=TOP)


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


@pytest.fixture(scope="module")
def prompts(source: ModelSource) -> list[list[int]]:
    texts = [long_text(300), long_text(500)[300:], "Once upon a time, in a land far away,"]
    return [source.tokenizer.encode(text) for text in texts]


def make_engine(source: ModelSource, num_blocks: int | None = None, **overrides) -> LLMEngine:
    config = build_config("fp32", {"block_size": 8, "max_num_batched_tokens": 16, **overrides})
    if num_blocks is not None:
        layout = KVCacheLayout.for_model(source.spec, 8, config.model.torch_dtype)
        config.cache = dataclasses.replace(config.cache, kv_cache_memory=str(num_blocks * layout.bytes_per_block))
    return LLMEngine(config, source=source, progress=False)


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> dict[int, list[SampledToken] | None]:
    """Run the prompts to the end; the prompt logprobs each request reported (None if none)."""
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params)
    reported: dict[int, list[SampledToken] | None] = {i: None for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.prompt_logprobs is not None:
                assert reported[int(output.request_id)] is None, "prompt logprobs reported twice"
                reported[int(output.request_id)] = output.prompt_logprobs
    return reported


def check(hf_model, prompt: list[int], entries: list[SampledToken] | None) -> None:
    input_ids = torch.tensor([prompt])
    with torch.inference_mode():
        logits = hf_model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[0].float()
    reference = torch.log_softmax(logits, dim=-1)
    assert entries is not None and len(entries) == len(prompt) - 1
    for position, entry in enumerate(entries):
        target = prompt[position + 1]
        assert entry.token_id == target
        assert entry.logprob == pytest.approx(float(reference[position, target]), abs=1e-4)
        assert {token_id for token_id, _ in entry.top_logprobs} == set(reference[position].topk(TOP).indices.tolist())


def test_chunked_prefill_matches_reference(source, prompts, hf_model) -> None:
    engine = make_engine(source)
    assert min(len(p) for p in prompts[:2]) > 16, "the prompts must span several chunks"
    reported = run(engine, prompts, PARAMS)
    for i, prompt in enumerate(prompts):
        check(hf_model, prompt, reported[i])


def test_cached_prompt_is_recomputed(source, prompts, hf_model) -> None:
    engine = make_engine(source)
    plain = dataclasses.replace(PARAMS, prompt_logprobs=None)
    assert run(engine, prompts[:1], plain) == {0: None}
    hits = engine.stats().prefix_cache_hits
    check(hf_model, prompts[0], run(engine, prompts[:1], PARAMS)[0])
    assert engine.stats().prefix_cache_hits == hits
    run(engine, prompts[:1], plain)  # its blocks are still shared with others
    assert engine.stats().prefix_cache_hits > hits


def test_preemption_records_each_position_once(source, prompts, hf_model) -> None:
    longest = max(len(p) for p in prompts) + PARAMS.max_tokens
    engine = make_engine(source, num_blocks=-(-longest // 8) + 4, enable_prefix_caching=False)
    reported = run(engine, prompts, dataclasses.replace(PARAMS, max_tokens=16, ignore_eos=True))
    assert engine.stats().num_preemptions > 0
    for i, prompt in enumerate(prompts):
        check(hf_model, prompt, reported[i])
