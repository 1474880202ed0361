"""`spindle router` in front of two real `spindle serve` replicas on loopback.

The replicas' own answers and /metrics are the reference: the router must return what a replica returns, a
shared-prefix workload must hit the replicas' prefix caches more under the prefix policy than under round robin,
and a replica killed under load must cost no request that had not started streaming.
"""

from __future__ import annotations

import asyncio
import collections
import json
import signal
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import long_text
from tests.router_fakes import raw_get
from tests.test_router import ESCAPING_PATHS, UNREADABLE_BODIES

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher, ServerProcess

pytest_plugins = ["tests.server_fixtures"]
pytestmark = pytest.mark.slow

GROUPS = 4  # shared system prompts in the prefix workload
PER_GROUP = 4  # requests per system prompt


# Two replicas loading side by side on a busy machine take longer than one; this is a slow test anyway.
STARTUP_TIMEOUT = 600.0
REQUEST_TIMEOUT = 120.0  # seconds; the two replicas share the machine's cores with everything else running on it


@pytest.fixture(scope="module")
def replicas(launch_server: Launcher) -> list[ServerProcess]:
    launched = [launch_server(f"replica{i}", []) for i in range(2)]  # they load side by side
    return [replica.wait_ready(STARTUP_TIMEOUT) for replica in launched]


@pytest.fixture(scope="module")
def routers(replicas: list[ServerProcess], launch_server: Launcher) -> dict[str, str]:
    """A router per policy over the same two replicas; each checks their health every half second."""
    urls = [item for replica in replicas for item in ("--replica", replica.url)]
    started = {
        policy: launch_server(
            f"router-{policy}",
            [*urls, "--routing-policy", policy, "--health-check-interval", "0.5"],
            command="router",
        )
        for policy in ("prefix", "round_robin")
    }
    return {policy: router.wait_ready(STARTUP_TIMEOUT).url for policy, router in started.items()}


def chat(system: str, user: str, max_tokens: int, stream: bool = False) -> dict:
    return {
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": user}],
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": stream,
    }


def stream_text(response: httpx.Response) -> str:
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line]
    assert events[-1] == "[DONE]", events[-3:]
    return "".join(json.loads(event)["choices"][0]["delta"].get("content") or "" for event in events[:-1])


def test_the_router_returns_what_a_replica_returns(replicas: list[ServerProcess], routers: dict[str, str]) -> None:
    body = chat("You are a helpful assistant.", "Name three colours.", max_tokens=16)
    direct = [httpx.post(f"{r.url}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT).json() for r in replicas]
    expected = direct[0]["choices"][0]["message"]["content"]
    assert expected and direct[1]["choices"][0]["message"]["content"] == expected  # fp32: both replicas agree
    for router in routers.values():
        for _ in range(2):  # round robin: both replicas
            reply = httpx.post(f"{router}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT)
            assert reply.status_code == 200, reply.text
            assert reply.json()["choices"][0]["message"]["content"] == expected
            assert reply.json()["usage"] == direct[0]["usage"]
            streamed = httpx.post(
                f"{router}/v1/chat/completions", json=body | {"stream": True}, timeout=REQUEST_TIMEOUT
            )
            assert stream_text(streamed) == expected
    assert (
        httpx.get(f"{routers['prefix']}/v1/models", timeout=REQUEST_TIMEOUT).json()["data"][0]["id"]
        == direct[0]["model"]
    )


def test_malformed_requests_get_the_replicas_own_answer(replicas: list[ServerProcess], routers: dict[str, str]) -> None:
    """A body the router cannot read still goes to a replica, whose 400 the client gets; a path with dot segments
    goes nowhere (404), where it would otherwise reach a replica's /metrics, /health or /docs."""
    headers = {"Content-Type": "application/json"}
    for path, content in UNREADABLE_BODIES:
        direct = httpx.post(f"{replicas[0].url}{path}", content=content, headers=headers, timeout=REQUEST_TIMEOUT)
        assert direct.status_code == 400, direct.text
        for router in routers.values():
            reply = httpx.post(f"{router}{path}", content=content, headers=headers, timeout=REQUEST_TIMEOUT)
            assert (reply.status_code, reply.json()) == (400, direct.json())
    for target in ESCAPING_PATHS:
        status, body = raw_get(routers["prefix"], target)
        assert status == 404 and json.loads(body)["error"]["type"] == "not_found_error", (target, body[:200])


def prefix_hit_rate(router: str, replicas: list[ServerProcess], systems: list[str]) -> float:
    """Prefix-cache hits over lookups on both replicas, for the shared-prefix workload sent through ``router``:
    each system prompt's requests one after another (so that round robin alternates replicas within a group)."""
    before = [replica.wait_idle() for replica in replicas]
    for system in systems:
        for question in range(PER_GROUP):
            body = chat(system, f"Question {question}?", max_tokens=1)
            reply = httpx.post(f"{router}/v1/chat/completions", json=body, timeout=REQUEST_TIMEOUT)
            assert reply.status_code == 200, reply.text
    after = [replica.wait_idle() for replica in replicas]

    def delta(name: str) -> float:
        return sum(a[name] - b[name] for a, b in zip(after, before, strict=True))

    assert delta("spindle:prefix_cache_queries_total") > 0
    return delta("spindle:prefix_cache_hits_total") / delta("spindle:prefix_cache_queries_total")


def test_prefix_routing_hits_the_prefix_cache_more_than_round_robin(
    replicas: list[ServerProcess], routers: dict[str, str]
) -> None:
    text = long_text(GROUPS * 2 * 1200)
    # Distinct ~250-token system prompts for each run, so that neither run finds the other's prefixes cached.
    chunks = [text[i * 1200 : (i + 1) * 1200] for i in range(GROUPS * 2)]
    rates = {
        "prefix": prefix_hit_rate(routers["prefix"], replicas, chunks[:GROUPS]),
        "round_robin": prefix_hit_rate(routers["round_robin"], replicas, chunks[GROUPS:]),
    }
    # Per group, the prefix policy computes the system prompt once (3 of 4 requests hit it), round robin once per
    # replica (2 of 4).
    assert rates["prefix"] > 0.6 > rates["round_robin"] > 0.3, rates


@dataclass
class Outcome:
    stream: bool
    sent_after_kill: bool
    status: int | None = None
    events: int = 0  # content events received
    completed: bool = False  # a whole answer: every token, finish_reason, [DONE]
    error_event: bool = False
    transport_error: str | None = None


async def one_request(client: httpx.AsyncClient, url: str, stream: bool, index: int, after_kill: bool) -> Outcome:
    outcome = Outcome(stream, after_kill)
    body = {"prompt": f"Request {index}: once upon a time", "max_tokens": 24, "ignore_eos": True, "stream": stream}
    try:
        async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
            outcome.status = response.status_code
            if not stream:
                payload = json.loads(await response.aread())
                outcome.completed = payload.get("usage", {}).get("completion_tokens") == 24
                return outcome
            async for line in response.aiter_lines():
                data = line.removeprefix("data: ")
                if not line or data == "[DONE]":
                    outcome.completed |= data == "[DONE]" and not outcome.error_event and outcome.events == 24
                    continue
                event = json.loads(data)
                if "error" in event:
                    outcome.error_event = True
                else:
                    outcome.events += 1
    except httpx.HTTPError as exc:
        outcome.transport_error = repr(exc)
    return outcome


def summed_metrics(url: str) -> dict[str, float]:
    """Each sample name at ``url``/metrics, summed over its labels (the router's replicas)."""
    totals: dict[str, float] = collections.defaultdict(float)
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=REQUEST_TIMEOUT).text):
        for sample in family.samples:
            totals[sample.name] += sample.value
    return totals


def test_a_replica_killed_under_load_loses_no_request_that_had_not_started_streaming(
    replicas: list[ServerProcess], routers: dict[str, str]
) -> None:
    """Runs last in this module: it kills the second replica."""
    router, victim = routers["prefix"], replicas[1]

    async def load() -> list[Outcome]:
        async with httpx.AsyncClient(timeout=REQUEST_TIMEOUT, limits=httpx.Limits(max_connections=64)) as client:
            before = [
                asyncio.create_task(one_request(client, router, stream=i % 2 == 0, index=i, after_kill=False))
                for i in range(16)
            ]
            deadline = time.monotonic() + 60
            while victim.metrics()["spindle:num_requests_running"] < 2:  # kill it with work in flight
                assert time.monotonic() < deadline, "the victim never got work"
                await asyncio.sleep(0.05)
            victim.process.send_signal(signal.SIGKILL)
            victim.process.wait()
            after = [
                asyncio.create_task(one_request(client, router, stream=i % 2 == 0, index=i, after_kill=True))
                for i in range(16, 24)
            ]
            return list(await asyncio.gather(*before, *after))

    outcomes = asyncio.run(load())
    for outcome in outcomes:
        assert outcome.transport_error is None, outcome
        assert outcome.status == 200, outcome
        if outcome.stream and outcome.error_event:
            assert 0 < outcome.events < 24, outcome  # it had started: cut short, ended cleanly with an error event
        else:
            assert outcome.completed, outcome  # everything that had not started streaming was served in full
    assert all(outcome.completed for outcome in outcomes if outcome.sent_after_kill)
    samples = summed_metrics(router)
    rescued = samples["spindle:router_retries_total"] + samples["spindle:router_stream_failures_total"]
    assert rescued >= 1, "the kill hit no request: the test proved nothing"
