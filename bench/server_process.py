"""A server under test as a child process: started on a free loopback port, ready once ``/v1/models`` answers, its
resident memory sampled (summed over its process tree: some servers run the model in worker processes) until it
is stopped."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from engine.errors import SpindleError


class ServerStartError(SpindleError):
    pass


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tree_rss(process: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants (those that exit meanwhile count as zero)."""
    total = 0
    try:
        members = [process, *process.children(recursive=True)]
    except psutil.Error:
        return 0
    for member in members:
        with contextlib.suppress(psutil.Error):
            total += member.memory_info().rss
    return total


class ServerProcess:
    """``with ServerProcess.start(...) as server:`` runs the server for the block and stops its whole tree after."""

    def __init__(self, process: subprocess.Popen[bytes], base_url: str, log: Path, sample_seconds: float) -> None:
        self.process = process
        self.base_url = base_url
        self.log = log
        self.peak_rss_bytes = 0
        self._stopped = threading.Event()
        self._sampler = threading.Thread(target=self._sample_rss, args=(sample_seconds,), daemon=True)
        self._sampler.start()

    @classmethod
    def start(
        cls,
        command_for_port: Callable[[int], list[str]],
        log: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        sample_seconds: float = 0.2,
    ) -> ServerProcess:
        port = free_port()
        log.parent.mkdir(parents=True, exist_ok=True)
        command = command_for_port(port)
        with log.open("wb") as out:
            out.write(f"$ {' '.join(command)}\n".encode())
            out.flush()
            # A session of its own, so that stopping it reaches the worker processes it forks.
            process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
                start_new_session=True,
            )
        return cls(process, f"http://127.0.0.1:{port}", log, sample_seconds)

    def _sample_rss(self, seconds: float) -> None:
        try:
            root = psutil.Process(self.process.pid)
        except psutil.Error:
            return
        while not self._stopped.is_set():
            self.peak_rss_bytes = max(self.peak_rss_bytes, tree_rss(root))
            self._stopped.wait(seconds)

    def wait_ready(self, timeout: float) -> None:
        """Until ``/v1/models`` answers 200 (servers answer 503 or refuse connections while loading)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerStartError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.base_url}/v1/models", timeout=2.0).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise ServerStartError(f"the server did not answer /v1/models within {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM to the server's process group; SIGKILL to whatever of it is still there after ``timeout``."""
        self._stopped.set()
        self._signal_group(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while self._signal_group(0) and time.monotonic() < deadline:  # signal 0: is any member left?
            self.process.poll()  # reap the leader, or the group never empties
            time.sleep(0.2)
        self._signal_group(signal.SIGKILL)
        self.process.wait()
        self._sampler.join()

    def _signal_group(self, sig: int) -> bool:
        try:
            os.killpg(self.process.pid, sig)
            return True
        except ProcessLookupError:
            return False

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self.stop()
