"""The server's HTTP/1.1 connections: uvicorn's h11 protocol with read timeouts and a cap on open connections, so that
slow or idle clients cannot hold connections (uvicorn itself bounds only the idle time after a response)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, ClassVar, Literal

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from engine.config import ServerConfig
from server.errors import RETRY_AFTER_SECONDS, error_response

logger = logging.getLogger("spindle.server")


class GuardedH11Protocol(H11Protocol):
    """One connection. A request's headers are due within ``header_read_timeout`` (from connecting, or from the
    request's first byte on a kept-alive connection) and its body within ``body_read_timeout`` once the headers are
    in; past either the connection is closed. A connection opened past ``max_connections`` has its request answered
    503 and is closed."""

    settings: ClassVar[ServerConfig]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._awaiting: Literal["headers", "body"] | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        limit = self.settings.max_connections
        if len(self.connections) > limit:
            self.app = error_response(  # type: ignore[assignment]  # a Starlette response is an ASGI app
                503,
                f"too many open connections: at most {limit}",
                code="too_many_connections",
                headers={"Retry-After": RETRY_AFTER_SECONDS, "Connection": "close"},
            )
        self._expect("headers")

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._awaiting is None and self.conn.their_state is h11.IDLE:
            self._expect("headers")  # the first bytes of another request on a kept-alive connection
        super().data_received(data)
        self._follow_request()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._follow_request()  # a pipelined request may have been read meanwhile

    def _follow_request(self) -> None:
        """Its headers in, the body is due; once it is all read, nothing is (a response is not the client's to
        hurry). While the headers are still coming, their deadline stands."""
        state = self.conn.their_state
        if state is h11.SEND_BODY:
            if self._awaiting != "body":
                self._expect("body")
        elif state is not h11.IDLE:
            self._cancel()

    def _expect(self, part: Literal["headers", "body"]) -> None:
        self._cancel()
        timeout = self.settings.header_read_timeout if part == "headers" else self.settings.body_read_timeout
        self._awaiting = part
        self._deadline = self.loop.call_later(timeout, self._expire)

    def _cancel(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = None
        self._awaiting = None

    def _expire(self) -> None:
        logger.debug("closing a connection: the request's %s took longer than their timeout", self._awaiting)
        self._deadline = None
        self._awaiting = None
        self.transport.close()  # a request being read sees a disconnect


def guarded_protocol(settings: ServerConfig) -> type[GuardedH11Protocol]:
    """The protocol class for uvicorn's ``http`` setting, bound to these settings."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"settings": settings})
