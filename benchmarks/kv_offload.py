"""KV offload tiers measured on the default model: swap vs recompute preemption, and the prefix-cache disk tier.

    .venv/bin/python benchmarks/kv_offload.py [--requests 8 --prompt-len 1024 --output-len 64 --pool-requests 3]
        [--disk-prompt-len 4096] [--skip-swap] [--skip-disk] [--json results/kv_offload.json]

1. Swap vs recompute under KV pressure: --requests requests of --prompt-len random tokens each (prompts share no
   prefix) and --output-len greedy tokens, all arriving at once, in a KV pool that holds --pool-requests of them.
   Each preemption mode runs the same workload in its own engine; the table has output tokens/s over the whole run,
   mean and p90 TTFT, preemptions (swapped / all), bytes swapped out, and prompt tokens computed (recomputation
   shows here).
2. Disk prefix tier: TTFT of one --disk-prompt-len-token prompt (real English text) with one output token: cold (an
   empty store), warm in memory (the same prompt again), warm on disk (the memory prefix cache cleared, the store
   kept) and after a restart (a new engine over the same store directory).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from engine.config import build_config
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams

TEXT = Path("/usr/share/common-licenses/GPL-3")


def make_engine(source: ModelSource, dtype: str, **fields: object) -> LLMEngine:
    return LLMEngine(build_config(None, {"dtype": dtype, **fields}), source=source, progress=False)


def run_batch(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> tuple[float, list[float], int]:
    """All prompts at once; returns wall seconds, each request's TTFT and the output tokens."""
    started = time.monotonic()
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, params, arrival_time=started)
    ttfts: dict[str, float] = {}
    num_tokens = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            num_tokens += len(output.new_token_ids)
            if output.new_token_ids and output.request_id not in ttfts:
                ttfts[output.request_id] = time.monotonic() - started
    return time.monotonic() - started, list(ttfts.values()), num_tokens


def swap_vs_recompute(source: ModelSource, args: argparse.Namespace) -> list[dict[str, object]]:
    rng = random.Random(0)
    vocab = source.spec.vocab_size
    prompts = [[rng.randrange(100, vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    params = SamplingParams(temperature=0.0, max_tokens=args.output_len, ignore_eos=True)
    layout = KVCacheLayout.for_model(source.spec, 16, build_config(None, {"dtype": args.dtype}).model.torch_dtype)
    pool_tokens = args.pool_requests * (args.prompt_len + args.output_len)
    memory = str(-(-pool_tokens // 16) * layout.bytes_per_block)
    rows = []
    for mode in args.modes:
        engine = make_engine(
            source,
            args.dtype,
            kv_cache_memory=memory,
            max_model_len=args.prompt_len + args.output_len,
            enable_prefix_caching=False,
            preemption_mode=mode,
            swap_space="2GiB",
        )
        seconds, ttfts, num_tokens = run_batch(engine, prompts, params)
        stats = engine.stats()
        row = {
            "mode": mode,
            "output_tokens_per_s": num_tokens / seconds,
            "seconds": seconds,
            "mean_ttft_s": statistics.mean(ttfts),
            "p90_ttft_s": statistics.quantiles(ttfts, n=10)[-1] if len(ttfts) > 1 else ttfts[0],
            "preemptions": stats.num_preemptions,
            "swap_preemptions": stats.num_swap_preemptions,
            "swapped_out_mib": engine.counters.swap.swapped_out_bytes / 2**20,
            "prompt_tokens_computed": engine.counters.prompt_tokens,
        }
        print(
            f"{mode:>9}: {row['output_tokens_per_s']:.1f} output tok/s ({seconds:.1f} s), TTFT mean "
            f"{row['mean_ttft_s']:.2f} s p90 {row['p90_ttft_s']:.2f} s, preemptions {stats.num_swap_preemptions}"
            f"/{stats.num_preemptions} swapped, {row['swapped_out_mib']:.0f} MiB out, "
            f"{engine.counters.prompt_tokens} prompt tokens computed",
            flush=True,
        )
        rows.append(row)
        engine.close()
    return rows


def ttft(engine: LLMEngine, prompt: list[int]) -> float:
    return run_batch(engine, [prompt], SamplingParams(temperature=0.0, max_tokens=1))[1][0]


def disk_tier(source: ModelSource, args: argparse.Namespace) -> dict[str, float]:
    prompt = source.tokenizer.encode(TEXT.read_text())[: args.disk_prompt_len]
    fields = {"max_model_len": args.disk_prompt_len + 16, "kv_cache_memory": "1GiB"}
    results = {}
    with tempfile.TemporaryDirectory(prefix="spindle-kv-disk-") as directory:
        engine = make_engine(source, args.dtype, kv_disk_dir=directory, **fields)
        results["cold"] = ttft(engine, prompt)
        engine.offloader.disk_store.flush()  # the writes of the cold run are not part of the next measurements
        results["warm in memory"] = ttft(engine, prompt)
        engine.kv_manager.pool.reset_prefix_cache()
        results["warm on disk"] = ttft(engine, prompt)
        hits = engine.counters.disk.hits
        engine.close()
        restarted = make_engine(source, args.dtype, kv_disk_dir=directory, **fields)
        results["after restart"] = ttft(restarted, prompt)
        hits_after_restart = restarted.counters.disk.hits
        restarted.close()
    for name, seconds in results.items():
        print(f"{name:>15}: TTFT {seconds * 1000:.0f} ms", flush=True)
    print(f"blocks from disk: {hits} warm on disk, {hits_after_restart} after restart ({len(prompt)}-token prompt)")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--pool-requests", type=float, default=3, help="requests the KV pool holds at full length")
    parser.add_argument("--modes", nargs="+", default=["recompute", "swap", "auto"])
    parser.add_argument("--disk-prompt-len", type=int, default=4096)
    parser.add_argument("--skip-swap", action="store_true")
    parser.add_argument("--skip-disk", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    source = open_model()
    results: dict[str, object] = {}
    if not args.skip_swap:
        results["swap_vs_recompute"] = swap_vs_recompute(source, args)
    if not args.skip_disk:
        results["disk_tier_ttft_s"] = disk_tier(source, args)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
