"""The FastAPI application: routes, auth, body-size limit, metrics, and the server's start-up and shutdown."""

from __future__ import annotations

import hmac
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server.errors import APIError, error_body, install_error_handlers
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


def spindle_version() -> str:
    try:
        return version("spindle")
    except PackageNotFoundError:
        return "unknown"


class BodySizeLimit:
    """Refuse bodies over ``limit`` bytes with 413, by Content-Length up front or by counting a streamed body."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send)
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:
                raise _BodyTooLarge
            return message

        try:
            await self.app(scope, counting_receive, send)
        except _BodyTooLarge:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        response = JSONResponse(error_body(413, f"request body larger than {self.limit} bytes"), status_code=413)
        await response({"type": "http"}, _no_receive, send)


class _BodyTooLarge(Exception):
    pass


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def create_app(engine: AsyncEngine, config: EngineConfig, metrics: EngineMetrics) -> FastAPI:
    server_config = config.server
    serving = Serving(engine, engine.engine.model_name)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if not engine.is_running and engine.error is None:
            engine.start()
        yield
        engine.stop(timeout=server_config.shutdown_timeout)

    app = FastAPI(title="Spindle", version=spindle_version(), lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=server_config.max_request_body_bytes)
    install_error_handlers(app)

    async def require_key(request: Request) -> None:
        expected = server_config.api_key
        if not expected:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), expected.encode()):
            raise APIError(
                401, "missing or invalid API key (send 'Authorization: Bearer <key>')", code="invalid_api_key"
            )

    async def require_key_for_ops(request: Request) -> None:
        if server_config.auth_health_and_metrics:
            await require_key(request)

    api = [Depends(require_key)]
    ops = [Depends(require_key_for_ops)]

    @app.get("/health", dependencies=ops)
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return JSONResponse(error_body(503, f"the engine is not serving: {engine.error or 'stopped'}"), 503)

    @app.get("/version")
    async def get_version() -> dict:
        return {"version": spindle_version()}

    @app.get("/metrics", dependencies=ops)
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=api)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=serving.model_name, max_model_len=serving.max_model_len)])

    @app.post("/tokenize", dependencies=api)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        serving.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            chat = ChatCompletionRequest(messages=request.messages, add_generation_prompt=request.add_generation_prompt)
            tokens = serving.chat_prompt(chat)
        else:
            tokens = serving.tokenizer.encode(request.prompt or "", add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=serving.max_model_len)

    @app.post("/detokenize", dependencies=api)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        serving.check_model(request.model)
        vocab = serving.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=serving.tokenizer.decode(request.tokens))

    @app.post("/v1/completions", dependencies=api)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        result = await serving.create_completion(body, request.is_disconnected)
        return _respond(result)

    @app.post("/v1/chat/completions", dependencies=api)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        result = await serving.create_chat_completion(body, request.is_disconnected)
        return _respond(result)

    return app


def _respond(result: object) -> Response:
    if hasattr(result, "model_dump"):
        return JSONResponse(result.model_dump())  # type: ignore[attr-defined]
    return StreamingResponse(result, media_type="text/event-stream")  # type: ignore[arg-type]


def build_server(config: EngineConfig) -> tuple[FastAPI, AsyncEngine]:
    llm_engine = LLMEngine(config)
    metrics = EngineMetrics(llm_engine.model_name)
    engine = AsyncEngine(llm_engine, observer=metrics.observe)
    return create_app(engine, config, metrics), engine


def run_server(config: EngineConfig) -> None:
    import uvicorn

    app, _ = build_server(config)
    server = config.server
    uvicorn.run(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        timeout_graceful_shutdown=int(server.shutdown_timeout),
    )
