"""Stand-ins for Spindle replicas, for the router's tests: small FastAPI apps that answer, refuse, stall or drop the
connection on demand, and record what reached them. Each runs under uvicorn in a thread on a loopback port. And
``raw_get``, which sends a path as written."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

EVENTS_PER_STREAM = 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def serving(app: Any) -> Iterator[str]:
    """``app`` under uvicorn on a loopback port, for the duration of the block; yields its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the app did not start"
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)


def raw_get(base: str, target: str, headers: dict[str, str | bytes] | None = None) -> tuple[int, bytes]:
    """GET ``target`` sent as written: httpx drops dot segments from a URL's path (raw_path too), http.client
    does not; it also sends header values outside ASCII, which httpx refuses."""
    url = httpx.URL(base)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=30)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


@dataclass
class FakeReplica:
    name: str
    healthy: bool = True  # /health answers 200, else 503
    status: int = 200  # what the completion routes answer (an error body unless 200)
    drop_after_events: int | None = None  # a stream's connection is cut after this many events
    drop_mid_event: bool = False  # ... and after half of the next one
    stall: bool = False  # hold every request open until the client leaves
    running: int = 0  # reported as spindle:num_requests_running
    received: list[dict[str, Any]] = field(default_factory=list)  # each request: path, raw_path, authorization, body
    client_gone: threading.Event = field(default_factory=threading.Event)  # a stalled request saw its client leave

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> Response:
            return JSONResponse({"status": "ok"} if self.healthy else {"error": "down"}, 200 if self.healthy else 503)

        @app.get("/metrics")
        async def metrics() -> Response:
            lines = [
                "# TYPE spindle:num_requests_running gauge",
                f'spindle:num_requests_running{{model_name="fake"}} {self.running}',
                "# TYPE spindle:num_requests_waiting gauge",
                'spindle:num_requests_waiting{model_name="fake"} 0',
            ]
            return PlainTextResponse("\n".join(lines) + "\n")

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            self._record(request)
            return JSONResponse({"object": "list", "data": [{"id": "fake", "object": "model"}]})

        @app.get("/v1/models/{model:path}")
        async def retrieve_model(model: str, request: Request) -> Response:
            self._record(request)
            return JSONResponse({"id": model, "object": "model"})

        @app.post("/v1/completions")
        @app.post("/v1/chat/completions")
        async def generate(request: Request) -> Response:
            record = self._record(request)
            body = _json_object(await request.body())
            if body is None:  # as a replica answers a body it cannot parse, or text that is not Unicode
                return _error(400, f"{self.name}: malformed JSON body")
            record["body"] = body
            if self.status != 200:
                return _error(self.status, f"{self.name} refuses", headers={"Retry-After": "7"})
            if body.get("stream"):
                return StreamingResponse(self._events(), media_type="text/event-stream")
            if self.stall:
                while not await request.is_disconnected():
                    await asyncio.sleep(0.05)
                self.client_gone.set()
            return JSONResponse({"replica": self.name, "echo": body})

        return app

    def _record(self, request: Request) -> dict[str, Any]:
        """Notes the request (its path as decoded and as sent) in ``received``; the record is returned to add to."""
        record = {
            "path": request.scope["path"],  # decoded, as routed (request.url.path re-encodes it)
            "raw_path": request.scope["raw_path"].decode(),
            "authorization": request.headers.get("authorization"),
        }
        self.received.append(record)
        return record

    async def _events(self) -> AsyncIterator[str]:
        try:
            for index in range(EVENTS_PER_STREAM):
                # Split in two writes, so that a relay sees an event arrive in pieces.
                if index == self.drop_after_events and not self.drop_mid_event:
                    raise ConnectionAbortedError("the fake replica drops the stream")  # uvicorn cuts the connection
                yield f'data: {{"replica": "{self.name}", '
                if index == self.drop_after_events:
                    raise ConnectionAbortedError("the fake replica drops the stream mid-event")
                yield f'"index": {index}}}\n\n'
                if self.stall:
                    await asyncio.sleep(3600)
            yield "data: [DONE]\n\n"
        except asyncio.CancelledError:
            self.client_gone.set()
            raise


def _json_object(body: bytes) -> dict[str, Any] | None:
    """The body's JSON object; None if it is not one, is nested too deep to parse or holds a lone surrogate."""
    try:
        parsed = json.loads(body)
        json.dumps(parsed, ensure_ascii=False).encode()  # a lone surrogate has no UTF-8 form
    except (ValueError, RecursionError):
        return None
    return parsed if isinstance(parsed, dict) else None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    error = {"error": {"message": message, "type": "x", "param": None, "code": None}}
    return JSONResponse(error, status_code=status, headers=headers)
