"""glibc malloc tuning for the server process: at most two malloc arenas.

glibc gives threads that allocate at the same time arenas of their own (up to eight per core), and memory freed in
one arena is not reused by another. The server's threads (engine step, HTTP loop, thread pools, grammar workers) each
grow one, so resident memory crept up under a long mixed load. With two arenas, a 64-client soak grew about half as
fast (README, "Limits and security"). ``MALLOC_ARENA_MAX`` in the environment, if set, is left to decide.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

M_ARENA_MAX = -8  # from glibc's malloc.h
SERVER_MALLOC_ARENAS = 2


def limit_malloc_arenas(count: int = SERVER_MALLOC_ARENAS) -> bool:
    """Cap the arenas threads created from now on may use; False where it does not apply (not glibc, or the
    environment already sets the cap)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    library = ctypes.util.find_library("c")
    if library is None:
        return False
    mallopt = getattr(ctypes.CDLL(library), "mallopt", None)
    return mallopt is not None and mallopt(M_ARENA_MAX, count) == 1
