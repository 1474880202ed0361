"""The server's malloc arena cap, observed through glibc's own arena statistics in a fresh process."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from server.allocator import SERVER_MALLOC_ARENAS, limit_malloc_arenas

# Threads that each malloc and free, then glibc's malloc_stats() (on stderr) lists one "Arena N:" per arena in use.
PROGRAM = """
import ctypes, ctypes.util, sys, threading
from server.allocator import limit_malloc_arenas
if sys.argv[1] == "capped":
    assert limit_malloc_arenas()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def work():
    libc.free(libc.malloc(4096))
    ready.wait()  # every thread alive at once, so none hands its arena on
ready = threading.Barrier(9)
threads = [threading.Thread(target=work) for _ in range(8)]
for thread in threads:
    thread.start()
ready.wait()
for thread in threads:
    thread.join()
libc.malloc_stats()
"""


def arenas_in_use(mode: str) -> int:
    env = {key: value for key, value in os.environ.items() if key != "MALLOC_ARENA_MAX"}
    run = subprocess.run(
        [sys.executable, "-c", PROGRAM, mode], capture_output=True, text=True, env=env, timeout=60, check=True
    )
    return sum(line.startswith("Arena ") for line in run.stderr.splitlines())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_threads_share_at_most_the_capped_arenas() -> None:
    assert arenas_in_use("default") > SERVER_MALLOC_ARENAS  # without the cap each new thread takes an arena
    assert 1 <= arenas_in_use("capped") <= SERVER_MALLOC_ARENAS


def test_an_arena_cap_in_the_environment_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert not limit_malloc_arenas()


# Free heap memory held below a live allocation stays resident until something trims the heap.
TRIM_PROGRAM = """
import ctypes, ctypes.util, sys, time
from server.allocator import start_heap_trimming
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
def rss_mib():
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * 4096 / 2**20
chunks = [libc.malloc(64 * 1024) for _ in range(3200)]  # 200 MiB below the mmap threshold: on the heap
for chunk in chunks:
    ctypes.memset(chunk, 1, 64 * 1024)
for chunk in chunks[:-1]:  # the last one pins the heap's top, so glibc's own trimming cannot return the rest
    libc.free(chunk)
before = rss_mib()
if sys.argv[1] == "trim":
    start_heap_trimming(0.05)
time.sleep(0.5)
print(before - rss_mib())
"""


def released_mib(mode: str) -> float:
    run = subprocess.run([sys.executable, "-c", TRIM_PROGRAM, mode], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return float(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_heap_trimming_hands_freed_memory_back() -> None:
    assert released_mib("idle") < 20  # freed, yet still resident
    assert released_mib("trim") > 150
