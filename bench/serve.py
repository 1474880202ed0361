"""Load an OpenAI-compatible server with a workload: Poisson (or gamma-bursty) arrivals, bounded concurrency."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from tqdm import tqdm

from bench.client import RequestResult, request_body, send_request
from bench.datasets import BenchRequest


@dataclass(frozen=True)
class LoadSettings:
    base_url: str
    endpoint: str
    model: str
    request_rate: float = float("inf")  # requests per second; inf sends everything at once
    burstiness: float = 1.0  # gamma shape of the inter-arrival times: 1 is Poisson, lower is burstier
    max_concurrency: int | None = None
    seed: int = 0
    ignore_eos: bool = False
    response_format: dict[str, Any] | None = None  # e.g. {"type": "json_schema", "json_schema": {...}}
    api_key: str | None = None
    timeout: float = 6 * 3600.0
    progress: bool = True

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


async def discover_model(base_url: str, api_key: str | None) -> str:
    """The first model the server lists at /v1/models."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    async with httpx.AsyncClient(timeout=30) as client:
        response = await client.get(base_url.rstrip("/") + "/v1/models", headers=headers)
        response.raise_for_status()
        return response.json()["data"][0]["id"]


async def _arrivals(
    requests: Sequence[BenchRequest], rate: float, burstiness: float, seed: int
) -> AsyncIterator[BenchRequest]:
    rng = random.Random(seed)
    for request in requests:
        yield request
        if rate != float("inf"):
            # Gamma inter-arrival times with mean 1 / rate; shape 1 is the exponential of a Poisson process.
            await asyncio.sleep(rng.gammavariate(burstiness, 1.0 / (rate * burstiness)))


async def run_load(requests: Sequence[BenchRequest], settings: LoadSettings) -> tuple[list[RequestResult], float]:
    """Send every request; returns the results (in request order) and the wall-clock duration in seconds."""
    if settings.request_rate <= 0 or settings.burstiness <= 0:
        raise ValueError("--request-rate and --burstiness must be positive")
    url = settings.base_url.rstrip("/") + settings.endpoint
    limit = asyncio.Semaphore(settings.max_concurrency) if settings.max_concurrency else None
    bar = tqdm(total=len(requests), disable=not settings.progress, unit="req")
    limits = httpx.Limits(max_connections=settings.max_concurrency or len(requests) or 1)

    async with httpx.AsyncClient(timeout=settings.timeout, limits=limits) as client:

        async def one(request: BenchRequest) -> RequestResult:
            body = request_body(
                request, settings.endpoint, settings.model, settings.ignore_eos, settings.response_format
            )
            if limit is None:
                result = await send_request(client, url, body, request.prompt_len, settings.headers)
            else:
                async with limit:
                    result = await send_request(client, url, body, request.prompt_len, settings.headers)
            bar.update(1)
            return result

        started = time.perf_counter()
        tasks = []
        async for request in _arrivals(requests, settings.request_rate, settings.burstiness, settings.seed):
            tasks.append(asyncio.create_task(one(request)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - started
    bar.close()
    return list(results), duration
