"""A real server with short read timeouts and a small connection cap, against slow, idle and surplus clients:
they are cut off or refused while normal clients are served."""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import httpx
import pytest

from engine.config import build_config
from engine.errors import ConfigError

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher, ServerProcess

pytest_plugins = ["tests.server_fixtures"]

HEADER_TIMEOUT = 4.0
BODY_TIMEOUT = 4.0
KEEP_ALIVE_TIMEOUT = 2.0
MAX_CONNECTIONS = 64
EARLY = 0.05  # timer granularity: each client's clock starts before the server's
SLACK = 6.0  # scheduling delays on a loaded machine
TRICKLE_SECONDS = 0.05  # between two bytes of a slow client


@pytest.fixture(scope="module")
def guarded(launch_server: Launcher) -> ServerProcess:
    flags = [
        *("--header-read-timeout", str(HEADER_TIMEOUT), "--body-read-timeout", str(BODY_TIMEOUT)),
        *("--keep-alive-timeout", str(KEEP_ALIVE_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)),
    ]
    return launch_server("connections", flags).wait_ready()


async def connect(server: ServerProcess) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    address = urlsplit(server.url)
    return await asyncio.open_connection(address.hostname, address.port)


async def closed_by_server(reader: asyncio.StreamReader, since: float) -> float:
    """Seconds from ``since`` until the server closes the connection (end of stream or reset)."""
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass
    return time.monotonic() - since


async def trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """Send ``data`` a byte at a time until it is sent or the server hangs up."""
    with contextlib.suppress(ConnectionError):
        for byte in data:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(TRICKLE_SECONDS)


async def slow_client(server: ServerProcess, head: bytes, trickled: bytes, within: float) -> float:
    """Send ``head`` at once and ``trickled`` a byte at a time; seconds until the server cut it off, from before
    connecting. Fails if it was not cut off ``within`` seconds."""
    started = time.monotonic()
    reader, writer = await connect(server)
    writer.write(head)
    sender = asyncio.create_task(trickle(writer, trickled))
    try:
        return await asyncio.wait_for(closed_by_server(reader, started), within)
    finally:
        sender.cancel()
        await asyncio.gather(sender, return_exceptions=True)
        writer.close()


async def served(server: ServerProcess) -> tuple[list[int], float]:
    """A normal client's statuses for a few cheap requests, each on a new connection, and when it was done."""
    statuses = []
    for method, path, body in (("GET", "/health", None), ("POST", "/tokenize", {"prompt": "Hi"})):
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            statuses.append((await client.request(method, path, json=body)).status_code)
    return statuses, time.monotonic()


async def wait_for_capacity(server: ServerProcess, within: float) -> int:
    """/health's status once it is no longer refused for want of connections (or at the deadline)."""
    deadline = time.monotonic() + within
    while True:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            status = (await client.get("/health")).status_code
        if status != 503 or time.monotonic() > deadline:
            return status
        await asyncio.sleep(0.2)


def test_slowloris_headers_are_cut_off_while_a_normal_client_is_served(guarded: ServerProcess) -> None:
    never_ending = b"GET /health HTTP/1.1\r\nHost: spindle\r\nX-Padding: " + b"a" * 4000

    async def scenario() -> tuple[list[float], list[int], float, float]:
        began = time.monotonic()
        slow = [asyncio.create_task(slow_client(guarded, b"", never_ending, HEADER_TIMEOUT + SLACK)) for _ in range(50)]
        await asyncio.sleep(0.5)  # all of them trickling
        statuses, done = await served(guarded)
        return await asyncio.gather(*slow), statuses, done - began, await wait_for_capacity(guarded, SLACK)

    cut_after, statuses, served_after, later = asyncio.run(scenario())
    assert statuses == [200, 200]
    assert served_after < min(cut_after)  # while all 50 were still connected
    assert all(HEADER_TIMEOUT - EARLY <= seconds <= HEADER_TIMEOUT + SLACK for seconds in cut_after), cut_after
    assert later == 200


def test_a_trickled_body_is_cut_off_while_a_normal_client_is_served(guarded: ServerProcess) -> None:
    body = b'{"prompt": "' + b"a" * 2000 + b'"}'
    head = b"POST /tokenize HTTP/1.1\r\nHost: spindle\r\nContent-Type: application/json\r\n"
    head += b"Content-Length: %d\r\n\r\n" % len(body)

    async def scenario() -> tuple[list[float], list[int], float]:
        began = time.monotonic()
        slow = [asyncio.create_task(slow_client(guarded, head, body, BODY_TIMEOUT + SLACK)) for _ in range(10)]
        await asyncio.sleep(0.5)
        statuses, done = await served(guarded)
        return await asyncio.gather(*slow), statuses, done - began

    cut_after, statuses, served_after = asyncio.run(scenario())
    assert statuses == [200, 200]
    assert served_after < min(cut_after)
    assert all(BODY_TIMEOUT - EARLY <= seconds <= BODY_TIMEOUT + SLACK for seconds in cut_after), cut_after


def test_idle_connections_are_closed(guarded: ServerProcess) -> None:
    """Keep-alive connections idle after a response, after the keep-alive timeout; connections that never send a
    byte, after the header timeout."""
    request = b"GET /health HTTP/1.1\r\nHost: spindle\r\n\r\n"

    async def kept_alive() -> float:
        reader, writer = await connect(guarded)
        asked = time.monotonic()  # the server's keep-alive clock starts later, once it answered
        writer.write(request)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
        try:
            return await asyncio.wait_for(closed_by_server(reader, asked), KEEP_ALIVE_TIMEOUT + SLACK)
        finally:
            writer.close()

    async def silent() -> float:
        started = time.monotonic()
        reader, writer = await connect(guarded)
        try:
            return await asyncio.wait_for(closed_by_server(reader, started), HEADER_TIMEOUT + SLACK)
        finally:
            writer.close()

    async def scenario() -> tuple[list[float], list[float], int]:
        idle = [asyncio.create_task(kept_alive()) for _ in range(40)]  # within the cap, so served
        await asyncio.sleep(0.5)
        never_sent = [asyncio.create_task(silent()) for _ in range(1000)]
        return await asyncio.gather(*idle), await asyncio.gather(*never_sent), await wait_for_capacity(guarded, SLACK)

    kept, never_sent, later = asyncio.run(scenario())
    assert all(KEEP_ALIVE_TIMEOUT - EARLY <= seconds <= KEEP_ALIVE_TIMEOUT + SLACK for seconds in kept), kept
    assert all(HEADER_TIMEOUT - EARLY <= seconds <= HEADER_TIMEOUT + SLACK for seconds in never_sent), (
        min(never_sent),
        max(never_sent),
    )
    assert later == 200  # and every slot is free again


def test_past_the_connection_cap_requests_get_503_at_once(guarded: ServerProcess) -> None:
    async def scenario() -> tuple[httpx.Response, float, int]:
        holders = [await connect(guarded) for _ in range(MAX_CONNECTIONS)]
        try:
            started = time.monotonic()
            async with httpx.AsyncClient(base_url=guarded.url, timeout=30) as client:
                refused = await client.get("/health")
            refused_in = time.monotonic() - started
            return refused, refused_in, await wait_for_capacity(guarded, HEADER_TIMEOUT + SLACK)
        finally:
            for _, writer in holders:
                writer.close()

    refused, refused_in, later = asyncio.run(scenario())
    assert refused.status_code == 503
    assert refused_in < HEADER_TIMEOUT  # answered, not queued until a slot frees
    assert refused.headers["connection"] == "close"
    assert refused.headers["retry-after"]
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("service_unavailable", "too_many_connections")
    assert later == 200  # once the silent holders are cut off at the header timeout


@pytest.fixture(scope="module")
def guarded_router(launch_server: Launcher) -> ServerProcess:
    """The router with the same limits, in front of a replica that never answers: its own /health (503) is what a
    normal client gets."""
    flags = [
        *("--replica", "http://127.0.0.1:9", "--header-read-timeout", str(HEADER_TIMEOUT)),
        *("--keep-alive-timeout", str(KEEP_ALIVE_TIMEOUT), "--max-connections", str(MAX_CONNECTIONS)),
    ]
    router = launch_server("router-connections", flags, command="router")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.TransportError):
            httpx.get(f"{router.url}/health", timeout=1.0)
            return router
        time.sleep(0.2)
    raise RuntimeError(f"the router did not start:\n{router.log_tail()}")


def test_the_router_cuts_off_slow_headers_while_a_normal_client_is_served(guarded_router: ServerProcess) -> None:
    never_ending = b"GET /health HTTP/1.1\r\nHost: spindle\r\nX-Padding: " + b"a" * 4000

    async def scenario() -> tuple[list[float], int, float]:
        began = time.monotonic()
        slow = [
            asyncio.create_task(slow_client(guarded_router, b"", never_ending, HEADER_TIMEOUT + SLACK))
            for _ in range(20)
        ]
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient(base_url=guarded_router.url, timeout=30) as client:
            status = (await client.get("/health")).status_code
        served_after = time.monotonic() - began
        return await asyncio.gather(*slow), status, served_after

    cut_after, status, served_after = asyncio.run(scenario())
    assert status == 503  # answered: no replica is in rotation
    assert served_after < min(cut_after)
    assert all(HEADER_TIMEOUT - EARLY <= seconds <= HEADER_TIMEOUT + SLACK for seconds in cut_after), cut_after


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("header_read_timeout", 0),
        ("body_read_timeout", -1),
        ("keep_alive_timeout", float("nan")),
        ("max_connections", 0),
    ],
)
def test_connection_settings_are_validated(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=field):
        build_config("fp32", {field: value})
