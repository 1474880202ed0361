"""Greedy decoding through the engine equals HF transformers on the same GGUF weights, token for token (fp32)."""

from __future__ import annotations

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import build_config
from tests.conftest import hf_greedy, long_text

NEW_TOKENS = 64

CHAT_PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are a terse assistant that answers in one sentence."},
        {"role": "user", "content": "Explain what a hash table is."},
    ],
    [
        {"role": "user", "content": "Write a haiku about the sea."},
        {
            "role": "assistant",
            "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time.",
        },
        {"role": "user", "content": "Now one about mountains."},
    ],
    [{"role": "user", "content": "Summarise this text:\n\n" + long_text(2600)}],
]
RAW_PROMPTS = [
    "The quick brown fox",
    "def fibonacci(n):\n    ",
    "1, 2, 3, 5, 8, 13,",
    long_text(3000),
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(config=build_config("fp32"))


@pytest.fixture(scope="module")
def prompts(llm: LLM) -> list[list[int]]:
    chat = [llm.tokenizer.encode_chat(messages) for messages in CHAT_PROMPTS]
    raw = [llm.tokenizer.encode(text) for text in RAW_PROMPTS]
    return chat + raw


@pytest.fixture(scope="module")
def references(hf_model, prompts: list[list[int]]) -> list[tuple[list[int], torch.Tensor]]:
    return [hf_greedy(hf_model, prompt, NEW_TOKENS) for prompt in prompts]


def test_prompt_set_is_varied(prompts: list[list[int]]) -> None:
    lengths = sorted(len(p) for p in prompts)
    assert len(prompts) >= 8
    assert lengths[0] < 20 and lengths[-1] >= 500, lengths


def test_batched_greedy_matches_reference(llm: LLM, prompts, references) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = llm.generate(prompts, params)
    for i, (result, (expected, _)) in enumerate(zip(results, references)):
        assert result.outputs[0].token_ids == expected, f"prompt {i} diverged"


def test_last_position_logprobs_match_reference(llm: LLM, prompts, references) -> None:
    """The engine's log-probabilities of the first generated position agree with the reference's within 1e-4."""
    params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=20)
    results = llm.generate(prompts, params)
    for result, (_, reference_logits) in zip(results, references):
        reference = torch.log_softmax(reference_logits, dim=-1)
        token = result.outputs[0].logprobs[0]
        assert token.token_id == int(reference.argmax())
        assert abs(token.logprob - float(reference[token.token_id])) < 1e-4
        for token_id, logprob in token.top_logprobs:
            assert abs(logprob - float(reference[token_id])) < 1e-4
        expected_top = set(reference.topk(20).indices.tolist())
        assert {token_id for token_id, _ in token.top_logprobs} == expected_top


def test_four_bit_weight_copies_reproduce_the_reference(prompts, references) -> None:
    """The embedded model's projections are Q4_1: their 4-bit copies hold the file's own levels, so decode steps run
    through them (prefills stay dense) still decode the reference's tokens. One chat and one raw prompt: the 4-bit
    kernel is slow with fp32 activations."""
    chosen = [0, len(CHAT_PROMPTS)]
    config = build_config("fp32", {"weight_quantization": "int4", "int4_max_rows": len(chosen)})
    four_bit = LLM(config=config)
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    results = four_bit.generate([prompts[i] for i in chosen], params)
    for i, result in zip(chosen, results):
        assert result.outputs[0].token_ids == references[i][0], f"prompt {i} diverged"
