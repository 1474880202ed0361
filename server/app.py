"""The FastAPI application: routes, auth, body-size limit, metrics, and the server's start-up and shutdown."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from importlib.metadata import PackageNotFoundError, version

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from server import openapi
from server.allocator import limit_malloc_arenas, start_heap_trimming
from server.connections import guarded_protocol
from server.errors import APIError, error_response, install_error_handlers
from server.limits import RequestLimits
from server.metrics import EngineMetrics
from server.middleware import ApiKeyAuth, BodySizeLimit, ConcurrencyLimit, RefuseWhileDraining
from server.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from server.response_store import ResponseStore
from server.responses import ResponsesServing
from server.responses_protocol import STREAM_EVENTS, ResponseDeleted, ResponseObject, ResponsesRequest
from server.serving_chat import ChatServing
from server.serving_completions import CompletionServing

logger = logging.getLogger("spindle.server")

# After server.shutdown_timeout the engine aborts what is still running, which ends every response in-band; the drain
# waits at most this much longer for the requests in flight before uvicorn cancels what is left.
SHUTDOWN_BACKSTOP_SECONDS = 5.0
_API_PATHS = ("/v1", "/tokenize", "/detokenize")
_OPS_PATHS = ("/health", "/metrics")


def spindle_version() -> str:
    try:
        return version("spindle")
    except PackageNotFoundError:
        return "unknown"


def create_app(
    engine: AsyncEngine, config: EngineConfig, metrics: EngineMetrics, engine_thread: bool = True
) -> FastAPI:
    """The app; with ``engine_thread`` its start-up starts the engine loop in a thread of its own, otherwise the
    caller runs the loop (``AsyncEngine.run``)."""
    server_config = config.server
    limits = RequestLimits(server_config, engine.tokenizer, engine.max_model_len, config.scheduler.max_waiting_requests)
    completion_serving = CompletionServing(engine, engine.model_name, limits, server_config.log_prompts)
    # Chat's also serves the model checks and /tokenize, which may render messages with its chat template.
    chat_serving = ChatServing(engine, engine.model_name, limits, server_config.log_prompts)
    store = ResponseStore(server_config.max_stored_responses)  # Responses API objects, per API key
    responses = ResponsesServing(chat_serving, store, keyed=bool(server_config.api_keys))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if engine_thread:
            engine.start()
        yield
        engine.stop(timeout=server_config.shutdown_timeout)

    app = FastAPI(title="Spindle", version=spindle_version(), lifespan=lifespan)
    # Starlette runs the last middleware added first: the key check, then the cap per key, then the refusal while
    # shutting down, then the body size.
    app.add_middleware(BodySizeLimit, limit=server_config.max_request_body_bytes)
    app.add_middleware(
        RefuseWhileDraining,
        draining=lambda: engine.is_draining,
        reason=lambda: engine.unavailable_reason,
        refused=lambda path: path.startswith(_API_PATHS),
    )
    api_keys = server_config.api_keys
    if server_config.max_concurrent_requests_per_key is not None:
        app.add_middleware(
            ConcurrencyLimit,
            limit=server_config.max_concurrent_requests_per_key,
            limited=lambda path: path.startswith(_API_PATHS),
            per_key=bool(api_keys),
        )
    if api_keys:
        prefixes = _API_PATHS + (_OPS_PATHS if server_config.auth_health_and_metrics else ())
        app.add_middleware(ApiKeyAuth, api_keys=api_keys, protected=lambda path: path.startswith(prefixes))
    install_error_handlers(app)
    openapi.customize(app, [CompletionResponse, ChatCompletionChunk, *STREAM_EVENTS])
    ops_errors = openapi.errors(401, 413) if api_keys and server_config.auth_health_and_metrics else openapi.errors(413)
    api_errors = openapi.errors(400, 401, 404, 413, 429)

    @app.get("/health", responses={200: {"description": "serving"}} | openapi.errors(503) | ops_errors)
    async def health() -> Response:
        if engine.is_running:
            return JSONResponse({"status": "ok"})
        return error_response(503, engine.unavailable_reason)

    @app.get("/version", responses=openapi.errors(413))
    async def get_version() -> dict[str, str]:
        return {"version": spindle_version()}

    @app.get("/metrics", response_class=PlainTextResponse, responses=ops_errors)
    async def get_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=api_errors)
    async def list_models() -> ModelList:
        return ModelList(data=[ModelCard(id=chat_serving.model_name, max_model_len=chat_serving.max_model_len)])

    # The path converter keeps a slash in a model id ("org/name"), as OpenAI's and vLLM's ids may have one.
    @app.get("/v1/models/{model:path}", responses=api_errors)
    async def retrieve_model(model: str) -> ModelCard:
        chat_serving.check_model(model)
        return ModelCard(id=chat_serving.model_name, max_model_len=chat_serving.max_model_len)

    @app.post("/tokenize", responses=api_errors)
    async def tokenize(request: TokenizeRequest) -> TokenizeResponse:
        chat_serving.check_model(request.model)
        if (request.prompt is None) == (request.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if request.messages is not None:
            tokens = chat_serving.chat_prompt(request.messages, request.add_generation_prompt)
        else:
            prompt = request.prompt or ""
            limits.check_text(prompt, "prompt")
            tokens = chat_serving.tokenizer.encode(prompt, add_special_tokens=request.add_special_tokens)
        return TokenizeResponse(tokens=tokens, count=len(tokens), max_model_len=chat_serving.max_model_len)

    @app.post("/detokenize", responses=api_errors)
    async def detokenize(request: DetokenizeRequest) -> DetokenizeResponse:
        chat_serving.check_model(request.model)
        vocab = chat_serving.tokenizer.vocab_size
        if any(not 0 <= t < vocab for t in request.tokens):
            raise APIError(400, f"token ids must be in [0, {vocab})", param="tokens")
        return DetokenizeResponse(prompt=chat_serving.tokenizer.decode(request.tokens))

    @app.post("/v1/completions", responses=openapi.generation(CompletionResponse, CompletionResponse))
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return _respond(await completion_serving.create_completion(body, request.is_disconnected))

    @app.post("/v1/chat/completions", responses=openapi.generation(ChatCompletionResponse, ChatCompletionChunk))
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return _respond(await chat_serving.create_chat_completion(body, request.is_disconnected))

    @app.post("/v1/responses", responses=openapi.typed_events(ResponseObject, STREAM_EVENTS))
    async def create_response(body: ResponsesRequest, request: Request) -> Response:
        return _respond(await responses.create(body, request))

    @app.get("/v1/responses/{response_id}", responses=api_errors)
    async def retrieve_response(response_id: str, request: Request, stream: bool = False) -> ResponseObject:
        if stream:
            raise APIError(400, "a stored response cannot be streamed again", param="stream")
        return responses.retrieve(response_id, request)

    @app.delete("/v1/responses/{response_id}", responses=api_errors)
    async def delete_response(response_id: str, request: Request) -> ResponseDeleted:
        return responses.delete(response_id, request)

    return app


def _respond(result: BaseModel | Response) -> Response:
    return JSONResponse(result.model_dump()) if isinstance(result, BaseModel) else result


def build_server(config: EngineConfig, engine_thread: bool = True) -> tuple[FastAPI, AsyncEngine]:
    llm_engine = LLMEngine(config)
    cache = config.cache
    metrics = EngineMetrics(
        llm_engine.model_name,
        kv_policy=cache.kv_policy,
        kv_budget=cache.kv_budget,
        kv_codec=cache.codec_settings().describe(),
        kv_bytes_per_token=llm_engine.kv_layout.bytes_per_token,
    )
    aging = config.server.priority_aging_seconds
    engine = AsyncEngine(llm_engine, observer=metrics.observe, priority_aging_seconds=aging)
    return create_app(engine, config, metrics, engine_thread), engine


class _DrainingServer(uvicorn.Server):
    """Uvicorn, draining on shutdown: the engine refuses new work and bounds in-flight work at once, and the server
    keeps listening until the requests in flight end, so that meanwhile /health and new requests get 503 (a closed
    port would look like a crash to a load balancer)."""

    def __init__(self, config: uvicorn.Config, engine: AsyncEngine, grace: float) -> None:
        super().__init__(config)
        self.engine = engine
        self.grace = grace

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self.engine.drain(self.grace)
        await self._drain()
        await super().shutdown(sockets)  # stops listening, closes idle connections

    async def _drain(self) -> None:
        in_flight = [task for task in self.server_state.tasks if not task.done()]
        logger.info("Draining %d request(s) in flight; new requests get 503", len(in_flight))
        deadline = time.monotonic() + self.grace + SHUTDOWN_BACKSTOP_SECONDS
        while any(not task.done() for task in in_flight) and not self.force_exit and time.monotonic() < deadline:
            await asyncio.sleep(0.1)


def run_server(config: EngineConfig) -> None:
    """Serve until SIGTERM or SIGINT: HTTP from a thread of its own, the engine loop from this (the main) thread,
    where PyTorch's thread team runs fastest (engine/async_engine.py says why). Exits 1 if the HTTP server could
    not start (e.g. its port is taken)."""
    limit_malloc_arenas()  # before the engine and HTTP threads start
    app, engine = build_server(config, engine_thread=False)
    start_heap_trimming()
    server = config.server
    uvicorn_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        http=guarded_protocol(server),
        timeout_keep_alive=server.keep_alive_timeout,  # type: ignore[arg-type]  # a float works: it is a delay
        timeout_graceful_shutdown=1,  # after the drain: for requests answered 503 meanwhile
    )
    http = _DrainingServer(uvicorn_config, engine, server.shutdown_timeout)

    def serve_http() -> None:
        try:
            http.run()
        finally:
            engine.stop()  # the HTTP server is gone (shut down, or never started): so is the engine loop

    for sig in (signal.SIGINT, signal.SIGTERM):  # a second SIGINT cuts the graceful shutdown short
        signal.signal(sig, http.handle_exit)
    http_thread = threading.Thread(target=serve_http, name="spindle-http")
    http_thread.start()
    try:
        engine.run()
        http_thread.join()
    finally:
        engine.close()  # tensor-parallel workers leave with the server
    if not http.started:
        raise SystemExit(1)
