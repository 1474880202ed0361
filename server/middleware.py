"""ASGI middleware that guards the app before a request is parsed: body size, API keys, requests in flight per key,
shutdown."""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Callable, Sequence

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.errors import RETRY_AFTER_SECONDS, error_response


def bearer_token(scope: Scope) -> bytes:
    """The token of an ``Authorization: Bearer <token>`` header; empty without one."""
    header = dict(scope.get("headers") or []).get(b"authorization", b"")
    scheme, _, token = header.partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else b""


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length up front or while reading a streamed body.

    The body is read here in full before the app sees it, so an oversized chunked body is refused before any
    parsing (the app would otherwise report the interrupted read as a malformed body).
    """

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(scope, receive, send)
            return
        body = await self._read_body(receive)
        if body is None:
            await self._refuse(scope, receive, send)
            return
        pending: Message | None = {"type": "http.request", "body": body, "more_body": False}

        async def replay() -> Message:
            nonlocal pending
            if pending is None:
                return await receive()  # after the body: disconnect notices
            message, pending = pending, None
            return message

        await self.app(scope, replay, send)

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body; None once it exceeds the limit, or if the client left mid-body (then nobody listens)."""
        chunks: list[bytes] = []
        size = 0
        more_body = True
        while more_body:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return None
            more_body = message.get("more_body", False)
        return b"".join(chunks)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(413, f"request body larger than {self.limit} bytes")
        await response(scope, receive, send)


class ApiKeyAuth:
    """Bearer-token auth for the paths ``protected`` selects, checked before anything reads the request."""

    def __init__(self, app: ASGIApp, api_keys: Sequence[str], protected: Callable[[str], bool]) -> None:
        self.app = app
        self.expected = [key.encode() for key in api_keys]
        self.protected = protected

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.protected(scope["path"]) and not self._authorized(scope):
            response = error_response(
                401,
                "missing or invalid API key (send 'Authorization: Bearer <key>')",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _authorized(self, scope: Scope) -> bool:
        token = bearer_token(scope)
        matched = False
        for key in self.expected:  # constant time per key, and every key is tried: timing tells nothing
            matched |= hmac.compare_digest(token, key)
        return matched


class ConcurrencyLimit:
    """At most ``limit`` requests in flight per API key on the paths ``limited`` selects; 429 past it.

    It runs after the key check, so the bearer token is a valid key; with ``per_key`` off (no keys configured) all
    clients share one count. A streamed response counts until its last event is sent or its client leaves.
    """

    def __init__(self, app: ASGIApp, limit: int, limited: Callable[[str], bool], per_key: bool) -> None:
        self.app = app
        self.limit = limit
        self.limited = limited
        self.per_key = per_key
        self.in_flight: Counter[bytes] = Counter()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.limited(scope["path"]):
            await self.app(scope, receive, send)
            return
        key = bearer_token(scope) if self.per_key else b""
        if self.in_flight[key] >= self.limit:
            response = error_response(
                429,
                f"too many requests in flight: at most {self.limit} at once per API key",
                code="rate_limit_exceeded",
                headers={"Retry-After": RETRY_AFTER_SECONDS},
            )
            await response(scope, receive, send)
            return
        self.in_flight[key] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight[key] -= 1
            if not self.in_flight[key]:
                del self.in_flight[key]


class RefuseWhileDraining:
    """Once shutdown began, 503 ``engine_unavailable`` for new requests on the paths ``refused`` selects, which
    the drain would otherwise serve (those that need no engine) or queue; in-flight requests are not affected."""

    def __init__(
        self, app: ASGIApp, draining: Callable[[], bool], reason: Callable[[], str], refused: Callable[[str], bool]
    ) -> None:
        self.app = app
        self.draining = draining
        self.reason = reason
        self.refused = refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.draining() and self.refused(scope["path"]):
            # Connection: close moves the client's next request to a new connection (maybe to another replica).
            headers = {"Retry-After": RETRY_AFTER_SECONDS, "Connection": "close"}
            response = error_response(503, self.reason(), code="engine_unavailable", headers=headers)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)
