"""Run the engine loop in its own thread and stream each request's outputs to asyncio callers.

Only the engine thread touches the scheduler and the model; callers talk to it through a command queue, and it
answers through their event loop. Tokenizing, JSON and SSE on the HTTP side therefore never stall a model step,
and a model step (which releases the GIL inside PyTorch) never stalls accepting connections.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams
from scheduler.output import SchedulerStats

logger = logging.getLogger("spindle.engine")

StepObserver = Callable[[list[RequestOutput], SchedulerStats], None]


class EngineDeadError(RuntimeError):
    """The engine loop has stopped; no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the configured bound allows."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


class AsyncEngine:
    def __init__(self, engine: LLMEngine, observer: StepObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._num_pending = 0  # accepted by generate() but not yet finished; read from any thread
        self.error: BaseException | None = None
        self.latest_stats: SchedulerStats = engine.stats()
        self._thread = threading.Thread(target=self._run, name="spindle-engine", daemon=True)

    # ------------------------------------------------------------------ caller side (any event loop)
    def start(self) -> None:
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def num_unfinished(self) -> int:
        return self._num_pending

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current step; unfinished requests are failed with EngineDeadError."""
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout)

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> RequestStream:
        """Hand a request to the engine and wait until it is accepted (at most one step).

        Raises the engine's validation errors (ValueError subclasses), QueueFullError when the waiting queue is at
        its bound, and EngineDeadError when the engine is not serving.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.error or 'stopped'}")
        limit = self.engine.scheduler_config.max_waiting_requests
        if limit is not None and self.latest_stats.num_waiting >= limit:
            raise QueueFullError(f"{self.latest_stats.num_waiting} requests are already waiting (limit {limit})")
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, asyncio.Queue())
        self._streams[request_id] = _Stream(loop, stream.queue)
        accepted: asyncio.Future[None] = loop.create_future()
        self._commands.put(("add", request_id, prompt_token_ids, params, priority, accepted))
        self._wake.set()
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            if not accepted.done():  # cancelled while waiting: the request may still be added, so abort it
                self.abort(request_id)
            raise
        self._num_pending += 1
        return stream

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as they are produced."""
        stream = await self.add_request(request_id, prompt_token_ids, params, priority)
        async with stream:
            async for output in stream:
                yield output

    def _release(self, request_id: str, finished: bool) -> None:
        self._num_pending -= 1
        self._streams.pop(request_id, None)
        if not finished:
            self.abort(request_id)

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id))
        self._wake.set()

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._drain_commands()
                if not self.engine.has_unfinished_requests():
                    self._wake.wait(timeout=1.0)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self.latest_stats = self.engine.stats()
                if self.observer is not None:
                    self.observer(outputs, self.latest_stats)
                self._deliver(outputs)
        except BaseException as exc:  # the loop itself failed: report it, fail everyone, never hang
            logger.exception("engine loop died")
            self.error = exc
        finally:
            self._fail_all(EngineDeadError(f"the engine stopped: {self.error or 'shutting down'}"))

    def _drain_commands(self) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "abort":
                self.engine.abort_request(command[1])
                continue
            _, request_id, prompt_token_ids, params, priority, accepted = command
            stream = self._streams.get(request_id)
            try:
                self.engine.add_request(request_id, prompt_token_ids, params, priority=priority)
            except Exception as exc:
                if stream is not None:
                    stream.loop.call_soon_threadsafe(_settle, accepted, exc)
                continue
            if stream is None:  # the caller went away before its request was added
                self.engine.abort_request(request_id)
            else:
                stream.loop.call_soon_threadsafe(_settle, accepted, None)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            loop.call_soon_threadsafe(_put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        self._drain_pending_adds(error)
        for stream in list(self._streams.values()):
            stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)

    def _drain_pending_adds(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add":
                stream = self._streams.get(command[1])
                if stream is not None:
                    stream.loop.call_soon_threadsafe(_settle, command[5], error)


class RequestStream:
    """The outputs of one accepted request. Leaving ``async with`` before it finished aborts the request."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: asyncio.Queue) -> None:
        self.request_id = request_id
        self.queue: asyncio.Queue[RequestOutput | BaseException] = outputs
        self._engine = engine
        self._finished = False
        self._released = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self._finished:
            raise StopAsyncIteration
        item = await self.queue.get()
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finished
        return item

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if not self._released:
            self._released = True
            self._engine._release(self.request_id, self._finished)


def _settle(future: asyncio.Future[None], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(None)
    else:
        future.set_exception(error)


def _put_all(items: list[tuple[_Stream, RequestOutput]]) -> None:
    for stream, output in items:
        stream.queue.put_nowait(output)
