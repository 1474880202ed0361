"""Offline throughput: Spindle's engine against HF transformers ``generate`` with static batching, same weights.

    .venv/bin/python benchmarks/offline_throughput.py [--num-prompts 128] [--input-len 256] [--output-len 128]
        [--hf-batch-size 32] [--dtype bfloat16] [--skip-hf] [--profile]

Prompts are distinct slices of a real English text, cut to --input-len tokens; every request generates exactly
--output-len tokens (EOS ignored). Both sides run in this process, one after the other, on the same machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.offline import run_offline
from engine.config import build_config
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

TEXT = Path("/usr/share/common-licenses/GPL-3")


def make_prompts(tokenizer, count: int, length: int) -> list[list[int]]:
    ids = tokenizer.encode(TEXT.read_text())
    stride = max((len(ids) - length) // count, 1)
    return [ids[(i * stride) % (len(ids) - length) :][:length] for i in range(count)]


def run_hf(model_path: Path, prompts: list[list[int]], output_len: int, batch_size: int, dtype: torch.dtype) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path.parent), gguf_file=model_path.name, dtype=dtype)
    model.eval()
    started = time.perf_counter()
    for first in range(0, len(prompts), batch_size):
        batch = torch.tensor(prompts[first : first + batch_size])  # equal lengths: no padding needed
        with torch.inference_mode():
            model.generate(
                batch,
                attention_mask=torch.ones_like(batch),
                max_new_tokens=output_len,
                min_new_tokens=output_len,
                do_sample=False,
                pad_token_id=0,
            )
    return time.perf_counter() - started


def profile_decode_step(engine: LLMEngine, prompts: list[list[int]]) -> None:
    """Where one full-batch decode step spends its time: model operators vs the rest (Python, scheduling)."""
    from torch.profiler import ProfilerActivity, profile

    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, params)
    prompt_tokens = engine.counters.prompt_tokens + sum(len(p) for p in prompts)
    while engine.counters.prompt_tokens < prompt_tokens:  # finish every prefill, then profile a pure decode step
        engine.step()
    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        engine.step()
    wall = time.perf_counter() - started
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    ops = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e6
    print(f"decode step wall {wall * 1000:.1f} ms, of which aten operators {ops * 1000:.1f} ms")
    for i in range(len(prompts)):
        engine.abort_request(f"p{i}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-prompts", type=int, default=128)
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--hf-batch-size", type=int, default=32)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--skip-hf", action="store_true")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()

    overrides = {"dtype": args.dtype}
    if args.max_num_seqs:
        overrides["max_num_seqs"] = args.max_num_seqs
    engine = LLMEngine(build_config(overrides=overrides), progress=False)
    prompts = make_prompts(engine.tokenizer, args.num_prompts, args.input_len)
    total_out = args.num_prompts * args.output_len
    if args.profile:
        profile_decode_step(engine, prompts[: engine.scheduler_config.max_num_seqs])
    run = run_offline(engine, prompts, [args.output_len] * len(prompts))
    spindle_s = run.duration
    print(f"spindle (max_num_seqs {engine.scheduler_config.max_num_seqs}): {run.report()}")
    if not args.skip_hf:
        hf_s = run_hf(engine.source.path, prompts, args.output_len, args.hf_batch_size, engine.config.model.torch_dtype)
        print(
            f"hf transformers generate (static batch {args.hf_batch_size}): {hf_s:.1f} s, {total_out / hf_s:.1f} tok/s"
        )
        print(f"speed-up: {hf_s / spindle_s:.2f}x")


if __name__ == "__main__":
    main()
