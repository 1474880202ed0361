"""`spindle router` policies on a shared-prefix chat workload: the replicas' prefix-cache hit rate, throughput and
time to first token under each routing policy.

Starts two `spindle serve` replicas and one router per policy on loopback, then sends the same kind of workload
(`--groups` system prompts of `--prefix-len` tokens shared by `--num-prompts` chat requests, in random order) through
each router, with fresh system prompts per policy so that no policy finds another's prefixes cached. The hit rate is
prefix-cache hits over lookups summed over both replicas' /metrics, before and after each run.

    .venv/bin/python benchmarks/router_prefix.py [--num-prompts 96] [--groups 8] [--prefix-len 512]
        [--max-concurrency 8] [--replicas 2] [-- spindle serve flags for the replicas]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bench.client import CHAT_ENDPOINT
from bench.datasets import prefix_dataset
from bench.metrics import summarize
from bench.serve import LoadSettings, discover_model, run_load
from engine.loader import open_model

REPO = Path(__file__).resolve().parents[1]
POLICIES = ("prefix", "round_robin", "least_loaded")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextmanager
def spindle(command: list[str], logs: Path, name: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """``spindle COMMAND`` on a free port until the block ends; yields its URL and process (not waiting for it)."""
    port = free_port()
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *command, "--port", str(port)],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={k: v for k, v in os.environ.items() if not k.startswith("SPINDLE_")},
        )
    try:
        yield f"http://127.0.0.1:{port}", process
    finally:
        process.terminate()
        process.wait(timeout=60)


def wait_healthy(url: str, process: subprocess.Popen[bytes], timeout: float = 900) -> str:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}; see its log")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{process.args} did not become healthy in {timeout} s")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return url
        except httpx.TransportError:
            pass
        time.sleep(0.5)


def prefix_counters(replicas: list[str]) -> tuple[float, float]:
    """Prefix-cache (hits, queries) summed over the replicas."""
    hits = queries = 0.0
    for url in replicas:
        for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
            for sample in family.samples:
                if sample.name == "spindle:prefix_cache_hits_total":
                    hits += sample.value
                elif sample.name == "spindle:prefix_cache_queries_total":
                    queries += sample.value
    return hits, queries


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-prompts", type=int, default=96)
    parser.add_argument("--groups", type=int, default=8, help="distinct shared system prompts")
    parser.add_argument("--prefix-len", type=int, default=512, help="tokens of each system prompt")
    parser.add_argument("--suffix-len", type=int, default=32, help="tokens of each user message")
    parser.add_argument("--output-len", type=int, default=16)
    parser.add_argument("--max-concurrency", type=int, default=8)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=list(POLICIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("serve_flags", nargs="*", help="after --: `spindle serve` flags for every replica")
    args = parser.parse_args()

    tokenizer = open_model(None).tokenizer
    with tempfile.TemporaryDirectory() as logs_dir, ExitStack() as stack:
        logs = Path(logs_dir)
        launched = [
            stack.enter_context(spindle(["serve", *args.serve_flags], logs, f"replica{i}"))
            for i in range(args.replicas)
        ]
        replicas = [wait_healthy(url, process) for url, process in launched]  # they load side by side
        replica_flags = [item for url in replicas for item in ("--replica", url)]
        rows = []
        for number, policy in enumerate(args.policies):
            requests = prefix_dataset(
                tokenizer,
                args.num_prompts,
                args.groups,
                args.prefix_len,
                args.suffix_len,
                args.output_len,
                seed=args.seed + 1000 * number,  # fresh system prompts per policy
            )
            # In dataset order, groups cycle (0, 1, ..., 0, 1, ...), which round robin would map onto the replicas
            # one to one whenever the group count is a multiple of the replica count.
            random.Random(args.seed).shuffle(requests)
            with spindle(["router", *replica_flags, "--routing-policy", policy], logs, f"router-{policy}") as started:
                router = wait_healthy(*started)
                model = asyncio.run(discover_model(router, None))
                settings = LoadSettings(
                    router, CHAT_ENDPOINT, model, max_concurrency=args.max_concurrency, ignore_eos=True, progress=False
                )
                hits_before, queries_before = prefix_counters(replicas)
                results, duration = asyncio.run(run_load(requests, settings))
                hits_after, queries_after = prefix_counters(replicas)
            summary = summarize(results, duration)
            hit_rate = (hits_after - hits_before) / max(queries_after - queries_before, 1)
            rows.append((policy, hit_rate, summary))
            print(f"{policy}: done in {duration:.1f} s", file=sys.stderr)

    print(
        f"\n{args.replicas} replicas, {args.num_prompts} chat requests, {args.groups} system prompts of "
        f"{args.prefix_len} tokens + {args.suffix_len}-token user messages -> {args.output_len} tokens, "
        f"concurrency {args.max_concurrency}\n"
    )
    print("| policy | prefix-cache hit rate | completed | requests/s | output tok/s | median TTFT | p99 TTFT |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for policy, hit_rate, summary in rows:
        print(
            f"| `{policy}` | {hit_rate:.1%} | {summary['completed']}/{args.num_prompts} | "
            f"{summary['request_throughput']:.2f} | {summary['output_throughput']:.1f} | "
            f"{summary['median_ttft_ms']:.0f} ms | {summary['p99_ttft_ms']:.0f} ms |"
        )


if __name__ == "__main__":
    main()
