"""Speculative decoding against plain decoding: tokens per target step, acceptance rate and wall-clock speedup of
every drafter at concurrency 1 and 8, on input-grounded prompts (rewrite / extract from a long text) and open-ended
chat prompts.

.venv/bin/python benchmarks/spec_decode.py [--dtype bfloat16|float32] [--tokens 128] [--model PATH]
    [--methods ngram,layer_skip,sparse_mlp,draft_model] [--concurrency 1,8] [--workloads grounded,open]
    [--num-threads N] [--rounds R]

The draft model is the target's first --draft-model-layers layers, written to a temporary directory; layer_skip
runs --draft-layers, sparse_mlp --draft-mlp-density. Speculation runs at every batch size here
(speculative_max_batch_size off), so the concurrency-8 rows show what the cutoff avoids.

Greedy decoding, so both runs should produce the same tokens (exactly so in float32; the "same output" column
counts the requests that did).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from engine.config import build_config
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams
from engine.spec.draft_model import write_truncated

TEXT = Path("/usr/share/common-licenses/GPL-3").read_text()
GROUNDED = [
    "Repeat the following text exactly, word for word:\n\n{}",
    "Rewrite the following text with every sentence on its own line, changing nothing else:\n\n{}",
    "Copy out the sentences of this text that mention software:\n\n{}",
    "Quote the first two sentences of this text:\n\n{}",
]
OPEN = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a refrigerator works.",
    "Give me ideas for a birthday party for a ten-year-old.",
    "What are the pros and cons of remote work?",
]


@dataclass
class Result:
    seconds: float
    tokens: int
    request_steps: int  # (request, step) pairs in which the request received tokens
    draft_tokens: int
    accepted_tokens: int
    outputs: dict[str, list[int]]


def workload(source: ModelSource, name: str, count: int) -> list[list[int]]:
    tokenizer = source.tokenizer
    prompts = []
    for i in range(count):
        if name == "grounded":
            passage = TEXT[2000 + 700 * i : 2000 + 700 * i + 1200]
            content = GROUNDED[i % len(GROUNDED)].format(passage)
        else:
            content = OPEN[i % len(OPEN)]
        prompts.append(tokenizer.encode_chat([{"role": "user", "content": content}]))
    return prompts


def run(engine: LLMEngine, prompts: list[list[int]], concurrency: int, params: SamplingParams) -> Result:
    """All prompts, at most ``concurrency`` in flight: the next one is added as soon as one finishes."""
    counters = engine.counters
    drafts_before, accepted_before = counters.spec_draft_tokens, counters.spec_accepted_tokens
    pending = list(enumerate(prompts))
    outputs: dict[str, list[int]] = {}
    in_flight = request_steps = 0
    started = time.perf_counter()
    while pending or engine.has_unfinished_requests():
        while pending and in_flight < concurrency:
            i, prompt = pending.pop(0)
            engine.add_request(str(i), prompt, params)
            outputs[str(i)] = []
            in_flight += 1
        for output in engine.step():
            if output.new_token_ids:
                request_steps += 1
                outputs[output.request_id].extend(output.new_token_ids)
            in_flight -= output.finished
    seconds = time.perf_counter() - started
    return Result(
        seconds,
        sum(len(tokens) for tokens in outputs.values()),
        request_steps,
        counters.spec_draft_tokens - drafts_before,
        counters.spec_accepted_tokens - accepted_before,
        outputs,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--methods", default="ngram,layer_skip,sparse_mlp,draft_model")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--workloads", default="grounded,open")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--num-prompts", type=int, default=8, help="per run; at least the run's concurrency")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--draft-layers", default="0-14")
    parser.add_argument("--draft-mlp-density", type=float, default=0.5)
    parser.add_argument("--draft-model-layers", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1, help="repeat every run; the median time counts")
    args = parser.parse_args()

    source = open_model(args.model)
    params = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.workloads.split(",")
    runs = [(name, c) for name in names for c in levels]
    prompts = {name: workload(source, name, max(args.num_prompts, *levels)) for name in names}
    count = {c: max(args.num_prompts, c) for c in levels}
    draft_dir = tempfile.mkdtemp(prefix="spindle-draft-")
    methods = ["none", *args.methods.split(",")]
    if "draft_model" in methods:
        write_truncated(source, Path(draft_dir), args.draft_model_layers)
    fields = {
        "none": {},
        "ngram": {},
        "layer_skip": {"draft_layers": args.draft_layers},
        "sparse_mlp": {"draft_mlp_density": args.draft_mlp_density},
        "draft_model": {"draft_model": draft_dir},
    }
    engines = {}
    for method in methods:
        overrides = {"dtype": args.dtype, "speculative_method": method, "speculative_max_batch_size": None}
        if args.num_threads:
            overrides["num_threads"] = args.num_threads
        config = build_config(None, overrides | fields[method])
        engines[method] = LLMEngine(config, source=source, progress=False)
        run(engines[method], prompts[names[0]][:1], 1, SamplingParams(temperature=0.0, max_tokens=16))  # warm-up
    # All engines run each workload back to back, round after round, so a slow phase of a shared machine hits them
    # alike; each run's time is the median over the rounds.
    results: dict[str, dict[tuple[str, int], Result]] = {method: {} for method in engines}
    for name, c in runs:
        rounds: dict[str, list[Result]] = {method: [] for method in engines}
        for _ in range(args.rounds):
            for method, engine in engines.items():
                rounds[method].append(run(engine, prompts[name][: count[c]], c, params))
        for method, repeats in rounds.items():
            median = statistics.median(result.seconds for result in repeats)
            results[method][(name, c)] = dataclasses.replace(repeats[0], seconds=median)

    print(f"model: {source.name}  dtype: {args.dtype}  max {args.tokens} tokens per request")
    print("drafter      workload   conc  tok/step  accept  tok/s plain  tok/s spec  speedup  same output")
    for method in methods[1:]:
        for name, c in runs:
            plain, spec = results["none"][(name, c)], results[method][(name, c)]
            same = sum(plain.outputs[rid] == spec.outputs[rid] for rid in plain.outputs)
            acceptance = spec.accepted_tokens / spec.draft_tokens if spec.draft_tokens else 0.0
            print(
                f"{method:<12} {name:<10} {c:>4}  {spec.tokens / spec.request_steps:>8.2f}  {acceptance:>6.1%}"
                f"  {plain.tokens / plain.seconds:>11.1f}  {spec.tokens / spec.seconds:>10.1f}"
                f"  {plain.seconds * spec.tokens / (spec.seconds * plain.tokens):>6.2f}x  {same}/{len(plain.outputs)}"
            )


if __name__ == "__main__":
    main()
