"""``spindle router``: one OpenAI-compatible endpoint in front of several Spindle replicas."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import signal
import urllib.parse
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from types import FrameType
from typing import Any

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from engine.config import EngineConfig
from engine.errors import ConfigError
from server.app import spindle_version
from server.connections import guarded_protocol
from server.errors import error_response, install_error_handlers
from server.metrics import RouterMetrics
from server.middleware import BodySizeLimit
from server.router.policy import build_policy, prefix_key
from server.router.pool import ReplicaPool
from server.router.proxy import Proxy, RelayedStream, UpstreamRequest, forwarded_headers

logger = logging.getLogger("spindle.router")

# No read timeout: a long generation streams for minutes, and a non-streamed one is silent until it is done.
_UPSTREAM_TIMEOUT = httpx.Timeout(connect=5.0, read=None, write=30.0, pool=None)
_CLIENT_CLOSED_REQUEST = 499  # nginx's status for a response nobody is left to read
# The replicas' API, passed on to a replica. Only these: any other path is the router's own or a 404.
_FORWARDED_ROUTES = (
    ("/v1/models", "GET"),
    ("/v1/models/{model:path}", "GET"),
    ("/v1/completions", "POST"),
    ("/v1/chat/completions", "POST"),
    ("/tokenize", "POST"),
    ("/detokenize", "POST"),
)


def create_router_app(config: EngineConfig) -> FastAPI:
    settings = config.router
    urls = settings.replica_urls
    if not urls:
        raise ConfigError("spindle router needs at least one replica: --replica URL (repeat it for more)")
    client = httpx.AsyncClient(timeout=_UPSTREAM_TIMEOUT, limits=httpx.Limits(max_connections=None))
    poll_headers = {"Authorization": f"Bearer {settings.replica_api_key}"} if settings.replica_api_key else None
    pool = ReplicaPool(urls, client, poll_headers)
    metrics = RouterMetrics()
    proxy = Proxy(pool, client, metrics)
    policy = build_policy(settings.routing_policy, settings.load_factor)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await pool.check_all()  # serve with the replicas that are up now
        logger.info(
            "routing (%s) over %d replicas, %d healthy", settings.routing_policy, len(urls), len(pool.healthy())
        )
        polling = asyncio.create_task(pool.poll_forever(settings.health_check_interval))
        yield
        polling.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await polling
        await client.aclose()

    app = FastAPI(title="Spindle router", version=spindle_version(), lifespan=lifespan)
    app.add_middleware(BodySizeLimit, limit=config.server.max_request_body_bytes)
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        healthy = len(pool.healthy())
        if healthy:
            return JSONResponse({"status": "ok", "replicas": len(urls), "healthy_replicas": healthy})
        return error_response(503, f"no healthy replica (of {len(urls)})", code="no_healthy_replica")

    @app.get("/version")
    async def get_version() -> dict[str, str]:
        return {"version": spindle_version()}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def get_metrics() -> Response:
        for replica in pool.replicas:
            metrics.observe_replica(replica.url, replica.healthy, replica.load)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    async def forward(request: Request) -> Response:
        path = request.scope["path"]  # decoded, as the route matched it (request.url.path is re-encoded)
        if _has_dot_segment(path):
            return error_response(404, "Not Found: a path with a '.' or '..' segment names no route")
        body = await request.body()
        key = _routing_key(path, body, settings.prefix_chars)
        target = _target(path, request.scope["query_string"])
        upstream = UpstreamRequest(request.method, target, forwarded_headers(request.headers.items()), body)
        return await _unless_disconnected(request, proxy.forward(upstream, policy.order(pool.healthy(), key)))

    for path, method in _FORWARDED_ROUTES:
        app.add_api_route(path, forward, methods=[method], include_in_schema=False)
    return app


def _has_dot_segment(path: str) -> bool:
    """Whether ``path`` (decoded: "%2e%2e" and "..%2f" count) would lose segments to normalisation, as httpx
    normalises every URL it sends: "/v1/models/../../metrics" would reach the replica's /metrics."""
    return any(segment in (".", "..") for segment in path.split("/"))


def _target(path: str, query_string: bytes) -> str:
    """The matched ``path``, percent-encoded again so that the replica decodes it to the same path (a "%252e" the
    router decoded to "%2e" must not reach the replica as "."), with the query string as the client sent it."""
    target = urllib.parse.quote(path, safe="/")
    return f"{target}?{query_string.decode('latin-1')}" if query_string else target


def _routing_key(path: str, body: bytes, prefix_chars: int) -> bytes | None:
    """The request's prefix key; None for a body the router cannot parse (the replica answers that with a 400)."""
    try:
        return prefix_key(path, json.loads(body) if body else None, prefix_chars)
    except (ValueError, RecursionError):  # not JSON, or nested deeper than Python parses
        return None


async def _unless_disconnected(request: Request, forwarding: Coroutine[Any, Any, Response]) -> Response:
    """The forwarded response, or, if the client leaves first, the forwarding cancelled (which closes the replica's
    connection, so the replica aborts the request)."""
    task = asyncio.ensure_future(forwarding)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the server is shutting down
        task.cancel()
        raise
    finally:
        watch.cancel()
    if task.done():
        return task.result()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        response = await task  # it may have finished meanwhile: then its stream is closed unread
        if isinstance(response, RelayedStream):
            await response.body_iterator.aclose()  # type: ignore[attr-defined]  # an async generator
    return Response(status_code=_CLIENT_CLOSED_REQUEST)


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """Uvicorn re-raises SIGTERM once its graceful shutdown is done: a served-out SIGTERM is a clean exit (0)."""
    raise SystemExit(0)


def run_router(config: EngineConfig) -> None:
    app = create_router_app(config)
    server = config.server
    uvicorn_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        log_level=server.log_level,
        timeout_graceful_shutdown=math.ceil(server.shutdown_timeout),
        # the server's read timeouts and connection cap: slow or idle clients hold no connection here either
        http=guarded_protocol(server),
        timeout_keep_alive=server.keep_alive_timeout,  # type: ignore[arg-type]  # a float works: it is a delay
    )
    signal.signal(signal.SIGTERM, exit_cleanly)
    uvicorn.Server(uvicorn_config).run()
