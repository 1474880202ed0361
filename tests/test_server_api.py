"""The OpenAI-compatible API of a real server process, driven by the official openai client and raw HTTP."""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

from engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from engine.llm import LLM
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

PROMPT = "The capital of France is Paris. The capital of Germany is"
COUNTING = "1, 2, 3, 4, 5, 6,"
CHAT = [
    {"role": "system", "content": "You are a concise assistant."},
    {"role": "user", "content": "Name a primary colour."},
    {"role": "assistant", "content": "Red."},
    {"role": "user", "content": "Name another one."},
]
GREETING = [{"role": "user", "content": "Hi"}]
GREEDY: dict[str, Any] = {"temperature": 0.0}


@dataclass
class Streamed:
    """A streamed response reassembled per choice index."""

    text: dict[int, str] = field(default_factory=lambda: defaultdict(str))
    token_ids: dict[int, list[int]] = field(default_factory=lambda: defaultdict(list))
    finish_reason: dict[int, str] = field(default_factory=dict)
    stop_reason: dict[int, Any] = field(default_factory=dict)
    logprobs: dict[int, list[Any]] = field(default_factory=lambda: defaultdict(list))
    pieces: list[str] = field(default_factory=list)
    chunks: list[Any] = field(default_factory=list)

    def add(self, index: int, text: str | None, choice: Any) -> None:
        self.pieces.append(text or "")
        self.text[index] += text or ""
        self.token_ids[index].extend(choice.token_ids or [])
        if choice.finish_reason is not None:
            self.finish_reason[index] = choice.finish_reason
            self.stop_reason[index] = choice.stop_reason


def with_token_ids(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, "extra_body": {"return_token_ids": True, **kwargs.get("extra_body", {})}}


def complete(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.completions.create(**with_token_ids(kwargs))


def chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    return client.chat.completions.create(**with_token_ids(kwargs))


def stream_completion(client: openai.OpenAI, **kwargs: Any) -> Streamed:
    result = Streamed()
    for chunk in client.completions.create(stream=True, **with_token_ids(kwargs)):
        result.chunks.append(chunk)
        for choice in chunk.choices:
            result.add(choice.index, choice.text, choice)
            if choice.logprobs is not None:
                result.logprobs[choice.index].append(choice.logprobs)
    return result


def stream_chat(client: openai.OpenAI, **kwargs: Any) -> Streamed:
    result = Streamed()
    for chunk in client.chat.completions.create(stream=True, **with_token_ids(kwargs)):
        result.chunks.append(chunk)
        for choice in chunk.choices:
            result.add(choice.index, choice.delta.content, choice)
            if choice.logprobs is not None:
                result.logprobs[choice.index].extend(choice.logprobs.content or [])
    return result


@pytest.fixture(scope="module")
def greedy(client: openai.OpenAI, model: str) -> Any:
    """A greedy completion of PROMPT, to pick stop strings and stop tokens from."""
    return complete(client, model=model, prompt=PROMPT, max_tokens=24, **GREEDY).choices[0]


# ---------------------------------------------------------------- plain endpoints
def test_models_version_health(client: openai.OpenAI, http: httpx.Client, offline_llm: LLM) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [offline_llm.engine.model_name]
    assert models[0].max_model_len == offline_llm.engine.max_model_len
    retrieved = client.models.retrieve(offline_llm.engine.model_name)  # the SDK's GET /v1/models/{id}
    assert (retrieved.id, retrieved.object) == (offline_llm.engine.model_name, "model")
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("org/no-such-model")
    assert missing.value.body["code"] == "model_not_found"
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/version").json()["version"]


def test_tokenize_and_detokenize(http: httpx.Client, offline_llm: LLM) -> None:
    tokens = http.post("/tokenize", json={"prompt": PROMPT}).json()
    assert tokens["tokens"] == offline_llm.tokenizer.encode(PROMPT)
    assert tokens["count"] == len(tokens["tokens"])
    assert tokens["max_model_len"] == offline_llm.engine.max_model_len
    assert http.post("/detokenize", json={"tokens": tokens["tokens"]}).json() == {"prompt": PROMPT}
    chat_tokens = http.post("/tokenize", json={"messages": CHAT}).json()["tokens"]
    assert chat_tokens == offline_llm.tokenizer.encode_chat(CHAT, add_generation_prompt=True)


def test_a_developer_message_is_the_system_prompt(http: httpx.Client, offline_llm: LLM) -> None:
    """OpenAI's developer role is the system role: it replaces the template's default system prompt instead of
    following it as a turn of an unknown role."""
    user = {"role": "user", "content": "Hi"}
    as_developer = [{"role": "developer", "content": "Answer in French."}, user]
    as_system = [{"role": "system", "content": "Answer in French."}, user]
    tokens = http.post("/tokenize", json={"messages": as_developer}).json()["tokens"]
    assert tokens == offline_llm.tokenizer.encode_chat(as_system, add_generation_prompt=True)
    assert "developer" not in offline_llm.tokenizer.decode(tokens)


def test_metrics(server: ServerProcess, client: openai.OpenAI, model: str) -> None:
    before = server.metrics()
    complete(client, model=model, prompt=PROMPT, max_tokens=2)
    after = server.metrics()
    for name in (
        "spindle:num_requests_running",
        "spindle:num_requests_waiting",
        "spindle:kv_cache_usage_perc",
        "spindle:time_to_first_token_seconds_count",
        "spindle:inter_token_latency_seconds_count",
        "spindle:e2e_request_latency_seconds_count",
        "spindle:prefix_cache_queries_total",
        "spindle:prefix_cache_hits_total",
        "spindle:num_preemptions_total",
    ):
        assert name in after, name
    grew = {
        "spindle:generation_tokens_total": 2,
        "spindle:request_success_total[length]": 1,
        "spindle:e2e_request_latency_seconds_count": 1,
        "spindle:time_to_first_token_seconds_count": 1,
        "spindle:inter_token_latency_seconds_count": 1,
    }
    for name, delta in grew.items():
        assert after[name] - before.get(name, 0.0) == delta, name
    assert after["spindle:prompt_tokens_total"] > before.get("spindle:prompt_tokens_total", 0.0)


# ---------------------------------------------------------------- greedy parity with the offline engine
def test_greedy_completion_matches_offline(client: openai.OpenAI, model: str, offline_llm: LLM) -> None:
    offline = offline_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=16))[0].outputs[0]
    full = complete(client, model=model, prompt=PROMPT, max_tokens=16, **GREEDY)
    streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=16, **GREEDY)
    choice = full.choices[0]
    assert choice.token_ids == offline.token_ids
    assert choice.text == offline.text
    assert choice.finish_reason == offline.finish_reason == "length"
    assert choice.prompt_token_ids == offline_llm.tokenizer.encode(PROMPT)
    assert full.usage.completion_tokens == 16
    assert (streamed.token_ids[0], streamed.text[0], streamed.finish_reason[0]) == (
        offline.token_ids,
        offline.text,
        "length",
    )


def test_greedy_chat_matches_offline(client: openai.OpenAI, model: str, offline_llm: LLM) -> None:
    offline = offline_llm.chat(CHAT, SamplingParams(temperature=0.0, max_tokens=12)).outputs[0]
    full = chat(client, model=model, messages=CHAT, max_tokens=12, **GREEDY)
    streamed = stream_chat(client, model=model, messages=CHAT, max_tokens=12, **GREEDY)
    choice = full.choices[0]
    assert choice.message.role == "assistant"
    assert choice.token_ids == offline.token_ids
    assert choice.message.content == offline.text
    assert choice.finish_reason == offline.finish_reason
    assert streamed.chunks[0].choices[0].delta.role == "assistant"
    assert (streamed.token_ids[0], streamed.text[0]) == (offline.token_ids, offline.text)


def test_prompt_forms(client: openai.OpenAI, model: str, http: httpx.Client, greedy: Any) -> None:
    ids = http.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    by_ids = complete(client, model=model, prompt=ids, max_tokens=4, **GREEDY).choices[0]
    assert by_ids.token_ids == greedy.token_ids[:4]
    several = complete(client, model=model, prompt=[PROMPT, "Hello"], max_tokens=4, **GREEDY)
    assert [c.index for c in several.choices] == [0, 1]
    assert several.choices[0].token_ids == greedy.token_ids[:4]


# ---------------------------------------------------------------- streaming format
def test_raw_sse_format(http: httpx.Client, model: str) -> None:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 4, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    payloads = [json.loads(line.removeprefix("data: ")) for line in events[:-1]]
    assert all(p["object"] == "text_completion" and "usage" not in p for p in payloads)


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_stream_include_usage(endpoint: str, client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    usage_options = {"stream_options": {"include_usage": True}}
    if endpoint == "chat":
        streamed = stream_chat(client, model=model, messages=CHAT, max_tokens=6, **usage_options)
        prompt_count = http.post("/tokenize", json={"messages": CHAT}).json()["count"]
    else:
        streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=6, **usage_options)
        prompt_count = http.post("/tokenize", json={"prompt": PROMPT}).json()["count"]
    last = streamed.chunks[-1]
    assert last.choices == []
    assert all(chunk.usage is None for chunk in streamed.chunks[:-1])
    assert last.usage.prompt_tokens == prompt_count
    assert last.usage.completion_tokens == len(streamed.token_ids[0])
    assert last.usage.total_tokens == prompt_count + len(streamed.token_ids[0])


def test_streamed_utf8_is_never_broken(client: openai.OpenAI, model: str) -> None:
    prompt = "Emojis: 😀 😃 😄 😁"
    full = complete(client, model=model, prompt=prompt, max_tokens=12, **GREEDY).choices[0]
    streamed = stream_completion(client, model=model, prompt=prompt, max_tokens=12, **GREEDY)
    assert not full.text.isascii()
    assert streamed.text[0] == full.text
    assert all("\ufffd" not in piece for piece in streamed.pieces)


def test_held_back_text_sends_no_empty_chunks(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    """A token that ends inside a character (an emoji spans several byte tokens) has no text of its own yet: its
    empty chunk is not sent (as vLLM does), and the text still arrives whole."""
    body = {"model": model, "prompt": "Emojis: 😀 😃 😄 😁", "max_tokens": 12, **GREEDY}
    full = complete(client, **body).choices[0].text
    assert not full.isascii()
    with http.stream("POST", "/v1/completions", json=body | {"stream": True}) as response:
        events = [line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")]
    choices = [json.loads(event)["choices"][0] for event in events[:-1]]
    assert all(choice["text"] or choice["finish_reason"] for choice in choices), choices
    assert "".join(choice["text"] for choice in choices) == full


# ---------------------------------------------------------------- stopping
def test_stop_string_spanning_tokens_never_leaks(
    client: openai.OpenAI, model: str, greedy: Any, offline_llm: LLM
) -> None:
    decode = offline_llm.tokenizer.decode
    text = greedy.text
    boundaries = [len(decode(greedy.token_ids[:i])) for i in range(3, len(greedy.token_ids))]
    # Two characters each side of a token boundary, found first exactly there: the stop must span two tokens.
    start, stop = next(
        (b - 2, text[b - 2 : b + 2])
        for b in boundaries
        if text[b - 2 : b + 2].strip() and len(text[b - 2 : b + 2]) == 4 and text.find(text[b - 2 : b + 2]) == b - 2
    )
    expected = text[:start]
    full = complete(client, model=model, prompt=PROMPT, max_tokens=24, stop=[stop], **GREEDY).choices[0]
    streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=24, stop=stop, **GREEDY)
    assert (full.text, full.finish_reason, full.stop_reason) == (expected, "stop", stop)
    assert (streamed.text[0], streamed.finish_reason[0], streamed.stop_reason[0]) == (expected, "stop", stop)


def test_stop_token_ids(client: openai.OpenAI, model: str, greedy: Any, offline_llm: LLM) -> None:
    target = greedy.token_ids[5]
    end = greedy.token_ids.index(target)
    choice = complete(
        client, model=model, prompt=PROMPT, max_tokens=24, extra_body={"stop_token_ids": [target]}, **GREEDY
    ).choices[0]
    assert choice.token_ids == greedy.token_ids[: end + 1]
    assert choice.text == offline_llm.tokenizer.decode(greedy.token_ids[:end])
    assert (choice.finish_reason, choice.stop_reason) == ("stop", target)


def test_eos_finishes_with_stop_and_ignore_eos_runs_on(client: openai.OpenAI, model: str) -> None:
    natural = chat(client, model=model, messages=GREETING, max_tokens=64, **GREEDY)
    assert (natural.choices[0].finish_reason, natural.choices[0].stop_reason) == ("stop", None)
    length = natural.usage.completion_tokens + 3
    forced = chat(client, model=model, messages=GREETING, max_tokens=length, extra_body={"ignore_eos": True}, **GREEDY)
    assert forced.choices[0].finish_reason == "length"
    assert forced.usage.completion_tokens == length


def test_max_completion_tokens(client: openai.OpenAI, model: str) -> None:
    response = chat(client, model=model, messages=GREETING, max_completion_tokens=3, **GREEDY)
    assert response.choices[0].finish_reason == "length"
    assert response.usage.completion_tokens == 3


# ---------------------------------------------------------------- sampling
def test_seed_reproducibility(client: openai.OpenAI, model: str) -> None:
    def sample(seed: int) -> str:
        return complete(client, model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=seed).choices[0].text

    first = sample(1234)
    assert sample(1234) == first
    assert sample(4321) != first
    streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=1234)
    assert streamed.text[0] == first


@pytest.mark.parametrize(
    "filters",
    [{"top_k": 1}, {"min_p": 1.0}, {"top_p": 1e-6}],
    ids=["top_k", "min_p", "top_p"],
)
def test_filters_down_to_one_token_equal_greedy(
    filters: dict[str, float], client: openai.OpenAI, model: str, greedy: Any
) -> None:
    kwargs = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "seed": 5}
    choice = complete(client, **kwargs, extra_body=filters).choices[0]
    assert choice.token_ids == greedy.token_ids[:6]


def test_penalties_change_greedy_output(client: openai.OpenAI, model: str) -> None:
    def run(**penalties: Any) -> list[int]:
        return complete(client, model=model, prompt=COUNTING, max_tokens=8, **GREEDY, **penalties).choices[0].token_ids

    plain = run()
    assert run(frequency_penalty=2.0) != plain
    assert run(extra_body={"repetition_penalty": 1.5}) != plain
    assert len(run(presence_penalty=2.0)) == 8


def test_logit_bias(client: openai.OpenAI, model: str, greedy: Any, offline_llm: LLM) -> None:
    forced = offline_llm.tokenizer.encode(" banana")[0]
    boosted = complete(client, model=model, prompt=PROMPT, max_tokens=3, logit_bias={str(forced): 100}, **GREEDY)
    assert boosted.choices[0].token_ids == [forced] * 3
    first = greedy.token_ids[0]
    banned = complete(client, model=model, prompt=PROMPT, max_tokens=1, logit_bias={str(first): -100}, **GREEDY)
    assert banned.choices[0].token_ids != [first]


@pytest.mark.parametrize("stream", [False, True])
def test_n_choices(stream: bool, client: openai.OpenAI, model: str) -> None:
    kwargs: dict[str, Any] = {"model": model, "n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 11}
    if stream:
        completions = stream_completion(client, prompt=PROMPT, **kwargs)
        chats = stream_chat(client, messages=CHAT, **kwargs)
        assert set(completions.text) == set(chats.text) == {0, 1, 2}
        assert set(completions.finish_reason) == set(chats.finish_reason) == {0, 1, 2}
        assert len(set(completions.text.values())) > 1
    else:
        completion = complete(client, prompt=PROMPT, **kwargs)
        chat_response = chat(client, messages=CHAT, **kwargs)
        assert [c.index for c in completion.choices] == [c.index for c in chat_response.choices] == [0, 1, 2]
        assert completion.usage.completion_tokens == 18
        assert len({c.text for c in completion.choices}) > 1


# ---------------------------------------------------------------- logprobs and echo
def test_completion_logprobs(client: openai.OpenAI, model: str) -> None:
    choice = complete(client, model=model, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY).choices[0]
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 6
    assert "".join(logprobs.tokens) == choice.text
    offsets = [sum(len(t) for t in logprobs.tokens[:i]) for i in range(6)]
    assert logprobs.text_offset == offsets
    for token, logprob, top in zip(logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs):
        assert len(top) == 3
        assert logprob <= 0.0
        assert max(top.values()) == pytest.approx(logprob, abs=1e-4)  # greedy: the sampled token is the top one
        assert top[token] == pytest.approx(logprob, abs=1e-4)
    streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=6, logprobs=3, **GREEDY)
    pieces = streamed.logprobs[0]
    assert [t for p in pieces for t in p.tokens] == logprobs.tokens
    assert [o for p in pieces for o in p.text_offset] == logprobs.text_offset


def test_chat_logprobs(client: openai.OpenAI, model: str) -> None:
    response = chat(client, model=model, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=2, **GREEDY)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0.0
        assert entry.bytes == list(entry.token.encode())
        assert len(entry.top_logprobs) == 2
        assert entry.top_logprobs[0].token == entry.token
    streamed = stream_chat(client, model=model, messages=CHAT, max_tokens=6, logprobs=True, top_logprobs=2, **GREEDY)
    assert [e.token for e in streamed.logprobs[0]] == [e.token for e in content]
    without = chat(client, model=model, messages=CHAT, max_tokens=2)
    assert without.choices[0].logprobs is None


def test_echo(client: openai.OpenAI, model: str) -> None:
    plain = complete(client, model=model, prompt=PROMPT, max_tokens=4, **GREEDY).choices[0]
    full = complete(client, model=model, prompt=PROMPT, max_tokens=4, echo=True, **GREEDY).choices[0]
    assert full.text == PROMPT + plain.text
    streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=4, echo=True, **GREEDY)
    assert streamed.pieces[0] == PROMPT
    assert streamed.text[0] == PROMPT + plain.text


def test_echo_with_logprobs(client: openai.OpenAI, model: str, offline_llm: LLM) -> None:
    choice = complete(client, model=model, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, **GREEDY).choices[0]
    prompt_ids, logprobs = choice.prompt_token_ids, choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(prompt_ids) + len(choice.token_ids)
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert all(isinstance(lp, float) for lp in logprobs.token_logprobs[1:])
    assert all(len(top) == 2 for top in logprobs.top_logprobs[1:])
    assert logprobs.text_offset[len(prompt_ids)] == len(PROMPT)
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=2)
    offline = offline_llm.generate([prompt_ids], params)[0].outputs[0].prompt_logprobs
    assert offline is not None
    assert logprobs.token_logprobs[1 : len(prompt_ids)] == pytest.approx([t.logprob for t in offline], abs=1e-5)
    streamed = stream_completion(client, model=model, prompt=PROMPT, max_tokens=4, echo=True, logprobs=2, **GREEDY)
    assert streamed.text[0] == choice.text
    pieces = streamed.logprobs[0]
    assert [t for p in pieces for t in p.tokens] == logprobs.tokens
    assert [lp for p in pieces for lp in p.token_logprobs] == logprobs.token_logprobs
    assert [o for p in pieces for o in p.text_offset] == logprobs.text_offset


def assert_text_matches_tokens(text: str, logprobs: Any) -> None:
    """The legacy logprobs spell the choice's text: each token sits at its text_offset, and together they are it."""
    assert "".join(logprobs.tokens) == text
    for token, offset in zip(logprobs.tokens, logprobs.text_offset, strict=True):
        assert text[offset : offset + len(token)] == token


@pytest.mark.parametrize("skip_special_tokens", [True, False])
@pytest.mark.parametrize("logit_bias", [None, {"1": 100}], ids=["plain", "special-generated"])
def test_echo_text_tokens_and_offsets_agree(
    skip_special_tokens: bool, logit_bias: dict[str, int] | None, client: openai.OpenAI, model: str
) -> None:
    # "<|im_end|>" is a special token of the prompt; a logit bias on <|im_start|> (id 1) generates special ones.
    kwargs: dict[str, Any] = {"model": model, "prompt": "A<|im_end|>B", "max_tokens": 3, "echo": True, "logprobs": 1}
    extra_body = {"skip_special_tokens": skip_special_tokens, "ignore_eos": True}
    kwargs |= {"logit_bias": logit_bias, "extra_body": extra_body, **GREEDY}
    choice = complete(client, **kwargs).choices[0]
    assert choice.text.startswith("AB" if skip_special_tokens else "A<|im_end|>B")
    assert len(choice.logprobs.tokens) == len(choice.prompt_token_ids) + len(choice.token_ids) == 6
    assert_text_matches_tokens(choice.text, choice.logprobs)
    streamed = stream_completion(client, **kwargs)
    assert streamed.text[0] == choice.text
    pieces = streamed.logprobs[0]
    assert [t for p in pieces for t in p.tokens] == choice.logprobs.tokens
    assert [o for p in pieces for o in p.text_offset] == choice.logprobs.text_offset


@pytest.mark.parametrize("logprobs", [None, 2])
def test_echo_with_max_tokens_0_returns_the_prompt_alone(
    logprobs: int | None, client: openai.OpenAI, model: str
) -> None:
    kwargs: dict[str, Any] = {"model": model, "prompt": PROMPT, "echo": True, "logprobs": logprobs, **GREEDY}
    echoed = complete(client, max_tokens=4, **kwargs).choices[0]  # the same prompt, with generated tokens
    response = complete(client, max_tokens=0, **kwargs)
    choice = response.choices[0]
    assert (choice.text, choice.finish_reason, choice.token_ids) == (PROMPT, "length", [])
    assert (response.usage.prompt_tokens, response.usage.completion_tokens) == (len(echoed.prompt_token_ids), 0)
    if logprobs is None:
        assert choice.logprobs is None
    else:
        prompt_len = len(choice.prompt_token_ids)
        assert choice.logprobs.token_logprobs[0] is None  # nothing precedes the first token, as OpenAI returns
        for field_name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            assert getattr(choice.logprobs, field_name) == getattr(echoed.logprobs, field_name)[:prompt_len]
    streamed = stream_completion(client, max_tokens=0, stream_options={"include_usage": True}, **kwargs)
    assert (streamed.text[0], streamed.finish_reason[0], streamed.token_ids[0]) == (PROMPT, "length", [])
    assert streamed.chunks[-1].usage.completion_tokens == 0
    if logprobs is not None:
        assert [t for p in streamed.logprobs[0] for t in p.tokens] == choice.logprobs.tokens
        assert [lp for p in streamed.logprobs[0] for lp in p.token_logprobs] == choice.logprobs.token_logprobs


def test_echo_with_max_tokens_0_refuses_min_tokens(http: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_tokens": 0, "echo": True, "min_tokens": 1}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "min_tokens"
