"""Load time, resident memory after load, and single-sequence decode speed of the engine.

.venv/bin/python benchmarks/single_stream.py [--dtype auto|bfloat16|float32] [--tokens 128] [--model PATH]
    [--weight-quantization auto|none|int4] [--activation-quantization none|int8]
"""

from __future__ import annotations

import argparse
import time

import psutil
import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from kernels.cpu_profile import cpu_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prompt", default="Write a short story about a lighthouse keeper.")
    parser.add_argument("--weight-quantization", default="auto", help="4-bit weight copies for small steps")
    parser.add_argument("--activation-quantization", default="none", help="int8: quantize fp32 activations (lossy)")
    args = parser.parse_args()

    process = psutil.Process()
    rss_before = process.memory_info().rss
    started = time.perf_counter()
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        weight_quantization=args.weight_quantization,
        activation_quantization=args.activation_quantization,
    )
    load_seconds = time.perf_counter() - started
    rss_after = process.memory_info().rss
    engine = llm.engine

    params = SamplingParams(temperature=0.0, max_tokens=args.tokens, ignore_eos=True)
    prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))  # warm-up
    engine.add_request("bench", prompt, params)
    step_times = []
    while engine.has_unfinished_requests():
        t0 = time.perf_counter()
        engine.step()
        step_times.append(time.perf_counter() - t0)
    prefill, decode = step_times[0], sorted(step_times[1:])
    print(
        f"model: {engine.model_name}  dtype: {args.dtype} ({ModelConfig(dtype=args.dtype).torch_dtype})  "
        f"weight quantization: {args.weight_quantization}  activation quantization: {args.activation_quantization}  "
        f"threads: {torch.get_num_threads()}  "
        f"CPU: {cpu_profile().describe()}"
    )
    print(f"load time: {load_seconds:.2f} s")
    kv_mib = engine.num_kv_blocks * engine.kv_layout.bytes_per_block / 2**20
    grew_mib = (rss_after - rss_before) / 2**20
    print(
        f"resident memory after load: {rss_after / 2**20:.0f} MiB (grew {grew_mib:.0f} MiB, KV cache {kv_mib:.0f} MiB)"
    )
    print(f"prefill of {len(prompt)} tokens: {prefill * 1000:.1f} ms")
    print(
        f"decode: {len(decode)} tokens, median {decode[len(decode) // 2] * 1000:.1f} ms/token, "
        f"{len(decode) / sum(decode):.1f} tokens/s"
    )


if __name__ == "__main__":
    main()
