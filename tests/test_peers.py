"""The parts of the peer comparison (benchmarks/compare_peers.py) that run without the peers: the table of results
and the handling of a server process tree.

References: numbers worked out by hand from synthetic request timings, and the operating system's own view of
which processes exist and how much memory a child holds.
"""

from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from bench.client import RequestResult
from bench.metrics import summarize
from bench.peers import ServerRun, peer_table
from bench.plots import plot_peers
from bench.server_process import ServerProcess, ServerStartError


def timed_requests(ttfts: list[float], gap: float, tokens: int) -> list[RequestResult]:
    """Requests whose first token came after ``ttft`` and every later one ``gap`` seconds apart."""
    return [
        RequestResult(
            prompt_len=128,
            success=True,
            ttft=ttft,
            latency=ttft + gap * (tokens - 1),
            itl=[gap] * (tokens - 1),
            output_tokens=tokens,
        )
        for ttft in ttfts
    ]


def test_table_has_the_comparison_columns_and_hand_computed_values() -> None:
    spindle = ServerRun("Spindle", "bf16", "spindle serve", peak_rss_bytes=1536 * 2**20)
    # c=1: 4 requests of 11 tokens in 8 s -> 5.5 tok/s; TPOT = 0.5 s / 10 = 50 ms.
    spindle.summaries[1] = summarize(timed_requests([0.1] * 4, 0.05, 11), 8.0)
    # c=8: 44 tokens in 2 s -> 22 tok/s.
    spindle.summaries[8] = summarize(timed_requests([0.2] * 4, 0.04, 11), 2.0)
    # c=32: 44 tokens in 0.5 s -> 88 tok/s; TTFTs 1..4 s: p99 by linear interpolation = 3 + 0.97 = 3.97 s.
    spindle.summaries[32] = summarize(timed_requests([1.0, 2.0, 3.0, 4.0], 0.01, 11), 0.5)
    peer = ServerRun("Peer", "Q4_1", "peer-server", notes=["c=32: 4 requests failed: HTTP 500"])
    peer.summaries[1] = summarize(timed_requests([0.05] * 2, 0.0125, 9), 1.0)  # 18 tok/s, TPOT 12.5 ms
    peer.summaries[32] = summarize([RequestResult(prompt_len=128, error="HTTP 500")] * 4, 1.0)
    skipped = ServerRun("vllm", "", "", notes=["skipped: .peers/vllm not installed"])

    lines = peer_table([spindle, peer, skipped], [32, 1, 8]).splitlines()

    assert lines[0] == (
        "| server | settings | c=1: out tok/s | c=1: TPOT p50 (ms) | c=8: out tok/s | c=32: out tok/s "
        "| c=32: TTFT p99 (ms) | peak RSS (MiB) |"
    )
    assert lines[1] == "|" + " --- |" * 8
    assert lines[2] == "| Spindle | bf16 | 5.5 | 50.0 | 22.0 | 88.0 | 3970 | 1536 |"
    assert lines[3] == "| Peer | Q4_1 | 18.0 | 12.5 | – | – | – | – |"  # no c=8 run, every c=32 request failed
    assert lines[4:] == ["", "- Peer: c=32: 4 requests failed: HTTP 500", "- vllm: skipped: .peers/vllm not installed"]


def test_one_concurrency_shows_both_latencies() -> None:
    run = ServerRun("Spindle", "bf16", "spindle serve")
    run.summaries[4] = summarize(timed_requests([0.3, 0.3], 0.02, 6), 1.0)  # 12 tok/s, TPOT 20 ms, TTFT 300 ms
    header, _, row = peer_table([run], [4]).splitlines()
    assert header.split(" | ")[2:] == ["c=4: out tok/s", "c=4: TPOT p50 (ms)", "c=4: TTFT p99 (ms)", "peak RSS (MiB) |"]
    assert row == "| Spindle | bf16 | 12.0 | 20.0 | 300 | – |"


def test_chart_is_written(tmp_path: Path) -> None:
    run = ServerRun("Spindle", "bf16", "spindle serve")
    for level, duration in ((1, 4.0), (2, 2.5)):
        run.summaries[level] = summarize(timed_requests([0.1] * 4, 0.05, 11), duration)
    plot_peers([run, ServerRun("vllm", "", "", notes=["skipped"])], tmp_path / "peers.png", "test")
    assert (tmp_path / "peers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


WORKER_BYTES = 200 * 2**20
# A server that forks a worker holding 200 MiB (as vLLM runs its engine in a child) and answers /v1/models.
FAKE_SERVER = textwrap.dedent(
    """
    import http.server, subprocess, sys
    worker = subprocess.Popen([sys.executable, "-c", "import time; x = bytearray(200 * 2**20); time.sleep(600)"])
    print("pid:", worker.pid, flush=True)

    class Models(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.end_headers()
            self.wfile.write(b'{"data": [{"id": "fake"}]}')

    http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Models).serve_forever()
    """
)


def test_server_tree_is_measured_and_stopped_whole(tmp_path: Path) -> None:
    log = tmp_path / "fake.log"
    with ServerProcess.start(lambda port: [sys.executable, "-c", FAKE_SERVER, str(port)], log) as server:
        server.wait_ready(timeout=60)
        worker = psutil.Process(int(log.read_text().split("\npid: ")[1].split()[0]))
        deadline = time.monotonic() + 30
        while worker.memory_info().rss < WORKER_BYTES and time.monotonic() < deadline:  # still filling its buffer
            time.sleep(0.05)
        time.sleep(1.0)  # a few samples of the whole tree
        server_pid, worker_pid = server.process.pid, worker.pid
    assert server.peak_rss_bytes >= WORKER_BYTES  # the worker's memory counts
    assert not psutil.pid_exists(server_pid)
    assert not psutil.pid_exists(worker_pid) or psutil.Process(worker_pid).status() == psutil.STATUS_ZOMBIE


def test_a_server_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    command = [sys.executable, "-c", "import sys; print('bad flag --xyz'); sys.exit(3)"]
    server = ServerProcess.start(lambda port: command, tmp_path / "bad.log")
    with server, pytest.raises(ServerStartError, match=r"exited with 3:(.|\n)*bad flag --xyz"):
        server.wait_ready(timeout=60)
