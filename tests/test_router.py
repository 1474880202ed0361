"""`spindle router`: routing policies, replica health, retries before a response starts, clean failure after, and
disconnects, against fake replicas (tests/router_fakes.py). Real replicas: tests/test_router_replicas.py."""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import httpx
import pytest

from engine.config import build_config, config_from_args
from engine.errors import ConfigError
from server.cli import build_parser
from server.router.app import create_router_app
from server.router.policy import LeastLoaded, PrefixAffinity, RoundRobin, prefix_key
from server.router.pool import Replica, reported_load
from tests.router_fakes import FakeReplica, free_port, raw_get, serving

# Generous: the fakes answer at once, but the machine running the tests may be busy.
post = functools.partial(httpx.post, timeout=30)
get = functools.partial(httpx.get, timeout=30)

SYSTEM = "You are a careful assistant who answers in one short sentence. " * 8  # longer than prefix_chars


def chat(system: str, user: str, **extra: object) -> dict:
    return {"messages": [{"role": "system", "content": system}, {"role": "user", "content": user}], **extra}


# ----------------------------------------------------------------------------------------------------------------
# Prefix keys and policies
# ----------------------------------------------------------------------------------------------------------------


def test_prefix_key_reads_the_start_of_the_prompt() -> None:
    path = "/v1/chat/completions"
    key = prefix_key(path, chat(SYSTEM, "What is 2 + 2?"), 256)
    assert key is not None
    assert prefix_key(path, chat(SYSTEM, "Name a colour.", temperature=0.5), 256) == key
    assert prefix_key(path, chat("Another system prompt.", "What is 2 + 2?"), 256) != key
    assert prefix_key(path, chat(SYSTEM, "What is 2 + 2?"), 10_000) != prefix_key(path, chat(SYSTEM, "Hi"), 10_000)
    # The role is part of the prompt a replica renders, so it is part of the key.
    user_first = {"messages": [{"role": "user", "content": SYSTEM}, {"role": "user", "content": "x"}]}
    assert prefix_key(path, user_first, 256) != key
    completion = "/v1/completions"
    text = "Once upon a time " * 40
    assert prefix_key(completion, {"prompt": text + "a"}, 256) == prefix_key(completion, {"prompt": text + "b"}, 256)
    assert prefix_key(completion, {"prompt": [text, "other"]}, 256) == prefix_key(completion, {"prompt": text}, 256)
    ids = list(range(300))
    assert prefix_key(completion, {"prompt": ids}, 64) == prefix_key(completion, {"prompt": [ids, [1]]}, 64)
    assert prefix_key(completion, {"prompt": ids}, 64) != prefix_key(completion, {"prompt": ids[1:]}, 64)
    for path, body in [("/tokenize", {"prompt": text}), (completion, ["x"]), (completion, {}), (completion, None)]:
        assert prefix_key(path, body, 256) is None


def replicas(count: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000", healthy=True) for i in range(count)]


def random_keys(count: int, seed: int = 0) -> list[bytes]:
    rng = random.Random(seed)
    return [rng.randbytes(16) for _ in range(count)]


def test_prefix_policy_is_consistent_and_spreads_keys() -> None:
    pool = replicas(4)
    policy = PrefixAffinity(load_factor=1.25)
    keys = random_keys(2000)
    chosen = {key: policy.order(pool, key)[0].url for key in keys}
    assert all(policy.order(list(reversed(pool)), key)[0].url == chosen[key] for key in keys)  # order-independent
    counts = collections.Counter(chosen.values())
    assert len(counts) == 4 and min(counts.values()) > 400, counts  # 500 expected each; binomial sd 19
    # A replica that leaves moves only its own keys; the others keep theirs.
    gone = pool[1].url
    survivors = [r for r in pool if r.url != gone]
    for key in keys:
        after = policy.order(survivors, key)[0].url
        assert after == chosen[key] or chosen[key] == gone
    assert len({policy.order(survivors, key)[0].url for key in keys if chosen[key] == gone}) == 3  # spread too


def test_prefix_policy_spills_past_its_load_bound_to_the_next_ranked_replica() -> None:
    pool = replicas(3)
    policy = PrefixAffinity(load_factor=1.25)
    key = random_keys(1)[0]
    ranked = [r.url for r in policy.order(pool, key)]
    first = next(r for r in pool if r.url == ranked[0])
    first.in_flight = 2  # total 2 (+1 this request): capacity ceil(1.25 * 3 / 3) = 2, so it is full
    assert [r.url for r in policy.order(pool, key)] == ranked[1:2] + ranked[:1] + ranked[2:]
    first.in_flight = 1  # capacity ceil(1.25 * 2 / 3) = 1: still full
    assert policy.order(pool, key)[0].url == ranked[1]
    for replica in pool:
        replica.in_flight = 4  # all equally busy: the bound holds for the preferred one again
    assert [r.url for r in policy.order(pool, key)] == ranked
    assert policy.order(pool, None)[0] in pool  # no key: least loaded
    assert policy.order([], key) == []


def test_round_robin_and_least_loaded() -> None:
    pool = replicas(3)
    rr = RoundRobin()
    assert [rr.order(pool, None)[0].url for _ in range(6)] == [r.url for r in pool] * 2
    ll = LeastLoaded()
    assert {ll.order(pool, None)[0].url for _ in range(3)} == {r.url for r in pool}  # idle: taken in turn
    pool[0].reported_load, pool[1].in_flight, pool[2].in_flight = 5, 3, 4
    assert [r.url for r in ll.order(pool, None)] == [pool[1].url, pool[2].url, pool[0].url]


def test_replica_load_is_the_larger_of_own_count_and_polled_count() -> None:
    text = (
        "# TYPE spindle:num_requests_running gauge\n"
        'spindle:num_requests_running{model_name="a"} 3.0\n'
        'spindle:num_requests_running{model_name="b"} 1.0\n'
        "# TYPE spindle:num_requests_waiting gauge\n"
        'spindle:num_requests_waiting{model_name="a"} 2.0\n'
        "# TYPE spindle:kv_cache_usage_perc gauge\n"
        'spindle:kv_cache_usage_perc{model_name="a"} 0.5\n'
    )
    assert reported_load(text) == 6.0
    replica = Replica("http://x", reported_load=6.0, in_flight=2)
    assert replica.load == 6.0
    replica.in_flight = 9
    assert replica.load == 9.0


# ----------------------------------------------------------------------------------------------------------------
# Configuration and command line
# ----------------------------------------------------------------------------------------------------------------


def test_router_flags(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("SPINDLE_")]:
        monkeypatch.delenv(name)
    args = build_parser().parse_args(
        ["router", "--replica", "http://a:8000/", "--replica", "http://b:8000", "--routing-policy", "round_robin"]
    )
    config = config_from_args(args)
    assert config.router.replica_urls == ["http://a:8000", "http://b:8000"]
    assert config.router.routing_policy == "round_robin"
    monkeypatch.setenv("SPINDLE_REPLICA", "http://c:1,http://d:2")
    assert config_from_args(build_parser().parse_args(["router"])).router.replica_urls == ["http://c:1", "http://d:2"]
    with pytest.raises(SystemExit):  # the engine's flags are not the router's, and the router's not serve's
        build_parser().parse_args(["router", "--max-num-seqs", "4"])
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--replica", "http://a:8000"])


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"replica": "a:8000"}, "replica"),
        ({"replica": "http://a,http://a"}, "twice"),
        ({"routing_policy": "random"}, "routing_policy"),
        ({"load_factor": 0.5}, "load_factor"),
        ({"prefix_chars": 0}, "prefix_chars"),
        ({"health_check_interval": 0}, "health_check_interval"),
    ],
)
def test_bad_router_settings_are_config_errors(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_config(None, overrides, environ={})


def test_router_without_replicas_refuses_to_start() -> None:
    with pytest.raises(ConfigError, match="--replica"):
        create_router_app(build_config(None, {}, environ={}))


# ----------------------------------------------------------------------------------------------------------------
# The router over fake replicas
# ----------------------------------------------------------------------------------------------------------------


@contextmanager
def router_over(urls: list[str], **settings: object) -> Iterator[str]:
    overrides = {"replica": ",".join(urls), "health_check_interval": 0.5, **settings}
    with serving(create_router_app(build_config(None, overrides, environ={}))) as url:
        yield url


@contextmanager
def fakes(*replicas: FakeReplica) -> Iterator[list[str]]:
    with contextlib.ExitStack() as stack:
        yield [stack.enter_context(serving(replica.app())) for replica in replicas]


def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def router_metrics(url: str) -> dict[str, float]:
    samples = {}
    for line in get(f"{url}/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


def test_requests_and_streams_pass_through_untouched() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    with fakes(a, b) as urls, router_over(urls, routing_policy="round_robin") as router:
        headers = {"Authorization": "Bearer sk-client", "X-Trace": "t1"}
        body = chat(SYSTEM, "hi", max_tokens=3)
        first = post(f"{router}/v1/chat/completions", json=body, headers=headers)
        second = post(f"{router}/v1/chat/completions?x=1", json=body, headers=headers)
        assert first.status_code == second.status_code == 200
        assert {first.json()["replica"], second.json()["replica"]} == {"a", "b"}  # round robin
        assert first.json()["echo"] == body
        assert [r["authorization"] for r in a.received + b.received] == ["Bearer sk-client"] * 2
        direct = post(f"{urls[0]}/v1/chat/completions", json=body | {"stream": True}).content
        relayed = [post(f"{router}/v1/chat/completions", json=body | {"stream": True}) for _ in range(2)]
        streamed_by_a = next(r for r in relayed if b'"a"' in r.content)
        assert streamed_by_a.content == direct  # byte for byte
        assert streamed_by_a.headers["content-type"].startswith("text/event-stream")
        models = get(f"{router}/v1/models", headers=headers)
        assert models.json()["data"][0]["id"] == "fake"
        samples = router_metrics(router)
        assert samples[f'spindle:router_requests_total{{replica="{urls[0]}"}}'] >= 2
        assert samples[f'spindle:router_replica_healthy{{replica="{urls[1]}"}}'] == 1


def test_prefix_policy_keeps_a_prefix_on_one_replica() -> None:
    a, b = FakeReplica("a"), FakeReplica("b")
    with fakes(a, b) as urls, router_over(urls) as router:
        systems = [f"System prompt number {i}. " * 20 for i in range(8)]
        served: dict[int, set[str]] = collections.defaultdict(set)
        for round_ in range(3):
            for group, system in enumerate(systems):
                reply = post(f"{router}/v1/chat/completions", json=chat(system, f"question {round_}"))
                served[group].add(reply.json()["replica"])
        assert all(len(names) == 1 for names in served.values()), served
        assert {name for names in served.values() for name in names} == {"a", "b"}  # 8 prefixes, both used


def test_least_loaded_reads_the_replicas_load_from_their_metrics() -> None:
    busy, idle = FakeReplica("busy", running=5), FakeReplica("idle")
    with fakes(busy, idle) as urls, router_over(urls, routing_policy="least_loaded") as router:
        replies = [post(f"{router}/v1/completions", json={"prompt": f"p{i}"}) for i in range(4)]
        assert [r.json()["replica"] for r in replies] == ["idle"] * 4
        busy.running, idle.running = 0, 7
        wait_until(lambda: router_metrics(router)[f'spindle:router_replica_load{{replica="{urls[1]}"}}'] == 7)
        assert post(f"{router}/v1/completions", json={"prompt": "p"}).json()["replica"] == "busy"


def test_a_replica_that_cannot_be_reached_is_skipped_and_the_request_retried() -> None:
    live = FakeReplica("live")
    dead_url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with fakes(live) as urls, router_over([dead_url, *urls], routing_policy="round_robin") as router:
        replies = [post(f"{router}/v1/completions", json={"prompt": f"p{i}"}) for i in range(4)]
        assert [r.status_code for r in replies] == [200] * 4
        assert get(f"{router}/health").json()["healthy_replicas"] == 1


def test_a_refusing_replica_is_retried_elsewhere_and_the_last_refusal_returned() -> None:
    busy, ok = FakeReplica("busy", status=503), FakeReplica("ok")
    with fakes(busy, ok) as urls, router_over(urls, routing_policy="round_robin") as router:
        replies = [post(f"{router}/v1/completions", json={"prompt": "x", "stream": s}) for s in (0, 1, 0)]
        assert [r.status_code for r in replies] == [200] * 3
        assert len(busy.received) >= 1
        assert router_metrics(router)[f'spindle:router_retries_total{{replica="{urls[1]}"}}'] >= 1
        ok.status = 503
        refused = post(f"{router}/v1/completions", json={"prompt": "x"})
        assert refused.status_code == 503 and refused.headers["retry-after"] == "7"  # the replica's own answer
        busy.status = ok.status = 400  # a client error is the client's: not retried
        before = len(busy.received) + len(ok.received)
        assert post(f"{router}/v1/completions", json={"prompt": "x"}).status_code == 400
        assert len(busy.received) + len(ok.received) == before + 1


@pytest.mark.parametrize("mid_event", [False, True], ids=["between-events", "mid-event"])
def test_a_stream_whose_replica_fails_ends_with_an_error_event(mid_event: bool) -> None:
    failing = FakeReplica("failing", drop_after_events=1, drop_mid_event=mid_event)
    with fakes(failing) as urls, router_over(urls) as router:
        reply = post(f"{router}/v1/chat/completions", json=chat("s", "u", stream=True))
        events = [line.removeprefix("data: ") for line in reply.text.split("\n\n") if line]
        assert json.loads(events[0]) == {"replica": "failing", "index": 0}
        if mid_event:  # the cut event is closed, so that the error event stands on its own
            assert events.pop(1) == '{"replica": "failing", '
        assert json.loads(events[1])["error"]["message"].startswith("the replica serving this stream failed")
        assert events[2:] == ["[DONE]"]
        assert router_metrics(router)[f'spindle:router_stream_failures_total{{replica="{urls[0]}"}}'] == 1


def test_no_healthy_replica_is_a_503_in_openai_shape_and_health_brings_replicas_back() -> None:
    replica = FakeReplica("r", healthy=False)
    with fakes(replica) as urls, router_over(urls) as router:
        reply = post(f"{router}/v1/completions", json={"prompt": "x"})
        assert reply.status_code == 503
        assert reply.json()["error"]["code"] == "no_healthy_replica"
        assert urls[0] in reply.json()["error"]["message"]
        assert get(f"{router}/health").status_code == 503
        assert replica.received == []  # an unhealthy replica gets no traffic
        replica.healthy = True
        wait_until(lambda: get(f"{router}/health").status_code == 200)
        assert post(f"{router}/v1/completions", json={"prompt": "x"}).status_code == 200
        replica.healthy = False
        wait_until(lambda: get(f"{router}/health").status_code == 503)
        assert router_metrics(router)[f'spindle:router_replica_healthy{{replica="{urls[0]}"}}'] == 0


@pytest.mark.parametrize("stream", [True, False], ids=["stream", "full"])
def test_a_client_that_leaves_cancels_the_request_on_the_replica(stream: bool) -> None:
    replica = FakeReplica("r", stall=True)
    with fakes(replica) as urls, router_over(urls) as router:
        body = {"prompt": "x", "stream": stream}
        if stream:
            with httpx.stream("POST", f"{router}/v1/completions", json=body, timeout=30) as reply:
                assert next(reply.iter_raw())  # the first event arrived
        else:
            with pytest.raises(httpx.ReadTimeout):
                post(f"{router}/v1/completions", json=body, timeout=0.5)
        assert replica.client_gone.wait(timeout=10), "the replica's request outlived its client"
        wait_until(lambda: router_metrics(router)[f'spindle:router_replica_load{{replica="{urls[0]}"}}'] == 0)


# ----------------------------------------------------------------------------------------------------------------
# Malformed requests and paths
# ----------------------------------------------------------------------------------------------------------------


def test_prefix_key_of_a_prompt_with_a_lone_surrogate() -> None:
    """JSON's \\ud800 escape parses to a lone surrogate, which has no UTF-8 form: the key still reads the text."""
    path = "/v1/chat/completions"
    key = prefix_key(path, chat("\ud800" + SYSTEM, "hi"), 256)
    assert key is not None and key == prefix_key(path, chat("\ud800" + SYSTEM, "bye"), 256)
    assert key != prefix_key(path, chat("\udc00" + SYSTEM, "hi"), 256)
    assert prefix_key("/v1/completions", {"prompt": "a\ud800b"}, 256) is not None


UNREADABLE_BODIES = [
    ("/v1/chat/completions", json.dumps(chat("\ud800", "hi")).encode()),
    ("/v1/completions", b'{"prompt": "a\\udfffb"}'),
    ("/v1/completions", b"[" * 30_000 + b"]" * 30_000),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": ' + b"[" * 30_000 + b"]" * 30_000 + b"}]}"),
]


@pytest.mark.parametrize(
    ("path", "content"),
    UNREADABLE_BODIES,
    ids=["chat-lone-surrogate", "completion-lone-surrogate", "nested-array", "nested-content"],
)
def test_a_body_the_router_cannot_read_gets_the_replicas_own_answer(path: str, content: bytes) -> None:
    replica = FakeReplica("r")
    with fakes(replica) as urls, router_over(urls) as router:
        reply = post(f"{router}{path}", content=content, headers={"Content-Type": "application/json"})
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"]["message"] == "r: malformed JSON body"  # the replica's, passed through
        assert [record["path"] for record in replica.received] == [path]


ESCAPING_PATHS = [
    "/v1/../metrics",
    "/v1/%2e%2e/docs",
    "/v1/..%2fhealth",
    "/v1/models/../../metrics",
    "/v1/models/%2E%2E/%2e%2e/docs",
    "/v1/models/x/..%2F..%2F..%2Fhealth",
    "/v1/models/./fake",
    "/v1/chat/completions/../../../openapi.json",
]


def test_a_path_with_dot_segments_is_a_404_and_reaches_no_replica() -> None:
    replica = FakeReplica("r")
    with fakes(replica) as urls, router_over(urls) as router:
        for target in ESCAPING_PATHS:
            status, body = raw_get(router, target)
            assert status == 404, (target, body[:200])
            error = json.loads(body)["error"]
            assert set(error) == {"message", "type", "param", "code"}, target
            assert error["type"] == "not_found_error", target
        assert replica.received == []


def test_a_forwarded_path_reaches_the_replica_as_the_router_matched_it() -> None:
    """Decoded once, by the router: the replica sees the path the router routed on, never a second decoding."""
    replica = FakeReplica("r")
    with fakes(replica) as urls, router_over(urls) as router:
        for target, seen in [
            ("/v1/models/org%2Fname", "/v1/models/org/name"),
            ("/v1/models/a%20b:c", "/v1/models/a b:c"),
            ("/v1/models/%252e%252e", "/v1/models/%2e%2e"),
            ("/v1/models/..x/y..", "/v1/models/..x/y.."),
            ("/v1/models/a%3Fb%23c", "/v1/models/a?b#c"),
        ]:
            status, body = raw_get(router, target)
            assert status == 200, (target, body[:200])
            assert replica.received[-1]["path"] == seen, target
            assert json.loads(body)["id"] == seen.removeprefix("/v1/models/"), target
        status, _ = raw_get(router, "/v1/models?next=/../metrics")
        assert status == 200 and replica.received[-1]["path"] == "/v1/models"


def test_a_header_value_outside_ascii_reaches_the_replica_byte_for_byte() -> None:
    """HTTP allows bytes past ASCII in a header value (Latin-1 by tradition, UTF-8 in practice): no 500 for them."""
    replica = FakeReplica("r")
    with fakes(replica) as urls, router_over(urls) as router:
        for value in ("Bearer caf\xe9", "Bearer café €".encode()):
            status, body = raw_get(router, "/v1/models", {"Authorization": value})
            assert status == 200, (value, body[:200])
            sent = value if isinstance(value, str) else value.decode("latin-1")  # as the replica's server reads it
            assert replica.received[-1]["authorization"] == sent
