"""Speculative decoding: the drafters (n-gram, layer skipping, a draft model), the verifier's acceptance rules, the
adaptive draft length, and greedy output token-identical to decoding without drafts under batching and preemption
(fp32) with each drafter."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from engine.config import build_config
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.models import build_model
from engine.outputs import EngineCounters
from engine.sampler import SamplingRow
from engine.sampling_params import SamplingParams
from engine.spec import NgramDrafter, verifier
from engine.spec.draft_length import PAUSE_STEPS, DraftLengthController
from engine.spec.draft_model import write_truncated
from engine.spec.layer_skip import format_layers, parse_layers, search_layers
from engine.spec.sparse_mlp import ChannelRows, SparseMlp, sparse_matmul
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


@pytest.fixture(scope="module")
def draft_dir(source: ModelSource, tmp_path_factory) -> str:
    """A draft model: the default model's first 8 layers as a Hugging Face directory, with its tokenizer."""
    out = tmp_path_factory.mktemp("draft")
    write_truncated(source, out, 8)
    return str(out)


# The drafters beside n-gram, as config fields; the draft model's path is filled in from the fixture.
MODEL_DRAFTERS = {
    "layer_skip": {"speculative_method": "layer_skip", "draft_layers": "0-19,25-29"},
    "sparse_mlp": {"speculative_method": "sparse_mlp", "draft_mlp_density": 0.5},
    "draft_model": {"speculative_method": "draft_model"},
}
DRAFTERS = ["ngram", *MODEL_DRAFTERS]
# The model drafters' longest runs go to the slow suite (scripts/test-slow.sh); n-gram keeps the case in the default.
SLOW_MODEL_DRAFTERS = ["ngram", *(pytest.param(name, marks=pytest.mark.slow) for name in MODEL_DRAFTERS)]


def drafter_fields(name: str, draft_dir: str) -> dict:
    if name == "ngram":
        return {"speculative_method": "ngram"}
    fields = dict(MODEL_DRAFTERS[name])
    if name == "draft_model":
        fields["draft_model"] = draft_dir
    return fields


def make_engine(source: ModelSource, method: str, block_size: int = 16, num_blocks: int | None = None, **fields):
    fields = {"speculative_method": method, **fields}
    config = build_config("fp32", {"block_size": block_size, "speculative_max_batch_size": None, **fields})
    if num_blocks is not None:
        layout = KVCacheLayout.for_model(source.spec, block_size, config.model.torch_dtype)
        per_block = layout.bytes_per_block
        if fields.get("draft_model"):  # the draft model's rows share each block
            draft_spec = open_model(fields["draft_model"]).spec
            per_block += KVCacheLayout.for_model(draft_spec, block_size, config.model.torch_dtype).bytes_per_block
        config.cache = dataclasses.replace(config.cache, kv_cache_memory=str(num_blocks * per_block))
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


@pytest.mark.parametrize("drafter", DRAFTERS)
def test_greedy_batch_matches_decoding_without_drafts(
    source, prompts, stop_token, references, draft_dir, drafter
) -> None:
    fields = drafter_fields(drafter, draft_dir)
    engine = make_engine(source, **{"method": fields.pop("speculative_method"), **fields})
    params = [params_for(i, stop_token) for i in range(len(prompts))]
    tokens = run(engine, prompts, params)
    assert tokens == references
    assert len(tokens[4]) < NEW_TOKENS and len(tokens[1]) == 5
    counters = engine.counters
    assert 0 < counters.spec_drafts <= counters.spec_draft_tokens
    if drafter != "draft_model":  # the 8-layer truncated draft agrees with the target too rarely to count on it
        assert counters.spec_accepted_tokens > 0, "drafts were accepted"
    assert counters.generation_tokens == sum(len(t) for t in tokens)


@pytest.mark.parametrize("drafter", SLOW_MODEL_DRAFTERS)
def test_greedy_matches_under_preemption(source, prompts, stop_token, references, draft_dir, drafter) -> None:
    """Room for the first prompt's whole sequence and three blocks more: the short prompts, admitted beside it, take
    the rest, and growing they preempt one another (the long second prompt comes last, so it does not block them)."""
    order = [0, 2, 3, 4, 1]
    num_blocks = -(-(len(prompts[0]) + NEW_TOKENS) // 8) + 3
    fields = drafter_fields(drafter, draft_dir)
    method = fields.pop("speculative_method")
    engine = make_engine(source, method, block_size=8, num_blocks=num_blocks, enable_prefix_caching=False, **fields)
    tokens = run(engine, [prompts[i] for i in order], [params_for(i, stop_token) for i in order])
    assert engine.stats().num_preemptions > 0
    assert engine.counters.spec_draft_tokens > 0
    if drafter != "draft_model":
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
    assert value("spec_decode_acceptance_rate") == pytest.approx(5 / 7)
    assert value("spec_decode_mean_accepted_length") == pytest.approx(5 / 2)


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


# ---------------------------------------------------------------- sampling through each model drafter

CHI2_CRITICAL_DF2_P001 = 13.816
NUM_SAMPLING_REQUESTS = 240


@pytest.mark.parametrize(
    "drafter",
    [
        pytest.param("layer_skip", marks=pytest.mark.slow),
        pytest.param("sparse_mlp", marks=pytest.mark.slow),
        "draft_model",
    ],
)
def test_sampling_with_a_model_drafter_keeps_the_target_distribution(source, draft_dir, drafter) -> None:
    """Many requests sample three tokens (top-k 3), the last two in one step that verifies one draft (a draft past
    max_tokens less one is never made): the second token, given the most frequent first one, is distributed as the
    target's next-token probabilities read from an engine without drafts."""
    prompt = source.tokenizer.encode("The three primary colours are")
    fields = drafter_fields(drafter, draft_dir)
    method = fields.pop("speculative_method")
    engine = make_engine(source, method, adaptive_draft_length=False, max_num_seqs=256, **fields)
    params = SamplingParams(temperature=1.0, top_k=3, max_tokens=3, ignore_eos=True)
    torch.manual_seed(4321)
    outputs = run(engine, [prompt] * NUM_SAMPLING_REQUESTS, [params] * NUM_SAMPLING_REQUESTS)
    assert engine.counters.spec_draft_tokens >= 0.9 * NUM_SAMPLING_REQUESTS, "most requests verified a draft"
    firsts = [tokens[0] for tokens in outputs]
    first = max(set(firsts), key=firsts.count)
    seconds = [tokens[1] for tokens in outputs if tokens[0] == first]

    reference = make_engine(source, "none")
    reference.add_request("r", [*prompt, first], SamplingParams(temperature=0.0, max_tokens=1, logprobs=3))
    (entry,) = next(o for o in reference.step() if o.new_logprobs).new_logprobs
    top = sorted(entry.top_logprobs, key=lambda item: -item[1])[:3]
    support = [token for token, _ in top]
    probs = torch.softmax(torch.tensor([logprob for _, logprob in top]), dim=0)
    assert set(seconds) <= set(support), "a token outside the target's top-k was emitted"
    counts = torch.tensor([float(seconds.count(token)) for token in support])
    assert chi_square(counts, probs) < CHI2_CRITICAL_DF2_P001


# ---------------------------------------------------------------- adaptive draft length and the batch cutoff


def test_draft_length_grows_on_full_acceptance_and_resets_on_rejection() -> None:
    lengths = DraftLengthController(
        initial=2, maximum=4, adaptive=True, min_acceptance=0.3, pause_on_low_acceptance=False
    )
    assert lengths.length("a") == 2
    lengths.observe("a", 2, 2)
    assert lengths.length("a") == 3
    lengths.observe("a", 3, 3)
    lengths.observe("a", 4, 4)
    assert lengths.length("a") == 4  # capped at the maximum
    lengths.observe("a", 4, 1)
    assert lengths.length("a") == 2
    for _ in range(5):
        lengths.observe("a", 2, 0)
    assert lengths.length("a") == 2, "a drafter that stops on entropy is never paused"


def test_low_acceptance_pauses_drafting_for_a_while() -> None:
    lengths = DraftLengthController(
        initial=3, maximum=6, adaptive=True, min_acceptance=0.3, pause_on_low_acceptance=True
    )
    lengths.length("a")
    observed = 0
    while lengths.length("a"):
        lengths.observe("a", 3, 0)
        observed += 1
    assert observed == 4  # 1.0 decays by 0.7 per rejected step: 0.7, 0.49, 0.34, 0.24 < 0.3
    paused = 1 + sum(1 for _ in range(PAUSE_STEPS) if lengths.length("a") == 0)
    assert paused == PAUSE_STEPS
    assert lengths.length("a") == 3
    lengths.observe("a", 3, 0)  # restarted at the threshold: one more poor draft pauses again
    assert lengths.length("a") == 0
    fixed = DraftLengthController(3, 6, adaptive=False, min_acceptance=0.3, pause_on_low_acceptance=True)
    fixed.length("b")
    fixed.observe("b", 3, 3)
    assert fixed.length("b") == 3


def test_no_drafts_while_the_batch_is_over_the_cutoff(source, prompts, references) -> None:
    engine = make_engine(source, "ngram", speculative_max_batch_size=1)
    for i in (0, 1):
        engine.add_request(str(i), prompts[i], params_for(i))
    tokens: dict[str, list[int]] = {"0": [], "1": []}
    drafted_alone = 0
    while engine.has_unfinished_requests():
        running, before = engine.scheduler.num_running, engine.counters.spec_drafts
        for output in engine.step():
            tokens[output.request_id].extend(output.new_token_ids)
        if running > 1:
            assert engine.counters.spec_drafts == before
        else:
            drafted_alone += engine.counters.spec_drafts - before
    assert drafted_alone > 0, "the copying request speculated once it ran alone"
    assert tokens["0"] == references[0] and tokens["1"] == references[1]


# ---------------------------------------------------------------- layer choice and start-up errors


def test_draft_layers_parse_and_format() -> None:
    assert parse_layers("0-3, 7,9-10", 12) == [0, 1, 2, 3, 7, 9, 10]
    assert format_layers([0, 1, 2, 3, 7, 9, 10]) == "0-3,7,9-10"
    for bad, message in [("0-12", "not a range"), ("3-1", "not a range"), ("a", "expected"), ("0-11", "every")]:
        with pytest.raises(ConfigError, match=message):
            parse_layers(bad, 12)


def test_layer_search_ranks_candidate_sets(source) -> None:
    model = build_model(source, torch.float32, torch.device("cpu"), progress=False)
    prompt = source.tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown fox")
    ranked = search_layers(model, [prompt], keep=27)
    assert {name for name, _, _ in ranked} == {"early exit", "layer skipping"}
    assert [agreement for *_, agreement in ranked] == sorted((a for *_, a in ranked), reverse=True)
    for name, layers, _ in ranked:
        assert len(layers) == 27 and (name != "layer skipping" or {0, 29} <= set(layers))
    assert all(0.0 <= agreement <= 1.0 for *_, agreement in ranked)


def test_sparse_matmul_keeps_each_tokens_top_weighted_channels() -> None:
    """Against a naive reference: per token, zero every input channel outside the ``keep`` largest
    ``|x_i| * ||W[:, i]||`` (ranked with a Python sort), then multiply densely."""
    torch.manual_seed(0)
    weight = torch.randn(24, 40) * torch.linspace(0.1, 3.0, 40)  # [out, in], column norms spread out
    x = torch.randn(5, 40)
    keep = 11
    column_norms = weight.norm(dim=0)
    masked = torch.zeros_like(x)
    for t in range(x.shape[0]):
        ranked = sorted(range(40), key=lambda i: float(x[t, i].abs() * column_norms[i]), reverse=True)
        masked[t, ranked[:keep]] = x[t, ranked[:keep]]
    expected = masked @ weight.t()
    torch.testing.assert_close(sparse_matmul(x, ChannelRows(weight, int8=False), keep), expected)
    torch.testing.assert_close(sparse_matmul(x, ChannelRows(weight, int8=False), 40), x @ weight.t())
    # 8-bit rows: the same channels, each row rounded to 255 levels of its own range.
    int8 = sparse_matmul(x, ChannelRows(weight, int8=True), keep)
    assert float((int8 - expected).norm() / expected.norm()) < 0.02


def test_sparse_mlp_is_closer_to_the_dense_mlp_than_random_channels(source) -> None:
    """On the model's own hidden states, WINA's choice of half the channels approximates the dense MLP better than
    half the channels chosen at random; with every channel it is the dense MLP."""
    model = build_model(source, torch.float32, torch.device("cpu"), progress=False)
    ids = torch.tensor(source.tokenizer.encode("The quick brown fox jumps over the lazy dog near the river bank."))
    layer = model.layers[10]
    hidden = layer.post_attention_layernorm(model.embed_tokens(ids) * 4.0)
    dense = layer.mlp(hidden)
    torch.testing.assert_close(SparseMlp(layer.mlp, 1.0, int8=False)(hidden), dense, rtol=1e-4, atol=1e-4)

    def error(output: torch.Tensor) -> float:
        return float((output - dense).norm() / dense.norm())

    generator = torch.Generator().manual_seed(0)

    def random_half(n: int) -> torch.Tensor:
        return (torch.rand(hidden.shape[0], n, generator=generator) < 0.5).float()

    gate, up = layer.mlp.gate_up_proj(hidden * random_half(hidden.shape[1])).chunk(2, dim=-1)
    units = torch.nn.functional.silu(gate) * up
    random_channels = layer.mlp.down_proj(units * random_half(units.shape[1]))
    for int8 in (False, True):
        assert error(SparseMlp(layer.mlp, 0.5, int8)(hidden)) < 0.5 * error(random_channels)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"speculative_method": "draft_model"}, "draft_model"),
        ({"speculative_method": "ngram", "draft_model": "/x"}, "draft_model"),
        ({"num_speculative_tokens": 9}, "max_speculative_tokens"),
        ({"speculative_max_batch_size": 0}, "speculative_max_batch_size"),
        ({"draft_min_acceptance": 1.0}, "draft_min_acceptance"),
        ({"draft_mlp_density": 1.0}, "draft_mlp_density"),
        ({"draft_mlp_density": 0.0}, "draft_mlp_density"),
    ],
)
def test_bad_speculative_settings_are_config_errors(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config(None, fields)


def test_start_up_refuses_bad_draft_layers_and_a_foreign_tokenizer(source, draft_dir, tmp_path) -> None:
    with pytest.raises(ConfigError, match="draft_layers"):
        make_engine(source, "layer_skip", draft_layers="0-30")
    foreign = tmp_path / "foreign"
    write_truncated(source, foreign, 2)
    tokenizer = json.loads((foreign / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[100:102]
    vocab[first], vocab[second] = vocab[second], vocab[first]
    (foreign / "tokenizer.json").write_text(json.dumps(tokenizer))
    with pytest.raises(ConfigError, match="tokenizer differs"):
        make_engine(source, "draft_model", draft_model=str(foreign))
    with pytest.raises(ConfigError, match="draft_model"):
        make_engine(source, "draft_model", draft_model=str(tmp_path / "missing"))
