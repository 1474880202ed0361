"""The app in-process around engines that are not serving: /health, fast 503s, auth and draining."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from engine.async_engine import AsyncEngine, EngineDeadError
from engine.config import build_config
from engine.sampling_params import SamplingParams
from server.app import create_app
from server.metrics import EngineMetrics

if TYPE_CHECKING:
    from engine.llm import LLM
    from engine.llm_engine import LLMEngine

pytest_plugins = ["tests.server_fixtures"]

KEY = "test-key"
COMPLETION = {"prompt": "Hello", "max_tokens": 2}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


class BrokenEngine:
    """Just enough of LLMEngine for the app, with an engine loop that fails at once."""

    def __init__(self, real: LLMEngine) -> None:
        self.tokenizer = real.tokenizer
        self.model_name = real.model_name
        self.max_model_len = real.max_model_len
        self.grammars = real.grammars

    def has_unfinished_requests(self) -> bool:
        raise RuntimeError("simulated engine failure")


def make_app(engine: AsyncEngine, **server_fields: Any) -> FastAPI:
    return create_app(engine, build_config("fp32", server_fields), EngineMetrics(engine.model_name))


def wait_until_stopped(engine: AsyncEngine) -> None:
    engine.start()
    engine.stop(timeout=10)
    assert not engine.is_running


@pytest.fixture(autouse=True)
def _no_key_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SPINDLE_API_KEY", raising=False)


@pytest.fixture(scope="module")
def stopped(offline_llm: LLM) -> AsyncEngine:
    engine = AsyncEngine(offline_llm.engine)
    wait_until_stopped(engine)
    return engine


@pytest.fixture
def broken(offline_llm: LLM) -> Iterator[AsyncEngine]:
    engine = AsyncEngine(BrokenEngine(offline_llm.engine))  # type: ignore[arg-type]
    wait_until_stopped(engine)
    yield engine


@pytest.mark.parametrize("engine_state", ["stopped", "broken"])
def test_health_is_503_and_requests_fail_fast(engine_state: str, request: pytest.FixtureRequest) -> None:
    engine: AsyncEngine = request.getfixturevalue(engine_state)
    with TestClient(make_app(engine)) as client:
        health = client.get("/health")
        assert health.status_code == 503
        expected = "simulated engine failure" if engine_state == "broken" else "stopped"
        assert expected in health.json()["error"]["message"]
        for path, body in (("/v1/completions", COMPLETION), ("/v1/chat/completions", CHAT)):
            for stream in (False, True):
                started = time.monotonic()
                response = client.post(path, json=body | {"stream": stream})
                assert time.monotonic() - started < 1.0
                assert response.status_code == 503
                assert response.headers["retry-after"]
                assert response.json()["error"]["code"] == "engine_unavailable"
        assert client.get("/v1/models").status_code == 200  # what needs no engine still works


def test_api_key_protects_the_api_but_not_health_by_default(stopped: AsyncEngine) -> None:
    with TestClient(make_app(stopped, api_key=KEY)) as client:
        for path in ("/v1/models", "/v1/completions", "/tokenize", "/detokenize", "/v1/no-such-route"):
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
                response = client.request("GET" if path.endswith("models") else "POST", path, headers=headers)
                assert response.status_code == 401, (path, headers)
                assert response.json()["error"]["code"] == "invalid_api_key"
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.post("/tokenize", json={"prompt": "Hi"}, headers=good).status_code == 200
        assert client.get("/health").status_code == 503  # open, and the engine is stopped
        assert client.get("/metrics").status_code == 200
        assert client.get("/version").status_code == 200


def test_api_key_can_protect_health_and_metrics(stopped: AsyncEngine) -> None:
    with TestClient(make_app(stopped, api_key=KEY, auth_health_and_metrics=True)) as client:
        assert client.get("/health").status_code == 401
        assert client.get("/metrics").status_code == 401
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/health", headers=good).status_code == 503
        assert client.get("/metrics", headers=good).status_code == 200


def test_drain_refuses_new_requests_and_aborts_running_ones_after_the_grace(offline_llm: LLM) -> None:
    engine = AsyncEngine(offline_llm.engine)
    params = SamplingParams(temperature=0.0, max_tokens=1000, ignore_eos=True)

    async def scenario() -> float:
        stream = await engine.add_request("long", offline_llm.tokenizer.encode("Once upon a time"), params)
        async with stream:
            await stream.__anext__()  # running
            engine.drain(grace=0.5)
            assert not engine.is_running
            with pytest.raises(EngineDeadError, match="shutting down"):
                await engine.add_request("late", [1, 2, 3], params)
            started = time.monotonic()
            with pytest.raises(EngineDeadError, match="shutting down"):
                async for _ in stream:
                    pass
            return time.monotonic() - started

    engine.start()
    try:
        assert asyncio.run(scenario()) < 5.0
    finally:
        engine.stop(timeout=10)
    assert not offline_llm.engine.has_unfinished_requests()
