"""Run the engine loop in a thread of its own and stream each request's outputs to asyncio callers.

Only the engine thread touches the scheduler and the model; callers talk to it through a command queue, and it
answers through their event loop. Tokenizing, JSON and SSE on the HTTP side therefore never stall a model step,
and a model step (which releases the GIL inside PyTorch) never stalls accepting connections.

The loop runs either in a thread it starts (``start``) or in the caller's (``run``). A server should give it the
process's main thread and serve HTTP from another: PyTorch's OpenMP runtime (libgomp) keeps one thread team per
thread that runs parallel operators, and once a process has more such threads than cores (the main thread's team
from loading the model plus the engine thread's), every worker sleeps in the kernel between operators instead of
spinning. A decode step runs hundreds of short operators, so each then waits for its workers to wake: on two cores
that made served one-stream steps 7-28 % slower than the same steps run from the main thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from engine.llm_engine import LLMEngine
from engine.outputs import EngineCounters, RequestOutput
from engine.sampling_params import SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.tokenizer import Tokenizer
from scheduler.output import SchedulerStats

logger = logging.getLogger("spindle.engine")

StepObserver = Callable[[list[RequestOutput], SchedulerStats, EngineCounters], None]

_IDLE_WAIT_SECONDS = 1.0


class EngineDeadError(RuntimeError):
    """The engine is not serving (stopped, shutting down or failed); no request can be served."""


class QueueFullError(RuntimeError):
    """More requests are waiting than the configured bound allows."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput | BaseException]


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    priority: int
    accepted: asyncio.Future[None]


@dataclass(frozen=True)
class _Abort:
    request_id: str


def aged_priority(priority: int, arrival: float, aging_seconds: float) -> int:
    """The priority to queue a request with so that the scheduler's strict (priority, arrival) order never starves.

    Every ``aging_seconds`` of earlier ``arrival`` (on a clock all requests share) counts as one step of priority:
    a more urgent request overtakes only those that arrived at most about that long before it per step of
    difference, so a long enough wait puts any request ahead of every newcomer. 0 keeps the strict order.
    """
    if aging_seconds <= 0:
        return priority
    return priority + math.floor(arrival / aging_seconds)


class AsyncEngine:
    def __init__(
        self, engine: LLMEngine, observer: StepObserver | None = None, priority_aging_seconds: float = 0.0
    ) -> None:
        self.engine = engine
        self.observer = observer
        self.priority_aging_seconds = priority_aging_seconds
        self._commands: queue.SimpleQueue[_Add | _Abort] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._wake = threading.Event()
        self._stop = threading.Event()
        # Orders "enqueue a request" against "the loop has exited", so that no request waits on a dead loop.
        self._lock = threading.Lock()
        self._closed = False
        self._abort_at: float | None = None  # set by drain()
        self.error: BaseException | None = None
        self._started = False
        self._thread: threading.Thread | None = None  # set when the loop runs in a thread of its own

    # ------------------------------------------------------------------ caller side (any event loop)
    def start(self) -> None:
        """Start the engine loop in a thread of its own; a no-op once the loop was started, here or by ``run``
        (it cannot be restarted)."""
        with self._lock:
            if self._started:
                return
            self._started = True
            self._thread = threading.Thread(target=self._run, name="spindle-engine", daemon=True)
        self._thread.start()

    def run(self) -> None:
        """Run the engine loop in the calling thread until ``stop`` (from another thread) or a drain ends it."""
        with self._lock:
            if self._started:
                raise RuntimeError("the engine loop was already started")
            self._started = True
        self._run()

    # What callers need of the wrapped engine, by name: fixed once it is built, so any thread may read them (the
    # scheduler and the model stay the engine thread's).
    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def grammars(self) -> GrammarCompiler:
        return self.engine.grammars

    def close(self) -> None:
        """Release the wrapped engine (its disk tier's writes, its tensor-parallel workers) once the loop has ended."""
        self.engine.close()

    @property
    def is_running(self) -> bool:
        """True while new requests are accepted."""
        return self._started and not self._closed and self._abort_at is None

    @property
    def is_draining(self) -> bool:
        """True from drain() on: the server is shutting down."""
        return self._abort_at is not None

    @property
    def unavailable_reason(self) -> str:
        if self.error is not None:
            return f"the engine failed: {self.error!r}"
        return "the server is shutting down" if self._abort_at is not None else "the engine is stopped"

    def drain(self, grace: float) -> None:
        """Refuse new requests from now on; abort the unfinished ones after ``grace`` seconds."""
        self._abort_at = time.monotonic() + grace
        self._wake.set()

    def stop(self, timeout: float | None = None) -> None:
        """Stop the loop after its current step; unfinished requests are failed with EngineDeadError."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    async def add_request(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> RequestStream:
        """Hand a request to the engine and wait until it is accepted (at most one step).

        Raises the engine's validation errors (ValueError subclasses), QueueFullError when the waiting queue is at
        its bound, and EngineDeadError when the engine is not serving.
        """
        priority = aged_priority(priority, time.monotonic(), self.priority_aging_seconds)
        loop = asyncio.get_running_loop()
        stream = RequestStream(self, request_id, asyncio.Queue())
        accepted: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if not self.is_running:
                raise EngineDeadError(self.unavailable_reason)
            self._streams[request_id] = _Stream(loop, stream.queue)
            self._commands.put(_Add(request_id, prompt_token_ids, params, priority, accepted))
        self._wake.set()
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            if not accepted.done():  # cancelled while waiting: the request may still be added, so abort it
                self.abort(request_id)
            raise
        return stream

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0
    ) -> AsyncIterator[RequestOutput]:
        """Add a request and yield its outputs as they are produced."""
        stream = await self.add_request(request_id, prompt_token_ids, params, priority)
        async with stream:
            async for output in stream:
                yield output

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))
        self._wake.set()

    def _release(self, request_id: str, finished: bool) -> None:
        self._streams.pop(request_id, None)
        if not finished:
            self.abort(request_id)

    # ------------------------------------------------------------------ engine thread
    def _run(self) -> None:
        try:
            while not self._stop.is_set() and not self._drain_expired():
                if self._drain_commands():
                    self._publish([])  # aborts free blocks without a step: metrics must show it now
                if not self.engine.has_unfinished_requests():
                    self.engine.check_health()  # a dead tensor-parallel worker fails the loop even while idle
                    self._wake.wait(timeout=_IDLE_WAIT_SECONDS)
                    self._wake.clear()
                    continue
                outputs = self.engine.step()
                self._publish(outputs)
                self._deliver(outputs)
            self._abort_unfinished()
        except BaseException as exc:  # the loop itself failed: report it, fail everyone, never hang
            logger.exception("engine loop died")
            self.error = exc
            with contextlib.suppress(Exception):  # free what the engine still holds, if it still can
                self._abort_unfinished()
        finally:
            with self._lock:
                self._closed = True
            self._fail_all(EngineDeadError(self.unavailable_reason))
            with contextlib.suppress(Exception):  # blocks queued for the disk tier are written before the thread ends
                self.engine.close()

    def _abort_unfinished(self) -> None:
        """Free what is still running when the loop is stopped or its drain expires, leaving the engine clean.

        Queued aborts (of streams already released) are applied; queued additions are left for _fail_all to refuse.
        """
        additions: list[_Add] = []
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
            else:
                additions.append(command)
        for command in additions:
            self._commands.put(command)
        for request_id in list(self._streams):
            self.engine.abort_request(request_id)
        self._publish([])

    def _drain_expired(self) -> bool:
        return self._abort_at is not None and time.monotonic() >= self._abort_at

    def _drain_commands(self) -> bool:
        """Apply every queued command; return whether there was any."""
        applied = False
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return applied
            applied = True
            if isinstance(command, _Abort):
                self.engine.abort_request(command.request_id)
            else:
                self._add(command)

    def _add(self, command: _Add) -> None:
        stream = self._streams.get(command.request_id)
        if stream is None:  # the caller went away before its request was added
            return
        try:
            if self.engine.is_queue_full():
                limit = self.engine.scheduler_config.max_waiting_requests
                raise QueueFullError(f"{limit} requests are already waiting, the most this server queues")
            self.engine.add_request(
                command.request_id, command.prompt_token_ids, command.params, priority=command.priority
            )
        except Exception as exc:
            _notify(stream.loop, _settle, command.accepted, exc)
            return
        _notify(stream.loop, _settle, command.accepted, None)

    def _publish(self, outputs: list[RequestOutput]) -> None:
        if self.observer is not None:
            self.observer(outputs, self.engine.stats(), self.engine.counters)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[_Stream, RequestOutput]]] = {}
        for output in outputs:
            stream = self._streams.get(output.request_id)
            if stream is not None:
                by_loop.setdefault(stream.loop, []).append((stream, output))
        for loop, items in by_loop.items():  # one wake-up of each event loop per step
            _notify(loop, _put_all, items)

    def _fail_all(self, error: BaseException) -> None:
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            stream = self._streams.get(command.request_id)
            if isinstance(command, _Add) and stream is not None:
                _notify(stream.loop, _settle, command.accepted, error)
        for stream in list(self._streams.values()):
            _notify(stream.loop, stream.queue.put_nowait, error)


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


def _notify(loop: asyncio.AbstractEventLoop, callback: Callable[..., None], *args: Any) -> None:
    # A caller whose event loop has closed is no longer listening; that must not take the engine loop down.
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(callback, *args)


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
