"""Soak test: many streaming clients against a Spindle server for a fixed time, then check that it held up.

Each client sends one request after another: completions or chat, mostly streamed, prompts and outputs of mixed
lengths, and some it abandons part-way (a disconnect). The run passes when no request got a 5xx or an in-band error,
none outlived its deadline (hung), every KV block is back in the pool once the server is idle, and the server's
resident memory stayed flat after the warm-up. It prints the memory curve and a summary, optionally as JSON.

    .venv/bin/python scripts/soak.py --duration 600 --clients 64              # starts its own server
    .venv/bin/python scripts/soak.py --base-url http://127.0.0.1:8000 --pid 1234 --duration 60
    .venv/bin/python scripts/soak.py --duration 60 -- --dtype float32          # after --: `spindle serve` flags
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import re
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx
import psutil

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


@dataclass
class Tally:
    sent: int = 0
    completed: int = 0
    disconnects: int = 0
    hung: int = 0
    inband_errors: int = 0
    transport_errors: int = 0
    statuses: Counter[int] = field(default_factory=Counter)  # of every response that got a status line
    slowest_seconds: float = 0.0


@dataclass
class Sample:
    seconds: float
    rss_mib: float | None
    running: float
    waiting: float
    sent: int


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    serve_flags: list[str] = []
    if "--" in argv:
        argv, serve_flags = argv[: argv.index("--")], argv[argv.index("--") + 1 :]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", help="a running server; without it the script starts one")
    parser.add_argument("--pid", type=int, help="with --base-url: the server's process id, for its memory")
    parser.add_argument("--api-key", default=os.environ.get("SPINDLE_API_KEY"))
    parser.add_argument("--duration", type=float, default=600.0, help="seconds of sending requests")
    parser.add_argument("--clients", type=int, default=64, help="concurrent clients")
    parser.add_argument("--disconnect-fraction", type=float, default=0.15, help="requests abandoned part-way")
    parser.add_argument("--stream-fraction", type=float, default=0.85)
    parser.add_argument("--max-prompt-words", type=int, default=400)
    parser.add_argument("--max-tokens", type=int, default=128, help="the most tokens one request asks for")
    parser.add_argument("--deadline", type=float, default=300.0, help="seconds one request may take")
    parser.add_argument("--warmup", type=float, help="seconds before memory must stay flat (default: a fifth)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=64.0, help="allowed growth after the warm-up")
    parser.add_argument("--sample-every", type=float, default=10.0, help="seconds between memory samples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    return parser.parse_args(argv), serve_flags


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def own_server(flags: list[str]) -> Iterator[tuple[str, int]]:
    """Start ``spindle serve`` on a free port; stop it with SIGTERM (and wait) at the end."""
    port = free_port()
    log = Path(tempfile.mkdtemp(prefix="spindle-soak-")) / "server.log"
    command = [sys.executable, "-m", "server.cli", "serve", "--port", str(port), *flags]
    with log.open("wb") as out:
        process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    print(f"server: {' '.join(command[1:])} (pid {process.pid}, log {log})", flush=True)
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start; see {log}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            time.sleep(0.5)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            process.kill()


def metrics(client: httpx.Client) -> dict[str, float]:
    text = client.get("/metrics").text
    return {name: float(value) for name, value in re.findall(r"^(spindle:\w+)\{[^}]*\} (\S+)$", text, re.MULTILINE)}


class Load:
    def __init__(self, args: argparse.Namespace, base_url: str, model: str) -> None:
        self.args = args
        self.base_url = base_url
        self.model = model
        self.tally = Tally()
        self.rng = random.Random(args.seed)
        self.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}

    def prompt_words(self) -> int:
        """Mostly short prompts, some medium, a few long."""
        top = self.args.max_prompt_words
        kind = self.rng.random()
        upper = top // 8 if kind < 0.7 else top // 2 if kind < 0.95 else top
        return self.rng.randint(1, max(upper, 1))

    def body(self, chat: bool, stream: bool) -> dict:
        text = " ".join(
            "".join(self.rng.choices(string.ascii_lowercase, k=self.rng.randint(2, 8)))
            for _ in range(self.prompt_words())
        )
        body: dict = {
            "model": self.model,
            "max_tokens": self.rng.randint(1, self.args.max_tokens),
            "temperature": self.rng.choice([0.0, 0.7, 1.0]),
            "ignore_eos": self.rng.random() < 0.5,
            "stream": stream,
        }
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        return body

    async def client_loop(self, client: httpx.AsyncClient, stop_at: float) -> None:
        while time.monotonic() < stop_at:
            chat = self.rng.random() < 0.5
            stream = self.rng.random() < self.args.stream_fraction
            abandon = self.rng.random() < self.args.disconnect_fraction
            path = "/v1/chat/completions" if chat else "/v1/completions"
            self.tally.sent += 1
            started = time.monotonic()
            try:
                await asyncio.wait_for(self.one(client, path, self.body(chat, stream), abandon), self.args.deadline)
            except asyncio.TimeoutError:
                self.tally.hung += 1
            except httpx.TransportError as exc:
                self.tally.transport_errors += 1
                print(f"transport error: {exc!r}", flush=True)
            self.tally.slowest_seconds = max(self.tally.slowest_seconds, time.monotonic() - started)

    async def one(self, client: httpx.AsyncClient, path: str, body: dict, abandon: bool) -> None:
        if not body["stream"]:
            if abandon:  # give up before the response: the server must notice and abort the request
                with contextlib.suppress(httpx.TimeoutException):
                    await client.post(path, json=body, timeout=self.rng.uniform(0.05, 2.0))
                    self.tally.completed += 1
                    return
                self.tally.disconnects += 1
                return
            response = await client.post(path, json=body)
            self.tally.statuses[response.status_code] += 1
            self.tally.completed += response.status_code == 200
            return
        events_before_leaving = self.rng.randint(1, 20) if abandon else None
        async with client.stream("POST", path, json=body) as response:
            self.tally.statuses[response.status_code] += 1
            if response.status_code != 200:
                await response.aread()
                return
            events = 0
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    self.tally.completed += 1
                    return
                if "error" in json.loads(line[len("data: ") :]):
                    self.tally.inband_errors += 1
                    print(f"in-band error: {line}", flush=True)
                events += 1
                if events == events_before_leaving:
                    self.tally.disconnects += 1
                    return  # leaving the block closes the connection mid-stream

    async def run(self, samples: list[Sample], process: psutil.Process | None) -> None:
        started = time.monotonic()
        stop_at = started + self.args.duration
        limits = httpx.Limits(max_connections=self.args.clients + 4)
        timeout = httpx.Timeout(self.args.deadline)
        with httpx.Client(base_url=self.base_url, headers=self.headers) as sync:
            async with httpx.AsyncClient(
                base_url=self.base_url, headers=self.headers, limits=limits, timeout=timeout
            ) as client:
                sampler = asyncio.create_task(self.sample(sync, samples, process, started))
                await asyncio.gather(*(self.client_loop(client, stop_at) for _ in range(self.args.clients)))
                sampler.cancel()
            samples.append(self.snapshot(sync, process, started))

    async def sample(
        self, sync: httpx.Client, samples: list[Sample], process: psutil.Process | None, started: float
    ) -> None:
        while True:
            samples.append(await asyncio.to_thread(self.snapshot, sync, process, started))  # keeps clients going
            s = samples[-1]
            rss = "-" if s.rss_mib is None else f"{s.rss_mib:.0f} MiB"
            print(
                f"{s.seconds:7.0f}s  rss {rss}  running {s.running:.0f}  waiting {s.waiting:.0f}  "
                f"sent {s.sent}  completed {self.tally.completed}  disconnects {self.tally.disconnects}",
                flush=True,
            )
            await asyncio.sleep(self.args.sample_every)

    def snapshot(self, client: httpx.Client, process: psutil.Process | None, started: float) -> Sample:
        values = metrics(client)
        rss = process.memory_info().rss / MIB if process is not None else None
        return Sample(
            time.monotonic() - started,
            rss,
            values.get("spindle:num_requests_running", 0.0),
            values.get("spindle:num_requests_waiting", 0.0),
            self.tally.sent,
        )


def wait_idle(client: httpx.Client, timeout: float = 60.0) -> dict[str, float]:
    """The metrics once nothing runs or waits and no KV block is in use (or whatever they are after ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        values = metrics(client)
        idle = values.get("spindle:num_requests_running") == values.get("spindle:num_requests_waiting") == 0
        if (idle and values.get("spindle:kv_cache_usage_perc") == 0) or time.monotonic() > deadline:
            return values
        time.sleep(0.5)


def memory_growth(samples: list[Sample], warmup: float) -> tuple[float | None, float | None]:
    """Resident memory growth after the warm-up (mean of the last three samples less the first three), and peak."""
    rss = [s.rss_mib for s in samples if s.rss_mib is not None and s.seconds >= warmup]
    if len(rss) < 2:
        return None, None
    window = min(3, len(rss) // 2)
    growth = sum(rss[-window:]) / window - sum(rss[:window]) / window
    return growth, max(s.rss_mib for s in samples if s.rss_mib is not None)


def soak(args: argparse.Namespace, base_url: str, pid: int | None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with httpx.Client(base_url=base_url, headers=headers, timeout=30) as client:
        model = client.get("/v1/models").json()["data"][0]["id"]
        load = Load(args, base_url, model)
        process = psutil.Process(pid) if pid is not None else None
        samples: list[Sample] = []
        started = time.monotonic()
        asyncio.run(load.run(samples, process))
        drained_in = time.monotonic() - started - args.duration
        idle = wait_idle(client)
    tally = load.tally
    warmup = args.warmup if args.warmup is not None else args.duration / 5
    growth, peak = memory_growth(samples, warmup)
    total = idle.get("spindle:kv_cache_total_blocks", 0.0)
    leaked = total - idle.get("spindle:kv_cache_free_blocks", 0.0)
    server_errors = sum(count for status, count in tally.statuses.items() if status >= 500)
    failures = {
        "5xx responses": server_errors,
        "in-band errors": tally.inband_errors,
        "hung requests": tally.hung,
        "transport errors": tally.transport_errors,
        "KV blocks leaked": leaked,
        "requests still running or waiting": idle.get("spindle:num_requests_running", 0.0)
        + idle.get("spindle:num_requests_waiting", 0.0),
    }
    if growth is not None and growth > args.max_rss_growth_mib:
        failures["MiB of memory growth after the warm-up"] = growth
    return {
        "duration_seconds": args.duration,
        "clients": args.clients,
        "tally": asdict(tally) | {"statuses": dict(tally.statuses)},
        "server_5xx": server_errors,
        "drain_seconds": drained_in,
        "kv_blocks_total": total,
        "kv_blocks_leaked": leaked,
        "rss_growth_after_warmup_mib": growth,
        "rss_peak_mib": peak,
        "warmup_seconds": warmup,
        "rss_curve": [asdict(s) for s in samples],
        "failures": {name: value for name, value in failures.items() if value},
    }


def report(result: dict) -> None:
    tally = result["tally"]
    curve = [(s["seconds"], s["rss_mib"]) for s in result["rss_curve"] if s["rss_mib"] is not None]
    if curve:
        low, high = min(rss for _, rss in curve), max(rss for _, rss in curve)
        print(f"\nresident memory of the server (bars from {low:.0f} to {high:.0f} MiB):")
        for seconds, rss in curve:
            print(f"  {seconds:7.0f}s {rss:8.1f} MiB {'#' * round(50 * (rss - low) / max(high - low, 1e-9))}")
    print(
        f"\nrequests sent {tally['sent']}, completed {tally['completed']}, disconnects {tally['disconnects']}, "
        f"hung {tally['hung']}, in-band errors {tally['inband_errors']}, transport errors {tally['transport_errors']}"
    )
    print(f"responses by status: {dict(sorted(tally['statuses'].items()))}; slowest {tally['slowest_seconds']:.1f}s")
    print(f"KV blocks leaked: {result['kv_blocks_leaked']:.0f} of {result['kv_blocks_total']:.0f}")
    if result["rss_peak_mib"] is not None:
        print(
            f"memory: peak {result['rss_peak_mib']:.0f} MiB, growth after the {result['warmup_seconds']:.0f}s "
            f"warm-up {result['rss_growth_after_warmup_mib']:+.1f} MiB"
        )
    print("PASS" if not result["failures"] else f"FAIL: {result['failures']}")


def main(argv: list[str] | None = None) -> int:
    args, serve_flags = parse_args(sys.argv[1:] if argv is None else argv)
    if args.base_url:
        result = soak(args, args.base_url, args.pid)
    else:
        with own_server(serve_flags) as (url, pid):
            result = soak(args, url, pid)
    report(result)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
