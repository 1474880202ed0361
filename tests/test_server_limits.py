"""A second server with an API key (from SPINDLE_API_KEY), one running and one waiting slot, and a short shutdown;
and one that cannot start."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher, ServerProcess

pytest_plugins = ["tests.server_fixtures"]

KEY = "limits-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
SHUTDOWN_TIMEOUT = 3.0
LONG_STREAM = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def limited(launch_server: Launcher) -> ServerProcess:
    flags = ["--max-num-seqs", "1", "--max-waiting-requests", "1", "--shutdown-timeout", str(SHUTDOWN_TIMEOUT)]
    return launch_server("limited", flags, env={"SPINDLE_API_KEY": KEY}).wait_ready()


@pytest.fixture
def authed(limited: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=limited.url, headers=AUTH, timeout=60) as client:
        yield client


def events(response: httpx.Response) -> Iterator[str]:
    """The response's SSE data lines; keep the iterator while reading, as dropping it closes the connection."""
    return (line for line in response.iter_lines() if line.startswith("data: "))


def test_api_key_from_the_environment(limited: ServerProcess) -> None:
    with pytest.raises(openai.AuthenticationError):
        limited.client(api_key="wrong-key").models.list()
    for headers in ({}, {"Authorization": "Bearer wrong-key"}):
        response = httpx.post(f"{limited.url}/v1/completions", json={"prompt": "Hi"}, headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["type"] == "authentication_error"
    client = limited.client(api_key=KEY)
    completion = client.completions.create(model=client.models.list().data[0].id, prompt="Hi", max_tokens=2)
    assert completion.usage is not None and completion.usage.completion_tokens == 2
    assert httpx.get(f"{limited.url}/health").status_code == 200
    assert httpx.get(f"{limited.url}/metrics").status_code == 200


def test_full_queue_is_503_with_retry_after(limited: ServerProcess, authed: httpx.Client) -> None:
    with authed.stream("POST", "/v1/completions", json=LONG_STREAM) as running:
        running_events = events(running)
        next(running_events)  # it holds the only running slot
        with authed.stream("POST", "/v1/completions", json=LONG_STREAM) as waiting:
            assert waiting.status_code == 200  # accepted into the only waiting slot
            refused = authed.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2})
            assert refused.status_code == 503
            assert refused.headers["retry-after"] == "1"
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("service_unavailable", "queue_full")
    limited.wait_idle()  # the server learns of the closed streams asynchronously
    assert authed.post("/v1/completions", json={"prompt": "Hi", "max_tokens": 2}).status_code == 200


# (path, body, the parameter blamed, sequences needed): more than the one waiting slot of the limited server.
MORE_THAN_QUEUED = [
    ("/v1/completions", {"prompt": "Hi", "n": 2}, "n", 2),
    ("/v1/completions", {"prompt": "Hi", "n": 2, "stream": True}, "n", 2),
    ("/v1/completions", {"prompt": ["Hi", "Ho"]}, "prompt", 2),
    ("/v1/completions", {"prompt": [[1, 2], [3, 4]], "n": 2}, "n", 4),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2}, "n", 2),
]


@pytest.mark.parametrize(("path", "body", "param", "sequences"), MORE_THAN_QUEUED)
def test_more_sequences_than_the_queue_holds_is_400(
    path: str, body: dict[str, object], param: str, sequences: int, limited: ServerProcess, authed: httpx.Client
) -> None:
    limited.wait_idle()
    refused = authed.post(path, json=body | {"max_tokens": 2})  # idle server: no wait would let it in
    assert refused.status_code == 400, refused.text
    assert "retry-after" not in refused.headers
    error = refused.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert f"needs {sequences} sequences" in error["message"]
    assert "queues at most 1" in error["message"]


def draining(server: ServerProcess, within: float = 2.0) -> bool:
    """Whether /health turns 503, or the server stops listening, within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{server.url}/health", timeout=1).status_code == 503:
                return True
        except httpx.TransportError:
            return True
        time.sleep(0.05)
    return False


def test_sigterm_drains_in_flight_requests_and_exits_zero(limited: ServerProcess, authed: httpx.Client) -> None:
    short = LONG_STREAM | {"max_tokens": 20}  # finishes well within the shutdown timeout
    with (
        authed.stream("POST", "/v1/completions", json=short) as finishing,
        authed.stream("POST", "/v1/completions", json=LONG_STREAM) as cut,
    ):
        finishing_events, cut_events = events(finishing), events(cut)
        next(finishing_events)  # running; the long one waits for the only running slot
        os.kill(limited.process.pid, signal.SIGTERM)
        started = time.monotonic()
        assert draining(limited)
        finished = list(finishing_events)
        rest = list(cut_events)
        ended = time.monotonic() - started
    assert finished[-1] == "data: [DONE]"
    assert '"finish_reason":"length"' in finished[-2]  # drained, not cut
    assert not any(event.startswith('data: {"error"') for event in finished)
    assert ended < SHUTDOWN_TIMEOUT + 3
    assert rest[-1] == "data: [DONE]"
    assert "shutting down" in rest[-2]  # aborted in-band after the shutdown timeout, in OpenAI's error shape
    try:
        assert limited.process.wait(timeout=30) == 0
    except subprocess.TimeoutExpired:
        pytest.fail(f"the server did not exit after SIGTERM:\n{limited.log_tail()}")


def test_a_server_whose_port_is_taken_exits_with_status_1(launch_server: Launcher) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = launch_server("port-taken", ["--port", str(taken.getsockname()[1])])  # the last --port wins
        try:
            assert server.process.wait(timeout=120) == 1
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server neither served nor exited:\n{server.log_tail()}")
    assert "address already in use" in server.log_tail().lower()
