"""Faults in-process around the real engine: a request that fails, an engine loop that dies, priorities that age,
and what auth and logging do with keys and prompts."""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import pytest
from fastapi.routing import APIRoute
from fastapi.testclient import TestClient

import server.app
from engine.async_engine import AsyncEngine, aged_priority
from engine.config import ServerConfig, build_config
from engine.sampling_params import SamplingParams
from engine.structured import StructuredOutputs
from scheduler.output import SchedulerOutput
from scheduler.request import Request
from scheduler.waiting_queue import WaitingQueue
from tests.test_server_app import make_app
from tests.test_structured import late_failing_grammar

if TYPE_CHECKING:
    from fastapi import FastAPI

    from engine.llm import LLM
    from engine.outputs import RequestOutput
    from engine.sampler import SamplingRow

pytest_plugins = ["tests.server_fixtures"]

POISON_SEED = 666_666  # marks the request whose sampling fails
SECRET = "zebra-violet-quartz-7319"  # prompt text that must not reach the logs
COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
POISONED = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.8, "seed": POISON_SEED}


class PoisonedSampler:
    """The real sampler, failing any batch that holds the poisoned request: a logits error of one request."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __call__(self, logits: Any, rows: list[SamplingRow], *args: Any, **kwargs: Any) -> Any:
        if any(row.params.seed == POISON_SEED for row in rows):
            raise RuntimeError("NaN in the logits")
        return self.real(logits, rows, *args, **kwargs)


@pytest.fixture(autouse=True)
def _no_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPINDLE_API_KEY", raising=False)


@pytest.fixture
def poisoned(offline_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    runner = offline_llm.engine.runner
    monkeypatch.setattr(runner, "sampler", PoisonedSampler(runner.sampler))


@pytest.fixture
def engine(offline_llm: LLM) -> Iterator[AsyncEngine]:
    async_engine = AsyncEngine(offline_llm.engine)
    async_engine.start()
    yield async_engine
    async_engine.stop(timeout=10)
    assert not offline_llm.engine.has_unfinished_requests()  # the shared engine is left clean for other tests


def asgi_client(app: FastAPI) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://spindle", timeout=30)


def sse_payloads(text: str) -> list[Any]:
    return [line[len("data: ") :] for line in text.splitlines() if line.startswith("data: ")]


# ---------------------------------------------------------------- one request fails
def test_a_failing_request_gets_an_error_and_the_engine_serves_on(
    engine: AsyncEngine, poisoned: None, offline_llm: LLM
) -> None:
    app = make_app(engine)

    async def scenario() -> None:
        async with asgi_client(app) as client:
            failed = await client.post(COMPLETIONS, json=POISONED)
            assert failed.status_code == 500
            error = failed.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "generation_error")
            assert "NaN in the logits" in error["message"]
            streamed = await client.post(
                CHAT, json={"messages": [{"role": "user", "content": "Hi"}], "stream": True} | POISONED
            )
            assert streamed.status_code == 200  # the failure came after the stream started: reported in-band
            events = sse_payloads(streamed.text)
            assert events[-1] == "[DONE]"
            assert "NaN in the logits" in json.loads(events[-2])["error"]["message"]
            fine = await client.post(COMPLETIONS, json={"prompt": "Once upon a time", "max_tokens": 4})
            assert fine.status_code == 200 and fine.json()["usage"]["completion_tokens"] == 4
            assert (await client.get("/health")).status_code == 200

    asyncio.run(scenario())
    assert engine.is_running
    stats = offline_llm.engine.stats()
    assert stats.num_free_blocks == stats.num_blocks  # the failed requests' blocks are back in the pool


def test_a_failing_request_does_not_fail_the_requests_batched_with_it(engine: AsyncEngine, poisoned: None) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    prompt = engine.tokenizer.encode("Once upon a time")

    async def run(request_id: str, request_params: SamplingParams) -> str | None:
        finish = None
        async for output in engine.generate(request_id, prompt, request_params):
            finish = output.finish_reason
        return finish

    async def scenario() -> list[str | None]:
        others = [asyncio.create_task(run(f"other-{i}", params)) for i in range(3)]
        await asyncio.sleep(0.3)  # the others are decoding when the poisoned request joins their batch
        poison = SamplingParams(temperature=0.8, seed=POISON_SEED, max_tokens=4)
        return await asyncio.gather(run("poisoned", poison), *others)

    assert asyncio.run(scenario()) == ["error", "length", "length", "length"]


def test_a_request_whose_output_fails_is_failed_alone(offline_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Output processing (detokenising) raising for one request errors that request; its batch mates match the
    tokens they get when run alone, and every block returns to the pool."""
    llm_engine = offline_llm.engine
    prompt = llm_engine.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = offline_llm.generate([prompt], params)[0].outputs[0].token_ids
    for request_id in ("a", "broken", "b"):
        llm_engine.add_request(request_id, prompt, params)

    def fail(*args: Any) -> Any:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr(llm_engine._states["broken"].detokenizer, "update", fail)
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    finished: dict[str, tuple[str | None, str | None]] = {}
    while llm_engine.has_unfinished_requests():
        for output in llm_engine.step():
            if output.request_id in tokens:
                tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finished[output.request_id] = (output.finish_reason, output.error)
    assert finished["broken"][0] == "error" and "output processing failed" in (finished["broken"][1] or "")
    assert finished["a"] == finished["b"] == ("length", None)
    assert tokens == {"a": alone, "b": alone}
    stats = llm_engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_a_grammar_failing_mid_output_fails_its_request_without_rerunning_the_step(
    offline_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A grammar that llguidance compiles but that fails on the token its request samples fails that request alone,
    as the request's own error: its batch mates get the tokens they get alone, and each step runs the model once (no
    bisection of the batch to find the failing request)."""
    llm_engine = offline_llm.engine
    tokenizer = llm_engine.tokenizer
    prompt = tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    alone = offline_llm.generate([prompt], params)[0].outputs[0].token_ids
    b = tokenizer.encode("b", add_special_tokens=False)[0]
    grammar = StructuredOutputs("grammar", late_failing_grammar())
    bad = SamplingParams(temperature=0.0, max_tokens=6, logit_bias={b: 100.0}, structured_outputs=grammar)
    for request_id, request_params in (("a", params), ("bad", bad), ("b", params)):
        llm_engine.add_request(request_id, prompt, request_params)
    runs: list[list[str]] = []
    real_execute = llm_engine.runner.execute

    def execute(output: SchedulerOutput, *args: Any) -> Any:
        runs.append([item.request_id for item in output.scheduled])
        return real_execute(output, *args)

    monkeypatch.setattr(llm_engine.runner, "execute", execute)
    reruns = llm_engine.counters.step_reruns
    tokens: dict[str, list[int]] = {"a": [], "b": []}
    finished: dict[str, RequestOutput] = {}
    while llm_engine.has_unfinished_requests():
        ran = len(runs)
        for output in llm_engine.step():
            if output.request_id in tokens:
                tokens[output.request_id].extend(output.new_token_ids)
            if output.finished:
                finished[output.request_id] = output
        assert len(runs) - ran <= 1  # the step's batch ran once
    assert sorted(runs[0]) == ["a", "b", "bad"]  # the failing request shared its batch
    assert llm_engine.counters.step_reruns == reruns
    failed = finished["bad"]
    assert (failed.finish_reason, failed.error_param, failed.new_token_ids) == ("error", "structured_outputs", [])
    assert "Current row has 2002 items" in (failed.error or "") and "<state>" not in (failed.error or "")
    assert [(finished[r].finish_reason, finished[r].error) for r in "ab"] == [("length", None)] * 2
    assert tokens == {"a": alone, "b": alone}
    stats = llm_engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


def test_fifty_thousand_choices_are_400_at_once(engine: AsyncEngine) -> None:
    """Refused before compiling (which would take seconds) or running (where it would fail)."""
    app = make_app(engine)
    body = {"prompt": "A colour:", "max_tokens": 4, "guided_choice": [f"option {i}" for i in range(50_000)]}

    async def scenario() -> httpx.Response:
        async with asgi_client(app) as client:
            return await client.post(COMPLETIONS, json=body)

    started = time.monotonic()
    response = asyncio.run(scenario())
    assert time.monotonic() - started < 2.0
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "guided_choice")
    assert "at most 1999 options" in error["message"] and "50000" in error["message"]


# ---------------------------------------------------------------- the engine loop dies
def test_a_dying_engine_loop_fails_running_and_waiting_requests_and_refuses_new_ones(
    offline_llm: LLM, monkeypatch: pytest.MonkeyPatch
) -> None:
    llm_engine = offline_llm.engine
    # One running slot, so that the other requests wait in the queue when the loop dies.
    monkeypatch.setattr(
        llm_engine.scheduler, "config", dataclasses.replace(llm_engine.scheduler.config, max_num_seqs=1)
    )
    armed = False
    real_step = llm_engine.step

    def step() -> Any:
        if armed:
            raise RuntimeError("simulated engine crash")
        return real_step()

    monkeypatch.setattr(llm_engine, "step", step)
    engine = AsyncEngine(llm_engine)
    app = make_app(engine)
    engine.start()
    long_body = {"prompt": "Once upon a time", "max_tokens": 500, "ignore_eos": True}

    async def scenario() -> None:
        nonlocal armed
        async with asgi_client(app) as client:
            in_flight = [asyncio.create_task(client.post(COMPLETIONS, json=long_body)) for _ in range(3)]
            in_flight.append(asyncio.create_task(client.post(COMPLETIONS, json=long_body | {"stream": True})))
            while (llm_engine.stats().num_running, llm_engine.stats().num_waiting) != (1, 3):
                await asyncio.sleep(0.05)
            armed = True
            died = time.monotonic()
            responses = await asyncio.wait_for(asyncio.gather(*in_flight), timeout=10)
            assert time.monotonic() - died < 3.0  # nothing waits on a dead loop
            for response in responses[:3]:
                assert response.status_code == 503
                assert response.json()["error"]["code"] == "engine_unavailable"
            events = sse_payloads(responses[3].text)
            assert events[-1] == "[DONE]" and "simulated engine crash" in events[-2]
            health = await client.get("/health")
            assert health.status_code == 503 and "simulated engine crash" in health.json()["error"]["message"]
            for body in ({"prompt": "Hi"}, {"prompt": "Hi", "stream": True}):
                started = time.monotonic()
                refused = await client.post(COMPLETIONS, json=body)
                assert time.monotonic() - started < 1.0
                assert refused.status_code == 503 and refused.headers["retry-after"]

    try:
        asyncio.run(scenario())
    finally:
        engine.stop(timeout=10)
    assert not llm_engine.has_unfinished_requests()  # the dying loop freed what it held
    stats = llm_engine.stats()
    assert stats.num_free_blocks == stats.num_blocks


# ---------------------------------------------------------------- the loop in the caller's thread
def test_the_engine_loop_runs_in_the_callers_thread_until_stopped_from_another(offline_llm: LLM) -> None:
    stepped_in: set[threading.Thread] = set()
    async_engine = AsyncEngine(offline_llm.engine, observer=lambda *_: stepped_in.add(threading.current_thread()))
    params = SamplingParams(temperature=0.0, max_tokens=6)
    prompt = offline_llm.tokenizer.encode("The capital of France is")
    served: list[int] = []

    async def client() -> None:
        async for output in async_engine.generate("caller-thread", prompt, params):
            served.extend(output.new_token_ids)

    def call_then_stop() -> None:
        try:
            asyncio.run(client())
        finally:
            async_engine.stop()

    caller = threading.Thread(target=call_then_stop)
    caller.start()
    async_engine.run()  # returns once the other thread stopped the loop
    caller.join(timeout=10)
    assert served == offline_llm.generate([prompt], params)[0].outputs[0].token_ids
    assert len(served) == params.max_tokens
    assert stepped_in == {threading.current_thread()}
    assert not async_engine.is_running
    async_engine.start()  # a no-op: the loop cannot be restarted
    assert not async_engine.is_running
    with pytest.raises(RuntimeError, match="already started"):
        async_engine.run()


# ---------------------------------------------------------------- priorities
def admission_order(arrivals: list[tuple[str, float, int]], aging_seconds: float) -> list[str]:
    """The order the scheduler's own waiting queue admits requests queued at ``(name, arrival, priority)``."""
    queue = WaitingQueue()
    for name, arrival, priority in arrivals:
        queue.push(
            Request(
                name, [1], max_tokens=1, arrival_time=arrival, priority=aged_priority(priority, arrival, aging_seconds)
            )
        )
    return [queue.pop().request_id for _ in range(len(queue))]


def test_urgent_requests_jump_the_queue_but_cannot_starve_the_rest() -> None:
    start = 1000.0
    # A request of priority 1 arrives, then a steady stream of more urgent ones (priority 0), two a second.
    arrivals = [("patient", start, 1)] + [(f"urgent-{i}", start + 0.5 * (i + 1), 0) for i in range(120)]
    strict = admission_order(arrivals, aging_seconds=0)
    assert strict[-1] == "patient"  # strict priority: it waits as long as urgent requests keep coming
    aged = admission_order(arrivals, aging_seconds=10)
    overtook = aged[: aged.index("patient")]
    assert overtook and all(name.startswith("urgent") for name in overtook)  # urgent ones still jump ahead...
    latest = max(start + 0.5 * (int(name.split("-")[1]) + 1) for name in overtook)
    assert latest - start <= 2 * 10  # ...but only those arriving within about one aging step of it
    ties = admission_order([("first", start, 0), ("second", start + 1, 0), ("third", start + 25, 0)], 10)
    assert ties == ["first", "second", "third"]  # equal priorities stay first come, first served


def test_the_server_queues_by_aged_priority(offline_llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(server.app, "LLMEngine", lambda config: offline_llm.engine)
    _, engine = server.app.build_server(build_config("fp32", {"priority_aging_seconds": 5.0}))
    engine.start()
    prompt = offline_llm.tokenizer.encode("Hello")

    async def scenario() -> tuple[float, int, float]:
        before = time.monotonic()
        params = SamplingParams(max_tokens=50, ignore_eos=True)  # still queued or running when looked up
        stream = await engine.add_request("aged", prompt, params, priority=-3)
        queued = offline_llm.engine.scheduler.get_request("aged")
        async with stream:
            return before, queued.priority, time.monotonic()

    try:
        before, priority, after = asyncio.run(scenario())
    finally:
        engine.stop(timeout=10)
    assert aged_priority(-3, before, 5.0) <= priority <= aged_priority(-3, after, 5.0)


# ---------------------------------------------------------------- auth
ROUTES_OPEN_WITHOUT_A_KEY = {
    "/health",
    "/metrics",
    "/version",
    "/openapi.json",
    "/docs",
    "/docs/oauth2-redirect",
    "/redoc",
}


def test_no_api_route_answers_without_the_key(engine: AsyncEngine) -> None:
    app = make_app(engine, api_key="key-a,key-b")
    api_routes = [r for r in app.routes if isinstance(r, APIRoute) and r.path not in ROUTES_OPEN_WITHOUT_A_KEY]
    # Every route is either an API route (checked below) or one of the few that are open by design.
    assert {r.path for r in app.routes} - {r.path for r in api_routes} <= ROUTES_OPEN_WITHOUT_A_KEY
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize"} <= {
        r.path for r in api_routes
    }
    with TestClient(app) as client:
        for route in api_routes:
            for method in [*sorted(route.methods), "OPTIONS"]:
                for path in (route.path, route.path + "/", route.path.upper() if route.path.startswith("/v1") else ""):
                    if not path:
                        continue
                    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "key-a"}):
                        response = client.request(method, path, headers=headers, json={})
                        assert response.status_code in (401, 404), (method, path, headers)
                        assert response.status_code == 401 or not path.startswith(("/v1", "/tokenize", "/detokenize"))
        for key in ("key-a", "key-b"):
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def test_keys_are_compared_in_constant_time_every_one(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    with TestClient(make_app(engine, api_key="key-a,key-b")) as client:
        for token, status in (("key-a", 200), ("key-b", 200), ("key-c", 401)):
            calls.clear()
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == status
            assert calls == [(token.encode(), b"key-a"), (token.encode(), b"key-b")]  # no early exit on a match


# ---------------------------------------------------------------- logs
@pytest.mark.parametrize("log_prompts", [False, True])
def test_prompts_reach_the_logs_only_when_asked(
    log_prompts: bool, engine: AsyncEngine, poisoned: None, caplog: pytest.LogCaptureFixture
) -> None:
    app = make_app(engine, log_prompts=log_prompts)
    caplog.set_level(logging.DEBUG)

    async def scenario() -> list[int]:
        async with asgi_client(app) as client:
            requests = [
                client.post(COMPLETIONS, json={"prompt": f"Say {SECRET}", "max_tokens": 2}),
                client.post(CHAT, json={"messages": [{"role": "user", "content": SECRET}], "max_tokens": 2}),
                client.post(COMPLETIONS, json={"prompt": SECRET, "temperature": -1}),  # refused
                client.post(COMPLETIONS, json=POISONED | {"prompt": SECRET}),  # fails in the engine
                client.post(CHAT, json={"messages": [{"role": "wizard", "content": SECRET}]}),  # invalid
            ]
            return [(await request).status_code for request in requests]

    assert asyncio.run(scenario()) == [200, 200, 400, 500, 400]
    assert "NaN in the logits" in caplog.text  # the failure itself is logged...
    assert (SECRET in caplog.text) is log_prompts  # ...the prompt only when asked for


# ---------------------------------------------------------------- configuration
@pytest.mark.parametrize(
    "fields",
    [
        {"max_n": 0},
        {"max_stop_strings": -1},
        {"max_prompt_tokens": 0},
        {"max_concurrent_requests_per_key": 0},
        {"priority_aging_seconds": -1.0},
        {"priority_aging_seconds": float("nan")},
        {"max_request_body_bytes": 0},
        {"api_key": " , "},
    ],
)
def test_limits_are_validated(fields: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match=next(iter(fields))):
        ServerConfig(**fields)
    assert ServerConfig(api_key="a, b").api_keys == ["a", "b"]
