"""The FastAPI application: routes, auth, body-size limit, metrics, and the server's start-up and shutdown."""

from __future__ import annotations

import hmac
import logging
import math
import signal
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version
from types import FrameType

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.errors import APIError, error_response, install_error_handlers
from server.metrics import EngineMetrics
from server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.serving import Serving

logger = logging.getLogger("spindle.server")

# After server.shutdown_timeout the engine aborts what is still running, which ends every response in-band; uvicorn
# cancels whatever is left only this much later, as a backstop.
SHUTDOWN_BACKSTOP_SECONDS = 5.0
_API_PATHS = ("/v1", "/tokenize", "/detokenize")
_OPS_PATHS = ("/health", "/metrics")


def spindle_version() -> str:
    try:
        return version("spindle")
    except PackageNotFoundError:
        return "unknown"


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

    def __init__(self, app: ASGIApp, api_key: str, protected: Callable[[str], bool]) -> None:
        self.app = app
        self.expected = api_key.encode()
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
        header = dict(scope.get("headers") or []).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected)


def create_app(engine: AsyncEngine, config: EngineConfig, metrics: EngineMetrics) -> FastAPI:
    server_config = config.server
    serving = Serving(engine, engine.engine.model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.stop(timeout=server_config.shutdown_timeout)

    app = FastAPI(title="Spindle", version=spindle_version(), lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=server_config.max_request_body_bytes)
    if server_config.api_key:
        prefixes = _API_PATHS + (_OPS_PATHS if server_config.auth_health_and_metrics else ())
        app.add_middleware(ApiKeyAuth, api_key=server_config.api_key, protected=lambda path: path.startswith(prefixes))
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return error_response(503, engine.unavailable_reason)

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": spindle_version()}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=serving.model_name, max_model_len=serving.max_model_len)])

    @app.post("/tokenize")
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            tokens = serving.chat_prompt(request.messages, request.add_generation_prompt)
        else:
            tokens = serving.tokenizer.encode(request.prompt or "", add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=serving.max_model_len)

    @app.post("/detokenize")
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(request.model)
        vocab = serving.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(request.tokens))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await serving.create_completion(body, request.is_disconnected))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await serving.create_chat_completion(body, request.is_disconnected))

    return app


def _respond(result: BaseModel | Response) -> Response:
    return JSONResponse(result.model_dump()) if isinstance(result, BaseModel) else result


def build_server(config: EngineConfig) -> tuple[FastAPI, AsyncEngine]:
    llm_engine = LLMEngine(config)
    cache = config.cache
    metrics = EngineMetrics(llm_engine.model_name, kv_policy=cache.kv_policy, kv_budget=cache.kv_budget)
    engine = AsyncEngine(llm_engine, observer=metrics.observe)
    return create_app(engine, config, metrics), engine


class _DrainingServer(uvicorn.Server):
    """Uvicorn, with the engine refusing new work and bounding in-flight work as soon as shutdown begins."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain(self.grace)
        await super().shutdown(sockets)


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def run_server(config: EngineConfig) -> None:
    app, engine = build_server(config)
    server = config.server
    uvicorn_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        timeout_graceful_shutdown=math.ceil(server.shutdown_timeout + SHUTDOWN_BACKSTOP_SECONDS),
    )
    # Uvicorn re-raises SIGTERM once its graceful shutdown is done; a served-out SIGTERM is a clean exit (status 0).
    signal.signal(signal.SIGTERM, _exit_cleanly)
    _DrainingServer(uvicorn_config, engine, server.shutdown_timeout).run()
