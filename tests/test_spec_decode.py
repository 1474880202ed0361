"""Speculative decoding: the n-gram drafter, the verifier's acceptance rules, and greedy output token-identical to
decoding without drafts under batching and preemption (fp32)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from engine.config import build_config
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import EngineCounters, LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampler import SamplingRow
from engine.sampling_params import SamplingParams
from engine.spec import NgramDrafter, verifier
from scheduler.output import SchedulerStats
from server.metrics import EngineMetrics
from server.protocol import CompletionRequest
from tests.conftest import long_text

NEW_TOKENS = 32
PASSAGE = long_text(1200)[600:1200]


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


@pytest.fixture(scope="module")
def prompts(source: ModelSource) -> list[list[int]]:
    tokenizer = source.tokenizer
    # Input-grounded first: the passage, then its opening again, which the model goes on copying.
    copy = tokenizer.encode(PASSAGE + "\n\n" + PASSAGE[: PASSAGE.index(" ", 150)])
    repeat = tokenizer.encode_chat([{"role": "user", "content": "Repeat this text word for word:\n\n" + PASSAGE}])
    question = tokenizer.encode_chat([{"role": "user", "content": "What is 7 times 8?"}])
    raw = [tokenizer.encode(text) for text in ("Once upon a time", "import numpy as np\n")]
    return [copy, repeat, question, *raw]


def params_for(i: int, stop_token: int | None = None) -> SamplingParams:
    """Greedy, with a few variations: request 2 opts out, 3 asks for logprobs (so does not speculate either), 4 stops
    at a token and 1 has a small max_tokens that cuts drafts."""
    return SamplingParams(
        temperature=0.0,
        max_tokens=5 if i == 1 else NEW_TOKENS,
        speculative_decoding=i != 2,
        logprobs=2 if i == 3 else None,
        stop_token_ids=[stop_token] if i == 4 and stop_token is not None else [],
    )


def make_engine(source: ModelSource, method: str, block_size: int = 16, num_blocks: int | None = None, **fields):
    config = build_config("fp32", {"speculative_method": method, "block_size": block_size, **fields})
    if num_blocks is not None:
        layout = KVCacheLayout.for_model(source.spec, block_size, config.model.torch_dtype)
        config.cache = dataclasses.replace(config.cache, kv_cache_memory=str(num_blocks * layout.bytes_per_block))
    return LLMEngine(config, source=source, progress=False)


def run(engine: LLMEngine, prompts: list[list[int]], params: list[SamplingParams]) -> list[list[int]]:
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        engine.add_request(str(i), prompt, p)
    tokens: list[list[int]] = [[] for _ in prompts]
    for _ in range(10_000):
        if not engine.has_unfinished_requests():
            break
        for output in engine.step():
            tokens[int(output.request_id)].extend(output.new_token_ids)
    assert not engine.has_unfinished_requests(), "the engine stopped making progress"
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return tokens


@pytest.fixture(scope="module")
def stop_token(source, prompts) -> int:
    """A token request 4 produces mid-way without speculation, to stop it there."""
    tokens = run(make_engine(source, "none"), prompts[4:5], [params_for(0)])[0]
    return tokens[NEW_TOKENS // 2]


@pytest.fixture(scope="module")
def references(source, prompts, stop_token) -> list[list[int]]:
    params = [params_for(i, stop_token) for i in range(len(prompts))]
    return run(make_engine(source, "none"), prompts, params)


def test_greedy_batch_matches_decoding_without_drafts(source, prompts, stop_token, references) -> None:
    engine = make_engine(source, "ngram")
    params = [params_for(i, stop_token) for i in range(len(prompts))]
    tokens = run(engine, prompts, params)
    assert tokens == references
    assert len(tokens[4]) < NEW_TOKENS and len(tokens[1]) == 5
    counters = engine.counters
    assert counters.spec_accepted_tokens > 0, "the input-grounded prompts had drafts accepted"
    assert 0 < counters.spec_drafts <= counters.spec_draft_tokens
    assert counters.generation_tokens == sum(len(t) for t in tokens)


def test_greedy_matches_under_preemption(source, prompts, stop_token, references) -> None:
    """Room for the first prompt's whole sequence and three blocks more: the short prompts, admitted beside it, take
    the rest, and growing they preempt one another (the long second prompt comes last, so it does not block them)."""
    order = [0, 2, 3, 4, 1]
    num_blocks = -(-(len(prompts[0]) + NEW_TOKENS) // 8) + 3
    engine = make_engine(source, "ngram", block_size=8, num_blocks=num_blocks, enable_prefix_caching=False)
    tokens = run(engine, [prompts[i] for i in order], [params_for(i, stop_token) for i in order])
    assert engine.stats().num_preemptions > 0
    assert engine.counters.spec_accepted_tokens > 0
    assert tokens == [references[i] for i in order]


def test_sampling_requests_speculate_and_finish(source, prompts) -> None:
    engine = make_engine(source, "ngram")
    params = SamplingParams(temperature=0.8, top_k=20, repetition_penalty=1.1, max_tokens=NEW_TOKENS, ignore_eos=True)
    tokens = run(engine, prompts[:2], [params, params])
    assert [len(t) for t in tokens] == [NEW_TOKENS, NEW_TOKENS]
    assert engine.counters.spec_draft_tokens > 0


@pytest.mark.parametrize(
    ("params", "speculates"),
    [
        ({}, True),
        ({"temperature": 0.0, "seed": 3}, True),  # a seed does not matter to greedy decoding
        ({"seed": 3}, False),
        ({"logprobs": 1}, False),
        ({"prompt_logprobs": 0}, False),
        ({"stop": ["."]}, False),
        ({"speculative_decoding": False}, False),
    ],
)
def test_which_requests_speculate(params: dict, speculates: bool) -> None:
    assert SamplingParams(**params).can_speculate is speculates


def test_request_field_and_metrics() -> None:
    request = CompletionRequest(prompt="x", speculative_decoding=False)
    assert not request.to_sampling_params(16, None).speculative_decoding
    metrics = EngineMetrics("m")
    stats = SchedulerStats(0, 0, 0.0, 0, 0, 0, 1, 1)
    metrics.observe([], stats, EngineCounters(spec_drafts=2, spec_draft_tokens=7, spec_accepted_tokens=5))
    value = lambda name: metrics.registry.get_sample_value(f"spindle:{name}", {"model_name": "m"})  # noqa: E731
    assert value("spec_decode_num_drafts_total") == 2
    assert value("spec_decode_num_draft_tokens_total") == 7
    assert value("spec_decode_num_accepted_tokens_total") == 5


# ---------------------------------------------------------------- the n-gram drafter


@pytest.mark.parametrize(
    ("tokens", "expected"),
    [
        ([1, 2, 3, 4, 5, 1, 2, 3, 9, 9, 1, 2, 3], [9, 9, 1]),  # the latest of two equal matches
        ([7, 1, 2, 3, 4, 0, 2, 3, 4, 9, 1, 2, 3, 4], [0, 2, 3]),  # the longest match beats a later shorter one
        ([1, 2, 3, 4, 5, 6, 7, 2, 3], [4, 5, 6]),
        ([1, 2, 3, 4], []),  # no earlier occurrence
        ([5, 1, 2, 5], []),  # a match shorter than ngram_min
        ([1, 2, 8, 1, 2], [8, 1, 2]),  # the continuation may run into the suffix itself
    ],
)
def test_ngram_drafter(tokens: list[int], expected: list[int]) -> None:
    assert NgramDrafter(2, 4).propose_one(tokens, 3) == expected


def test_ngram_drafter_caps_the_draft_length() -> None:
    tokens = [1, 2, 3, 4, 5, 6, 1, 2]
    assert NgramDrafter(1, 3).propose_one(tokens, 2) == [3, 4]
    assert NgramDrafter(1, 3).propose_one(tokens, 0) == []


# ---------------------------------------------------------------- the verifier


def row(**params) -> SamplingRow:
    return SamplingRow(SamplingParams(**params), None, [0], [], frozenset())


def test_greedy_verification_accepts_the_matching_prefix() -> None:
    logits = torch.full((4, 8), -1.0)
    for position, target in enumerate([3, 5, 6, 2]):
        logits[position, target] = 1.0
    assert verifier.verify(logits.clone(), [row(temperature=0.0)], [[3, 5, 6]]) == [[3, 5, 6, 2]]
    assert verifier.verify(logits.clone(), [row(temperature=0.0)], [[3, 4, 6]]) == [[3, 5]]
    assert verifier.verify(logits[:1].clone(), [row(temperature=0.0)], [[]]) == [[3]]


def test_greedy_verification_applies_the_sampler_transforms() -> None:
    """Position 1 sees draft 3 as output: the repetition penalty moves its argmax off token 3."""
    logits = torch.tensor([[0.0, 0.0, 0.0, 2.0], [0.0, 0.0, 1.5, 2.0]])
    assert verifier.verify(logits, [row(temperature=0.0, repetition_penalty=2.0)], [[3]]) == [[3, 2]]


# Chi-square critical value for 5 degrees of freedom (6 tokens) at significance 0.001: a correct rule fails the test
# with probability 1/1000 (the seed is fixed, so the test is deterministic).
CHI2_CRITICAL_DF5_P001 = 20.515
TARGET_LOGITS = torch.tensor([2.0, 1.2, 0.9, 0.3, -0.4, -1.0])
NUM_SAMPLES = 6000


@pytest.fixture
def one_thread():
    """The verify step on a 6-token vocabulary: more threads only add synchronisation (20x here)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def emitted_first_tokens(draft: int, **params) -> torch.Tensor:
    """Counts of the first token the verify step emits for a one-token draft, over many runs."""
    torch.manual_seed(1234)
    counts = torch.zeros(len(TARGET_LOGITS))
    for _ in range(NUM_SAMPLES):
        logits = TARGET_LOGITS.repeat(2, 1)
        counts[verifier.verify(logits, [row(**params)], [[draft]])[0][0]] += 1
    return counts


def chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    assert counts[expected == 0].sum() == 0, "a token outside the target's support was emitted"
    support = expected > 0
    return float(((counts[support] - expected[support]) ** 2 / expected[support]).sum())


CASES = [
    (0, {"temperature": 1.0}),  # the most likely token drafted
    (4, {"temperature": 1.0}),  # an unlikely one
    (1, {"temperature": 0.7, "top_k": 4}),  # temperature and a top-k cut are part of the target distribution
]


def target_probs(params: dict) -> torch.Tensor:
    logits = TARGET_LOGITS / params["temperature"]
    if "top_k" in params:
        logits[logits.argsort(descending=True)[params["top_k"] :]] = float("-inf")
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize(("draft", "params"), CASES)
def test_rejection_sampling_keeps_the_target_distribution(one_thread, draft: int, params: dict) -> None:
    statistic = chi_square(emitted_first_tokens(draft, **params), target_probs(params))
    assert statistic < CHI2_CRITICAL_DF5_P001


def _always_accept(probs: torch.Tensor, draft: list[int], uniform: torch.Tensor) -> list[int]:
    return [*draft, int(torch.multinomial(probs[len(draft)], 1))]


def _resample_with_draft(probs: torch.Tensor, draft: list[int], uniform: torch.Tensor) -> list[int]:
    """A subtler bug: on rejection draw from the whole target distribution, the draft token included."""
    if draft and not uniform[0] < probs[0, draft[0]]:
        return [int(torch.multinomial(probs[0], 1))]
    return [*draft[:1], int(torch.multinomial(probs[1], 1))]


@pytest.mark.parametrize("wrong_rule", [_always_accept, _resample_with_draft])
@pytest.mark.parametrize(("draft", "params"), CASES[:2])
def test_a_wrong_rule_fails_the_same_test(one_thread, monkeypatch, wrong_rule, draft: int, params: dict) -> None:
    monkeypatch.setattr(verifier, "rejection_sample", wrong_rule)
    statistic = chi_square(emitted_first_tokens(draft, **params), target_probs(params))
    assert statistic > CHI2_CRITICAL_DF5_P001
