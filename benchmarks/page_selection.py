"""Page selection for decode (kv_policy quest) against full attention, at several context lengths and budgets.

    .venv/bin/python benchmarks/page_selection.py [--contexts 2048 4096 8192] [--budgets 256 512 1024]
        [--scored 64] [--depths 0.25 0.5 0.75] [--keys-per-cell 1] [--json results/page_selection.json]

Page selection only changes decode rows (one query token), so every measured token is read as one: a sequence is
prefilled up to its last tokens, which are then computed one per step. Per context length and setting (bf16, one
sequence at a time), one table row:
- decode latency per token: the median step of the one-token steps below (measured on a shared machine: compare
  rows of one run, not runs);
- KV bytes read per decode step (all layers, K and V) from the engine's blocks-read counter, and the share of
  what full attention reads;
- perplexity of the last --scored tokens of a window of Debian's GPL-3 as long as the context (the whole text,
  about 7.6k tokens, where the context is longer), and its change against full attention;
- passkey retrieval (the benchmark of benchmarks/kv_policies.py): the question at the end of the prompt and the
  answer are all decode rows, so the key must be found in the selected blocks.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from kv_policies import QUESTION, TEXT, passkey_prompts

from engine.config import build_config
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams

PREFILL_CHUNK = 2048


@dataclass
class Row:
    context: int
    setting: str
    decode_ms_per_token: float
    kv_bytes_per_step: float
    kv_read_share: float
    perplexity: float
    passkey: float


@dataclass
class Read:
    text: str
    logprobs: list[float]  # of the prompt's tokens, from its second on
    step_seconds: list[float]  # of the one-token steps


def read_with_decode_tail(engine: LLMEngine, ids: list[int], params: SamplingParams, tail: int) -> Read:
    """Run one request alone: its prompt prefilled in chunks up to the last ``tail`` tokens, those and the output
    one token per step. The step budget is changed between steps to get there (a benchmark's liberty)."""
    config = engine.scheduler.config
    chunk = config.max_num_batched_tokens
    engine.add_request("r", ids, params)
    text, logprobs, step_seconds = "", [], []
    try:
        while engine.has_unfinished_requests():
            request = engine.scheduler.get_request("r")
            left = len(ids) - tail - (request.num_computed_tokens if request is not None else 0)
            config.max_num_batched_tokens = min(chunk, left) if left > 0 else 1
            started = time.perf_counter()
            outputs = engine.step()
            if left <= 0:
                step_seconds.append(time.perf_counter() - started)
            for output in outputs:
                text += output.new_text
                logprobs += [entry.logprob for entry in output.prompt_logprobs or []]
    finally:
        config.max_num_batched_tokens = chunk
    return Read(text, logprobs, step_seconds)


def measure(source: ModelSource, context: int, budget: int | None, args: argparse.Namespace, text: list[int]) -> Row:
    policy = {} if budget is None else {"kv_policy": "quest", "kv_budget": budget}
    config = {"dtype": "bfloat16", "max_model_len": context, "max_num_batched_tokens": PREFILL_CHUNK, **policy}
    engine = LLMEngine(build_config(None, config), source=source, progress=False)
    window = text[: min(context - 1, len(text))]  # and the one output token
    read = read_with_decode_tail(engine, window, SamplingParams(max_tokens=1, prompt_logprobs=0), args.scored)
    perplexity = math.exp(-statistics.fmean(read.logprobs[-(args.scored - 1) :]))
    counters = engine.counters
    held = sum(-(-(p + 1) // engine.kv_layout.block_size) for p in range(len(window) - args.scored, len(window)))
    read_blocks = counters.page_selection_blocks_read if budget is not None else held
    bytes_per_block = engine.kv_layout.bytes_per_block
    cases = passkey_prompts(source, [context - 16], args.depths, args.keys_per_cell)
    tail = len(source.tokenizer.encode(QUESTION))
    answers = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    found = sum(key in read_with_decode_tail(engine, prompt, answers, tail).text for prompt, key in cases)
    return Row(
        context,
        "full" if budget is None else f"quest:{budget}",
        statistics.median(read.step_seconds) * 1000,
        read_blocks / args.scored * bytes_per_block,
        read_blocks / held,
        perplexity,
        found / len(cases),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", nargs="+", type=int, default=[2048, 4096, 8192])
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 512, 1024], help="kv_budget in tokens")
    parser.add_argument("--scored", type=int, default=64, help="tokens read as decode rows for perplexity")
    parser.add_argument("--depths", nargs="+", type=float, default=[0.25, 0.5, 0.75])
    parser.add_argument("--keys-per-cell", type=int, default=1)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    source = open_model()
    text = source.tokenizer.encode(TEXT.read_text())
    print(f"text: {len(text)} tokens; {args.scored} scored decode tokens; passkey depths {args.depths}")
    columns = ["context", "setting", "decode ms/token", "KV read/step", "of full", "perplexity", "vs full", "passkey"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|", flush=True)
    rows: list[Row] = []
    for context in args.contexts:
        baseline = None
        for budget in [None, *args.budgets]:
            row = measure(source, context, budget, args, text)
            rows.append(row)
            baseline = baseline or row
            print(
                f"| {context} | {row.setting} | {row.decode_ms_per_token:.1f} "
                f"({row.decode_ms_per_token / baseline.decode_ms_per_token:.2f}x) | "
                f"{row.kv_bytes_per_step / 2**20:.1f} MiB | {row.kv_read_share:.0%} | {row.perplexity:.3f} | "
                f"{(row.perplexity / baseline.perplexity - 1) * 100:+.1f}% | {row.passkey:.0%} |",
                flush=True,
            )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))


if __name__ == "__main__":
    main()
