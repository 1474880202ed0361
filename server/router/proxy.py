"""Forwarding one request to a replica: retried on the next replica until its response starts, relayed byte for byte
after that.

A response has started once the router has sent anything of it to the client: for a non-streamed response that is
when the whole body has arrived from the replica, for an event stream when its first chunk has. Until then a
replica that cannot be reached, drops the connection or answers 502/503/504 costs the client nothing: the request
goes to the next replica. Once a stream is relayed, a replica that fails ends it with an error event and
``[DONE]``, the way a replica reports its own failures mid-stream.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass

import anyio
import httpx
from fastapi.responses import Response
from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.errors import RETRY_AFTER_SECONDS, error_body, error_response
from server.metrics import RouterMetrics
from server.router.pool import Replica, ReplicaPool

# Retried elsewhere: a gateway failure, or a replica that is draining, not serving or has a full queue.
RETRYABLE_STATUSES = frozenset({502, 503, 504})
# Hop-by-hop headers (RFC 9110, 7.6.1) and those the next hop recomputes.
_DROPPED_HEADERS = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "date",
        "server",
    }
)
# A header's str stands for its bytes one for one, as Starlette reads them: a value past ASCII, which HTTP allows,
# passes through unchanged (httpx would encode str as ASCII, and fail on it).
_HEADER_ENCODING = "latin-1"


def forwarded_headers(headers: httpx.Headers | list[tuple[str, str]] | dict[str, str]) -> dict[str, str]:
    """End-to-end headers (Authorization among them) to pass on, in either direction."""
    kept = httpx.Headers(headers, encoding=_HEADER_ENCODING).items()
    return {name: value for name, value in kept if name.lower() not in _DROPPED_HEADERS}


@dataclass(frozen=True)
class UpstreamRequest:
    method: str
    path: str  # percent-encoded, without dot segments (httpx would drop them), with the query string
    headers: dict[str, str]
    body: bytes


class RelayedStream(StreamingResponse):
    """An event stream relayed from a replica; however the client's connection ends, the replica's is closed, which
    aborts the request there."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()  # type: ignore[attr-defined]  # an async generator


class Proxy:
    def __init__(self, pool: ReplicaPool, client: httpx.AsyncClient, metrics: RouterMetrics) -> None:
        self.pool = pool
        self.client = client
        self.metrics = metrics

    async def forward(self, request: UpstreamRequest, replicas: list[Replica]) -> Response:
        """The first response that starts, trying ``replicas`` in order."""
        if not replicas:
            self.metrics.unserved.inc()
            down = ", ".join(replica.url for replica in self.pool.replicas)
            return _unavailable(f"no healthy replica: every replica failed its health check ({down})")
        refused: Response | None = None
        for number, replica in enumerate(replicas):
            if number:
                self.metrics.retries.labels(replica.url).inc()
            self.metrics.requests.labels(replica.url).inc()
            response = await self._attempt(request, replica)
            if response is None:
                continue
            if response.status_code not in RETRYABLE_STATUSES:
                return response
            refused = response
        if refused is not None:
            return refused  # every replica refused: the last refusal, as its replica gave it (with Retry-After)
        self.metrics.unserved.inc()
        return _unavailable(f"no replica could take the request (tried {len(replicas)})")

    async def _attempt(self, request: UpstreamRequest, replica: Replica) -> Response | None:
        """The replica's response, or None if the replica failed before it started."""
        replica.in_flight += 1
        relaying = False
        upstream: httpx.Response | None = None
        try:
            upstream = await self.client.send(
                self.client.build_request(
                    request.method,
                    replica.url + request.path,
                    headers=httpx.Headers(request.headers, encoding=_HEADER_ENCODING),
                    content=request.body,
                ),
                stream=True,
            )
            chunks = upstream.aiter_raw()
            if upstream.headers.get("content-type", "").startswith("text/event-stream"):
                first = await anext(chunks)  # a replica that dies before its first event is retried
                relaying = True
                return RelayedStream(
                    self._relay(first, chunks, upstream, replica),
                    status_code=upstream.status_code,
                    headers=forwarded_headers(upstream.headers),
                )
            body = b"".join([chunk async for chunk in chunks])
            return Response(body, status_code=upstream.status_code, headers=forwarded_headers(upstream.headers))
        except (httpx.TransportError, StopAsyncIteration) as exc:
            self.pool.mark_failed(replica, f"{type(exc).__name__} while forwarding {request.path}")
            return None
        finally:
            if not relaying:  # the relay owns the response and the count from here on
                replica.in_flight -= 1
                if upstream is not None:
                    with anyio.CancelScope(shield=True):
                        await upstream.aclose()

    async def _relay(
        self, first: bytes, chunks: AsyncIterator[bytes], upstream: httpx.Response, replica: Replica
    ) -> AsyncIterator[bytes]:
        last = first
        try:
            yield first
            async for chunk in chunks:
                last = chunk
                yield chunk
        except httpx.TransportError as exc:
            self.metrics.stream_failures.labels(replica.url).inc()
            self.pool.mark_failed(replica, f"{type(exc).__name__} while relaying a stream")
            # The replica may have died mid-event: close that event first, so the error is an event of its own.
            separator = b"" if last.endswith(b"\n\n") else b"\n\n"
            error = error_body(502, "the replica serving this stream failed; the stream is incomplete")
            yield separator + b"data: " + json.dumps(error).encode() + b"\n\ndata: [DONE]\n\n"
        finally:
            replica.in_flight -= 1
            with anyio.CancelScope(shield=True):
                await upstream.aclose()


def _unavailable(message: str) -> Response:
    return error_response(503, message, code="no_healthy_replica", headers={"Retry-After": RETRY_AFTER_SECONDS})
