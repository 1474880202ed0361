"""Reading the engine requests of one response: their outputs interleaved, run to the end (``collect``) or relayed
as server-sent events (``event_stream``, ``EventStream``); engine failures become OpenAI-shaped errors."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.async_engine import EngineDeadError, QueueFullError, RequestStream
from engine.llm import CompletionOutput
from engine.outputs import RequestOutput
from engine.sampling_params import InvalidParameter
from scheduler.errors import RequestRejected
from server.errors import RETRY_AFTER_SECONDS, APIError, error_body
from server.protocol import UsageInfo

DISCONNECT_POLL_SECONDS = 0.5

Disconnected = Callable[[], Awaitable[bool]]


@dataclass
class Choice(CompletionOutput):
    """The accumulated state of one choice (one engine request) of a response."""

    prompt_token_ids: list[int] = field(default_factory=list)
    text_offset: int = 0  # where the next logprob token starts in the choice's text (completions' logprobs)
    prompt_only: bool = False  # echo without generation: outputs reach it without the token sampled
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held (the Responses API reports them)

    def add(self, output: RequestOutput) -> None:
        super().add(output)
        self.num_cached_tokens = output.num_cached_tokens


Started = list[tuple[Choice, RequestStream]]


class EventStream(StreamingResponse):
    """A server-sent event stream that aborts its requests however the connection ends."""

    def __init__(self, events: AsyncGenerator[str, None], started: Started) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._events = events
        self._started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            for _, stream in self._started:
                stream.close()


async def merged(started: Started) -> AsyncGenerator[tuple[Choice, RequestOutput], None]:
    """Interleave the outputs of several requests as they arrive; closing it aborts the unfinished ones."""
    queue: asyncio.Queue[tuple[Choice, RequestOutput] | BaseException | None] = asyncio.Queue()

    async def pump(choice: Choice, stream: RequestStream) -> None:
        try:
            async with stream:
                async for output in stream:
                    await queue.put((choice, _without_generation(output) if choice.prompt_only else output))
        except Exception as exc:
            await queue.put(exc)
        finally:
            await queue.put(None)

    tasks = [asyncio.create_task(pump(choice, stream)) for choice, stream in started]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise api_error_for(item) or item
            else:
                if item[1].finish_reason == "error":
                    raise _generation_error(item[1])
                yield item
    finally:
        for task in tasks:
            task.cancel()
        for _, stream in started:
            stream.close()


async def collect(started: Started, disconnected: Disconnected) -> list[Choice]:
    """Run every request to the end; abort them all if the client goes away meanwhile."""

    async def run() -> None:
        async with aclosing(merged(started)) as outputs:
            async for choice, output in outputs:
                choice.add(output)

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
            if not task.done() and await disconnected():
                raise APIError(400, "client disconnected")
        task.result()
    finally:
        task.cancel()
    return [choice for choice, _ in started]


async def event_stream(
    started: Started,
    prompts: list[list[int]],
    opening: list[dict[str, Any]],
    event: Callable[[Choice, RequestOutput], dict[str, Any] | None],
    usage_event: Callable[[UsageInfo], dict[str, Any]] | None,
) -> AsyncGenerator[str, None]:
    """SSE lines: the ``opening`` events, one event per output that carries news (``event`` may still find none to
    send: None), usage, then ``[DONE]``.

    A failure after the response started can only be reported in-band, as an event in OpenAI's error shape.
    """
    try:
        for payload in opening:
            yield _sse(payload)
        async with aclosing(merged(started)) as outputs:
            async for choice, output in outputs:
                choice.add(output)
                if output.new_text or output.finished or output.new_logprobs or output.new_token_ids:
                    payload = event(choice, output)
                    if payload is not None:
                        yield _sse(payload)
        if usage_event is not None:
            yield _sse(usage_event(total_usage(prompts, [choice for choice, _ in started])))
    except APIError as exc:
        yield _sse(error_body(exc.status, exc.message, exc.param, exc.code))
    yield "data: [DONE]\n\n"


def total_usage(prompts: list[list[int]], choices: list[Choice]) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def api_error_for(exc: BaseException) -> APIError | None:
    """The HTTP error for an exception raised while adding or running requests; None for unexpected ones."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(
            503, f"the server is overloaded: {exc}", code="queue_full", headers={"Retry-After": RETRY_AFTER_SECONDS}
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(exc, InvalidParameter):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, (RequestRejected, ValueError)):
        return APIError(400, str(exc))
    return None


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _without_generation(output: RequestOutput) -> RequestOutput:
    """An echo-only choice's view of an output: the prompt's logprobs, not the token sampled with them, and the
    end that max_tokens 0 means ("length"); an abort or error stays as it is."""
    ended = output.finish_reason in ("stop", "length")
    return replace(
        output,
        new_token_ids=[],
        new_text="",
        new_logprobs=[],
        num_output_tokens=0,
        finish_reason="length" if ended else output.finish_reason,
        stop_reason=None,
    )


def _generation_error(output: RequestOutput) -> APIError:
    """The HTTP error for a request that failed while running: a 400 when its own input failed it."""
    if output.error_param is not None:
        return APIError(400, output.error or "invalid request", param=output.error_param)
    return APIError(500, output.error or "generation failed", code="generation_error")
