"""A server with every guard on: API keys, tight limits, one running slot and a short queue.

Overload, priorities, the cap on requests in flight per key, per-request limits, auth on every route, prompt-free
logs, and schemathesis fuzzing every route from the server's own OpenAPI schema.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    negative_data_rejection,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_server_errors import assert_error_shape

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher, ServerProcess

pytest_plugins = ["tests.server_fixtures"]

KEYS = ("key-1", "key-2", "key-3")
MAX_IN_FLIGHT_PER_KEY = 3
MAX_WAITING = 3
MAX_PROMPT_TOKENS = 48
FLAGS = [
    "--max-model-len", "64",
    "--max-prompt-tokens", str(MAX_PROMPT_TOKENS),
    "--max-num-seqs", "1",
    "--max-waiting-requests", str(MAX_WAITING),
    "--max-concurrent-requests-per-key", str(MAX_IN_FLIGHT_PER_KEY),
    "--max-n", "2",
    "--max-stop-strings", "4",
    "--log-level", "debug",
]  # fmt: skip
SECRET = "orchid-lantern-basalt-5521"  # prompt text that must not reach the server's log
COMPLETIONS = "/v1/completions"
QUICK = 1.0  # seconds for a refusal: it waits for no model step
LONG = {"prompt": "Once upon a time", "max_tokens": 30, "ignore_eos": True, "temperature": 0.0}
SHORT = {"prompt": "Hello", "max_tokens": 3, "ignore_eos": True, "temperature": 0.0}


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def guarded(launch_server: Launcher) -> ServerProcess:
    return launch_server("guarded", FLAGS, env={"SPINDLE_API_KEY": ",".join(KEYS)}).wait_ready()


@pytest.fixture
def idle_after(guarded: ServerProcess) -> Iterator[None]:
    yield
    samples = guarded.wait_idle(timeout=30)
    assert samples["spindle:kv_cache_usage_perc"] == 0


class Stream:
    """One streaming completion held open: its status, then its events as they come."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response
        self.lines = response.aiter_lines()
        self.first_token_at: float | None = None

    async def next_event(self) -> dict[str, Any] | None:
        async for line in self.lines:
            if line == "data: [DONE]":
                return None
            if line.startswith("data: "):
                return json.loads(line[len("data: ") :])
        return None

    async def finish(self) -> tuple[str | None, int]:
        """Read to the end: the finish reason and the completion tokens of the usage event."""
        finish, tokens = None, 0
        while (event := await self.next_event()) is not None:
            assert "error" not in event, event
            for choice in event["choices"]:
                if choice["text"] and self.first_token_at is None:
                    self.first_token_at = time.monotonic()
                finish = choice["finish_reason"] or finish
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
        return finish, tokens


@asynccontextmanager
async def opened(client: httpx.AsyncClient, key: str, body: dict[str, Any]) -> AsyncIterator[Stream]:
    stream_body = body | {"stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", COMPLETIONS, json=stream_body, headers=auth(key)) as response:
        yield Stream(response)


async def wait_for_waiting(client: httpx.AsyncClient, count: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        text = (await client.get("/metrics")).text
        if f'spindle:num_requests_waiting{{model_name="SmolLM2-135M-Instruct"}} {float(count)}' in text:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"never {count} requests waiting")


# ---------------------------------------------------------------- overload
def test_past_the_queue_requests_get_503_at_once_and_admitted_ones_finish(
    guarded: ServerProcess, idle_after: None
) -> None:
    async def refused(client: httpx.AsyncClient, key: str) -> tuple[httpx.Response, float]:
        started = time.monotonic()
        response = await client.post(COMPLETIONS, json=SHORT, headers=auth(key))
        return response, time.monotonic() - started

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(base_url=guarded.url, timeout=60) as client,
            opened(client, "key-1", LONG) as running,
            opened(client, "key-1", SHORT) as waiting_1,
            opened(client, "key-2", SHORT) as waiting_2,
            opened(client, "key-2", SHORT) as waiting_3,
        ):
            admitted = [running, waiting_1, waiting_2, waiting_3]
            assert [s.response.status_code for s in admitted] == [200] * 4
            await wait_for_waiting(client, MAX_WAITING)
            keys = ("key-1", "key-2", "key-3", "key-3", "key-3")  # none past its own cap of requests in flight
            for response, seconds in await asyncio.gather(*(refused(client, key) for key in keys)):
                error = assert_error_shape(response, 503)
                assert (error["type"], error["code"]) == ("service_unavailable", "queue_full")
                assert response.headers["retry-after"] == "1"
                assert seconds < QUICK
            results = await asyncio.gather(*(s.finish() for s in admitted))
            assert results == [("length", 30), ("length", 3), ("length", 3), ("length", 3)]

    asyncio.run(scenario())


# ---------------------------------------------------------------- priorities
def test_urgent_requests_jump_the_queue_and_the_rest_still_finish(guarded: ServerProcess, idle_after: None) -> None:
    preempted = guarded.metrics()["spindle:num_preemptions_total"]

    async def scenario() -> None:
        async with (
            httpx.AsyncClient(base_url=guarded.url, timeout=60) as client,
            opened(client, "key-1", LONG) as running,
            opened(client, "key-2", SHORT) as normal_1,
            opened(client, "key-3", SHORT) as normal_2,
            opened(client, "key-1", SHORT | {"priority": -5}) as urgent,
        ):
            await wait_for_waiting(client, MAX_WAITING)
            results = await asyncio.gather(*(s.finish() for s in (running, normal_1, normal_2, urgent)))
            assert results == [("length", 30), ("length", 3), ("length", 3), ("length", 3)]
            order = sorted((normal_1, normal_2, urgent), key=lambda s: s.first_token_at or 0.0)
            assert order == [urgent, normal_1, normal_2]  # the urgent one first, then first come, first served

    asyncio.run(scenario())
    assert guarded.metrics()["spindle:num_preemptions_total"] == preempted  # the running request was never cut


# ---------------------------------------------------------------- requests in flight per key
def test_requests_in_flight_are_capped_per_key_with_429(guarded: ServerProcess, idle_after: None) -> None:
    async def scenario() -> None:
        async with httpx.AsyncClient(base_url=guarded.url, timeout=60) as client:
            async with (
                opened(client, "key-1", LONG) as running,
                opened(client, "key-1", SHORT) as second,
                opened(client, "key-1", SHORT) as third,
            ):
                assert {s.response.status_code for s in (running, second, third)} == {200}
                for method, path in (("POST", COMPLETIONS), ("GET", "/v1/models"), ("POST", "/tokenize")):
                    started = time.monotonic()
                    response = await client.request(method, path, json={"prompt": "Hi"}, headers=auth("key-1"))
                    error = assert_error_shape(response, 429)
                    assert (error["type"], error["code"]) == ("rate_limit_error", "rate_limit_exceeded")
                    assert response.headers["retry-after"] == "1"
                    assert time.monotonic() - started < QUICK
                other_key = await client.post("/tokenize", json={"prompt": "Hi"}, headers=auth("key-2"))
                assert other_key.status_code == 200  # another key is not held back
            deadline = time.monotonic() + 5  # the server learns of the closed streams asynchronously
            while (await client.get("/v1/models", headers=auth("key-1"))).status_code == 429:
                assert time.monotonic() < deadline, "the key's requests in flight were never released"
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


# ---------------------------------------------------------------- per-request limits
@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"n": 3}, "n"),
        ({"n": 2, "prompt": ["a", "b"]}, "n"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"prompt": [1000] * (MAX_PROMPT_TOKENS + 1)}, "prompt"),
        ({"prompt": "word " * 200}, "prompt"),
    ],
    ids=["n", "n-times-prompts", "stop-strings", "prompt-tokens", "prompt-text"],
)
def test_configured_limits_are_400(fields: dict[str, Any], param: str, guarded: ServerProcess) -> None:
    body = {"prompt": "Hello", "max_tokens": 2} | fields
    error = assert_error_shape(httpx.post(f"{guarded.url}{COMPLETIONS}", json=body, headers=auth("key-1")), 400)
    assert error["param"] == param


def test_within_the_limits_is_served(guarded: ServerProcess) -> None:
    body = {"prompt": [1000] * MAX_PROMPT_TOKENS, "max_tokens": 2, "n": 2, "stop": ["a", "b", "c", "d"]}
    response = httpx.post(f"{guarded.url}{COMPLETIONS}", json=body, headers=auth("key-1"), timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["choices"]) == 2


def test_megabytes_of_prompt_text_are_refused_without_tokenizing(guarded: ServerProcess) -> None:
    text = "lorem ipsum dolor sit amet " * 40_000  # about 1 MiB: tokenizing it would hold the GIL for a second
    for path, body in (
        (COMPLETIONS, {"prompt": text}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}),
        ("/tokenize", {"prompt": text}),
    ):
        started = time.monotonic()
        error = assert_error_shape(httpx.post(f"{guarded.url}{path}", json=body, headers=auth("key-2")), 400)
        assert time.monotonic() - started < 0.5
        assert error["code"] == "context_length_exceeded"


# ---------------------------------------------------------------- auth
def test_every_api_path_of_the_schema_requires_a_key(guarded: ServerProcess) -> None:
    schema = httpx.get(f"{guarded.url}/openapi.json").json()
    api_paths = {path for path in schema["paths"] if path.startswith(("/v1", "/tokenize", "/detokenize"))}
    assert set(schema["paths"]) - api_paths == {"/health", "/metrics", "/version"}
    for path in api_paths:
        for method in schema["paths"][path]:
            for headers in ({}, auth("key-4"), {"Authorization": "key-1"}, {"Authorization": "Basic key-1"}):
                response = httpx.request(method, f"{guarded.url}{path}", headers=headers, json={})
                assert response.status_code == 401, (method, path, headers)
                assert response.headers["www-authenticate"] == "Bearer"


# ---------------------------------------------------------------- fuzzing
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    negative_data_rejection,
]


OPERATIONS = [
    ("POST", "/v1/completions"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/responses"),
    ("GET", "/v1/responses/{response_id}"),
    ("DELETE", "/v1/responses/{response_id}"),
    ("GET", "/v1/models"),
    ("GET", "/v1/models/{model}"),
    ("POST", "/tokenize"),
    ("POST", "/detokenize"),
    ("GET", "/health"),
    ("GET", "/version"),
    ("GET", "/metrics"),
]
# Schema-valid requests to every route; invalid ones where there is something to get wrong (a body).
FUZZED = [(m, p, GenerationMode.POSITIVE) for m, p in OPERATIONS] + [
    (m, p, GenerationMode.NEGATIVE) for m, p in OPERATIONS if m == "POST"
]
FUZZED_IDS = [f"{m} {p} {mode.value}" for m, p, mode in FUZZED]


@pytest.fixture(scope="module")
def api_schema(guarded: ServerProcess) -> Any:
    return schemathesis.openapi.from_url(f"{guarded.url}/openapi.json")


@pytest.fixture(scope="module")
def event_validators(guarded: ServerProcess) -> dict[str, Draft202012Validator]:
    """By path, a validator of the JSON each server-sent event carries, as the server's own schema describes it.

    Schemathesis checks each event's shape, but not the JSON in its data (``contentSchema``): these do. A stream
    whose events are named (the Responses API's) has no ``[DONE]`` among its data.
    """
    document = httpx.get(f"{guarded.url}/openapi.json").json()
    validators = {}
    for path, operations in document["paths"].items():
        for operation in operations.values():
            stream = operation["responses"].get("200", {}).get("content", {}).get("text/event-stream")
            if stream is not None:
                event = stream["schema"]["properties"]
                data = event["data"] if "event" in event else event["data"]["anyOf"][1]
                validators[path] = Draft202012Validator(data["contentSchema"] | {"components": document["components"]})
    assert set(validators) == {"/v1/completions", "/v1/chat/completions", "/v1/responses"}
    return validators


def check_events(response: Any, validator: Draft202012Validator) -> None:
    lines = response.content.decode().splitlines()
    data = [line[len("data: ") :] for line in lines if line.startswith("data: ")]
    if not lines[0].startswith("event: "):
        assert data.pop() == "[DONE]"
    for payload in data:
        validator.validate(json.loads(payload))


# Fields whose schema-valid values are rarely refused: a request keeping only these (and a short output) gets past
# validation most of the time, so that successful responses and streams are checked too.
STEERED_FIELDS = {
    "prompt", "messages", "stream", "stream_options", "echo", "logprobs", "top_logprobs", "return_token_ids",
    "ignore_eos", "skip_special_tokens", "include_stop_str_in_output", "user", "priority", "seed",
    "add_generation_prompt", "input", "store",
}  # fmt: skip


def steered(case: Any, stream: bool) -> Any:
    def short(text: object) -> str:  # a prompt that fits the context
        return text[:12] if isinstance(text, str) and text.strip() else "Hello"

    limit = {"max_output_tokens": 4} if "input" in case.body else {"max_tokens": 4}
    body = {k: v for k, v in case.body.items() if k in STEERED_FIELDS} | limit | {"stream": stream}
    if "prompt" in body:
        body["prompt"] = short(body["prompt"])
    if "input" in body:
        body["input"] = short(body["input"])
    if "messages" in body:
        body["messages"] = [{"role": "user", "content": short(m.get("content"))} for m in body["messages"][:2]]
    case.body = body
    return case


def fuzz(api_schema: Any, validators: dict[str, Any], method: str, path: str, mode: GenerationMode, n: int) -> None:
    """Send ``n`` generated requests (schema-valid or not, by ``mode``); check each response.

    Half the schema-valid requests to the generation routes are steered past the server's own validation.
    """
    strategy = api_schema[path][method].as_strategy(mode)
    if path in validators and mode is GenerationMode.POSITIVE:
        strategy = st.one_of(strategy, st.builds(steered, strategy, st.booleans()))

    @given(case=strategy)
    @settings(max_examples=n, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    def run(case: Any) -> None:
        response = case.call(headers=auth("key-3"), timeout=30)
        case.validate_response(response, checks=CHECKS)
        if (
            response.status_code == 200
            and path in validators
            and response.headers["content-type"][0].startswith("text/event-stream")
        ):
            check_events(response, validators[path])

    run()


def test_the_schema_lists_every_route(api_schema: Any) -> None:
    listed = {(op.ok().method.upper(), op.ok().path) for op in api_schema.get_all_operations()}
    assert listed == set(OPERATIONS)


@pytest.mark.parametrize(("method", "path", "mode"), FUZZED, ids=FUZZED_IDS)
def test_fuzzed_requests_get_no_5xx_and_match_the_schema(
    method: str, path: str, mode: GenerationMode, api_schema: Any, event_validators: dict[str, Any]
) -> None:
    fuzz(api_schema, event_validators, method, path, mode, n=8)


@pytest.mark.slow
@pytest.mark.parametrize(("method", "path", "mode"), FUZZED, ids=FUZZED_IDS)
def test_fuzzed_requests_at_length(
    method: str, path: str, mode: GenerationMode, api_schema: Any, event_validators: dict[str, Any]
) -> None:
    fuzz(api_schema, event_validators, method, path, mode, n=200)


# ---------------------------------------------------------------- logs (last: it reads what the module sent)
def test_no_prompt_text_in_the_server_log(guarded: ServerProcess) -> None:
    with httpx.Client(base_url=guarded.url, headers=auth("key-1"), timeout=60) as client:
        assert client.post(COMPLETIONS, json={"prompt": SECRET, "max_tokens": 2}).status_code == 200
        chat = {"messages": [{"role": "user", "content": SECRET}], "max_tokens": 2}
        assert client.post("/v1/chat/completions", json=chat).status_code == 200
        assert client.post(COMPLETIONS, json={"prompt": SECRET, "temperature": -1}).status_code == 400
        assert client.post("/tokenize", json={"prompt": SECRET}).status_code == 200
    log = guarded.log.read_text(errors="replace")
    assert "POST /v1/completions" in log  # the log is there, at debug level...
    assert SECRET not in log  # ...and holds no prompt text
