"""Tensor parallelism: output throughput at a few concurrencies and resident memory per rank, one rank against N.

    .venv/bin/python benchmarks/tensor_parallel.py [--sizes 1 2] [--concurrency 1 4 16] [--input-len 128]
        [--output-len 64] [--dtype bfloat16] [--kv-cache-memory 256MiB] [--num-threads T]

Each size gets a fresh engine in this process (rank 0; the other ranks are its worker processes), sharing the
machine's cores evenly: one rank uses every core, N ranks each use cores / N threads (or --num-threads each). At
each concurrency c, c requests of --input-len prompt tokens (distinct slices of a real English text) generate
exactly --output-len tokens together (EOS ignored), after one warm-up run. Resident memory (RSS) is read per rank
after the runs.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import psutil

from bench.offline import run_offline
from engine.config import build_config
from engine.llm_engine import LLMEngine

TEXT = Path("/usr/share/common-licenses/GPL-3")


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text())
    stride = max((len(ids) - length) // count, 1)
    return [ids[(i * stride) % (len(ids) - length) :][:length] for i in range(count)]


def rss_per_rank(engine: LLMEngine) -> list[float]:
    pids = [os.getpid()] + [process.pid for process in engine.ranks.processes]
    return [psutil.Process(pid).memory_info().rss / 2**20 for pid in pids]


def measure(size: int, args: argparse.Namespace) -> None:
    engine = LLMEngine(
        build_config(
            None,
            {
                "tensor_parallel_size": size,
                "dtype": args.dtype,
                "kv_cache_memory": args.kv_cache_memory,
                "max_num_seqs": max(args.concurrency),
                "num_threads": args.num_threads,
            },
        ),
        progress=False,
    )
    try:
        prompts = make_prompts(engine.tokenizer, max(args.concurrency), args.input_len)
        run_offline(engine, prompts[:2], [8, 8])  # warm-up: first-use costs out of the timed runs
        for concurrency in args.concurrency:
            run = run_offline(engine, prompts[:concurrency], [args.output_len] * concurrency)
            print(
                f"TP={size} ({engine.ranks.num_threads} thread(s) per rank) concurrency {concurrency:>3}: "
                f"{run.output_tokens / run.duration:7.1f} output tok/s, "
                f"median step {sorted(run.step_seconds)[len(run.step_seconds) // 2] * 1000:6.1f} ms",
                flush=True,
            )
        rss = ", ".join(f"rank {rank} {mib:.0f} MiB" for rank, mib in enumerate(rss_per_rank(engine)))
        print(f"TP={size} resident memory: {rss}", flush=True)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--kv-cache-memory", default="256MiB")
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args()
    for size in args.sizes:
        measure(size, args)


if __name__ == "__main__":
    main()
