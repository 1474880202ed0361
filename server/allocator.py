"""glibc malloc tuning for the server process: at most two malloc arenas, and freed heap pages handed back.

glibc gives threads that allocate at the same time arenas of their own (up to eight per core), and memory freed in
one arena is not reused by another. The server's threads (engine step, HTTP loop, thread pools, grammar workers) each
grow one, so resident memory crept up under a long mixed load. With two arenas, a 64-client soak grew about half as
fast (docs/http-api.md, "Limits and security"). ``MALLOC_ARENA_MAX`` in the environment, if set, is left to decide.

The rest of the creep was free memory still held by the arenas: a step's activations are freed in a different order
than they were allocated, and glibc returns a heap's pages to the system only from its top. ``malloc_trim(0)`` hands
back every free page of every arena; a daemon thread calls it every few seconds (a few milliseconds each, during
which other threads' allocations in the arena being trimmed wait).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time

logger = logging.getLogger("spindle.allocator")

M_ARENA_MAX = -8  # from glibc's malloc.h
SERVER_MALLOC_ARENAS = 2
TRIM_INTERVAL_SECONDS = 5.0


def _libc() -> ctypes.CDLL | None:
    library = ctypes.util.find_library("c")
    return None if library is None else ctypes.CDLL(library)  # a CDLL call releases the GIL while it runs


def limit_malloc_arenas(count: int = SERVER_MALLOC_ARENAS) -> bool:
    """Cap the arenas threads created from now on may use; False where it does not apply (not glibc, or the
    environment already sets the cap)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    return mallopt is not None and mallopt(M_ARENA_MAX, count) == 1


def start_heap_trimming(interval: float = TRIM_INTERVAL_SECONDS) -> threading.Thread | None:
    """Hand free heap pages back to the system every ``interval`` seconds from a daemon thread, for the life of the
    process; None where glibc's ``malloc_trim`` is not available."""
    trim = getattr(_libc(), "malloc_trim", None)
    if trim is None:
        return None

    def run() -> None:
        while True:
            time.sleep(interval)
            started = time.perf_counter()
            trim(0)
            logger.debug("malloc_trim took %.1f ms", (time.perf_counter() - started) * 1e3)

    thread = threading.Thread(target=run, name="spindle-heap-trim", daemon=True)
    thread.start()
    return thread
