"""Fixtures for the HTTP server tests: real ``spindle serve`` processes on loopback ports and the offline engine.

Test modules load this with ``pytest_plugins = ["tests.server_fixtures"]`` (and import from it only for type
checking) so that session-scoped fixtures are shared by all of them: one server process, one offline engine.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest

from engine.config import build_config
from engine.llm import LLM

REPO = Path(__file__).resolve().parents[1]
STARTUP_TIMEOUT = 120.0
MAX_MODEL_LEN = 2048
MAX_BODY_BYTES = 64 * 1024
# fp32 so that greedy output is comparable with the offline engine; a small KV cache and context keep it light.
COMMON_FLAGS = ["--config", "fp32", "--kv-cache-memory", "256MiB", "--max-model-len", str(MAX_MODEL_LEN)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    url: str
    log: Path

    @classmethod
    def launch(cls, log: Path, flags: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        port = free_port()
        command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *COMMON_FLAGS, *flags]
        environment = {k: v for k, v in os.environ.items() if k != "SPINDLE_API_KEY"} | (env or {})
        with log.open("wb") as out:
            process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, env=environment)
        return cls(process, f"http://127.0.0.1:{port}", log)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with {self.process.returncode}:\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"the server did not become healthy in {timeout}s:\n{self.log_tail()}")

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def async_client(self, api_key: str = "unused") -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=60)

    def wait_idle(self, timeout: float = 10.0) -> dict[str, float]:
        """The metrics once nothing runs or waits and every KV block is free (cached blocks count as free)."""
        deadline = time.monotonic() + timeout
        while True:
            samples = self.metrics()
            idle = samples["spindle:num_requests_running"] == samples["spindle:num_requests_waiting"] == 0
            if (idle and samples["spindle:kv_cache_usage_perc"] == 0) or time.monotonic() > deadline:
                return samples
            time.sleep(0.1)

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """The sample values of /metrics by name; request_success_total is keyed by reason, as name[reason]."""
        text = httpx.get(f"{self.url}/metrics", headers=headers, timeout=10).text
        samples: dict[str, float] = {}
        for name, labels, value in re.findall(r"^([\w:]+)(\{[^}]*\})? (\S+)$", text, re.MULTILINE):
            reason = re.search(r'finished_reason="(\w+)"', labels)
            samples[f"{name}[{reason.group(1)}]" if reason else name] = float(value)
        return samples


Launcher = Callable[..., ServerProcess]


@pytest.fixture(scope="session")
def launch_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Launcher]:
    """``launch(name, flags, env=None)`` starts a server (not waiting for it); all are terminated at the end."""
    launched: list[ServerProcess] = []

    def launch(name: str, flags: list[str], env: dict[str, str] | None = None) -> ServerProcess:
        launched.append(ServerProcess.launch(tmp_path_factory.mktemp(name) / "server.log", flags, env))
        return launched[-1]

    yield launch
    for server in launched:
        server.terminate()


@pytest.fixture(scope="session")
def max_body_bytes() -> int:
    return MAX_BODY_BYTES


@pytest.fixture(scope="session")
def max_model_len() -> int:
    return MAX_MODEL_LEN


@pytest.fixture(scope="session")
def booting_server(launch_server: Launcher) -> ServerProcess:
    """The shared server, launched but maybe not ready yet, so that it loads while the offline engine does."""
    return launch_server("server", ["--max-request-body-bytes", str(MAX_BODY_BYTES)])


@pytest.fixture(scope="session")
def offline_llm(booting_server: ServerProcess) -> LLM:
    """The in-process engine with the server's settings: the reference for greedy output over HTTP."""
    return LLM(config=build_config("fp32", {"kv_cache_memory": "256MiB", "max_model_len": MAX_MODEL_LEN}))


@pytest.fixture(scope="session")
def server(booting_server: ServerProcess, offline_llm: LLM) -> ServerProcess:
    """The shared server, ready; the offline engine is loaded first, while the server process loads too."""
    return booting_server.wait_ready()


@pytest.fixture(scope="session")
def client(server: ServerProcess) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="session")
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, timeout=60) as raw:
        yield raw


@pytest.fixture(scope="session")
def model(client: openai.OpenAI) -> str:
    return client.models.list().data[0].id
