"""SIGTERM on a real server: while in-flight streams drain, the server still listens, and answers new connections
with 503 until they are done; then it exits 0."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import pytest

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher, ServerProcess

pytest_plugins = ["tests.server_fixtures"]

SHUTDOWN_TIMEOUT = 20.0
STREAM = {"prompt": "Once upon a time", "ignore_eos": True, "stream": True}
SHORT = STREAM | {"max_tokens": 8}  # finishes within the shutdown timeout
# Keeps the drain going until the shutdown timeout cuts it, however fast the CPU: at even 3 ms a token it would
# still be running after the timeout.
LONG = STREAM | {"max_tokens": 8000}
LONG_CONTEXT = ["--max-model-len", "8192", "--kv-cache-memory", "1GiB"]


@pytest.fixture
def doomed(launch_server: Launcher) -> ServerProcess:
    return launch_server("drain", ["--shutdown-timeout", str(SHUTDOWN_TIMEOUT), *LONG_CONTEXT]).wait_ready()


def events(response: httpx.Response) -> Iterator[str]:
    return (line for line in response.iter_lines() if line.startswith("data: "))


def health_turns_503(server: ServerProcess, within: float = 10.0) -> httpx.Response:
    """/health on a new connection each time until it answers 503; a refused connection fails the test."""
    deadline = time.monotonic() + within
    while True:
        response = httpx.get(f"{server.url}/health", timeout=10)
        if response.status_code == 503 or time.monotonic() > deadline:
            return response
        time.sleep(0.05)


def test_sigterm_keeps_listening_with_503s_until_in_flight_streams_finish(doomed: ServerProcess) -> None:
    with (
        httpx.Client(base_url=doomed.url, timeout=120) as streams,
        streams.stream("POST", "/v1/completions", json=SHORT) as short,
        streams.stream("POST", "/v1/completions", json=LONG) as long,
    ):
        short_events, long_events = events(short), events(long)
        next(short_events)
        next(long_events)  # both running
        os.kill(doomed.process.pid, signal.SIGTERM)

        health = health_turns_503(doomed)
        assert health.status_code == 503
        assert "shutting down" in health.json()["error"]["message"]
        for method, path, body in (
            ("POST", "/v1/completions", {"prompt": "Hi", "max_tokens": 2}),
            ("POST", "/tokenize", {"prompt": "Hi"}),
            ("GET", "/v1/models", None),
        ):
            refused = httpx.request(method, f"{doomed.url}{path}", json=body, timeout=10)
            assert refused.status_code == 503, (path, refused.text)
            assert refused.headers["retry-after"]
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "engine_unavailable"), path
            assert "shutting down" in error["message"]

        finished = list(short_events)
        cut = list(long_events)
    assert finished[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in finished[-2]  # ran to its end during the drain
    assert not any(event.startswith('data: {"error"') for event in finished)
    assert cut[-1] == "data: [DONE]"
    assert "shutting down" in cut[-2]  # ended in-band at the shutdown timeout
    try:
        assert doomed.process.wait(timeout=60) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit after SIGTERM:\n{doomed.log_tail()}")
    with pytest.raises(httpx.TransportError):  # the drain over, nothing listens
        httpx.get(f"{doomed.url}/health", timeout=5)
