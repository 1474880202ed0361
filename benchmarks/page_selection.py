"""Page selection for decode (kv_policy quest) against full attention, at several context lengths and budgets.

    .venv/bin/python benchmarks/page_selection.py [--contexts 2048 4096 8192] [--budgets 256 512 1024]
        [--scored 64] [--depths 0.25 0.5 0.75] [--keys-per-cell 1] [--attention-only] [--json out.json]

First, decode attention alone (the part page selection changes), per token of one sequence in bf16 at the default
model's shapes (30 layers, 9 query heads, 3 KV heads, head_dim 64): the CPU backend's step preparation plus 30
layers of KV write, attention and, under page selection, block scoring, choice and summary update; median of
--repeats. Then the model end to end (skipped with --attention-only).
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

import torch
from kv_policies import QUESTION, TEXT, passkey_prompts

from engine.config import build_config
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams
from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend
from kernels.native import load_native_kernels
from kernels.page_selecting_backend import PageSelectingBackend
from kernels.page_selection import PageSelectionPolicy

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


def attention_per_token(context: int, budget: int | None, repeats: int) -> tuple[float, float]:
    """Decode attention of one sequence holding ``context`` tokens, over all layers (see the module docstring):
    milliseconds, and MiB of K/V read."""
    layers, heads, kv_heads, head_dim, block_size = 30, 9, 3, 64, 16
    generator = torch.Generator().manual_seed(context)
    num_blocks = -(-context // block_size)
    key_cache, value_cache = (
        torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=generator).bfloat16() for _ in range(2)
    )
    table = torch.randperm(num_blocks, generator=generator).tolist()
    slot = table[(context - 1) // block_size] * block_size + (context - 1) % block_size
    layout = BatchLayout([1], [context], [table], torch.tensor([slot]), block_size)
    backend = CpuAttentionBackend(load_native_kernels())
    blocks_read = num_blocks
    if budget is not None:
        policy = PageSelectionPolicy.from_tokens(budget, 4, 32, block_size)
        backend = PageSelectingBackend(backend, policy, [key_cache])
        blocks_read = min(num_blocks, policy.budget_blocks)
    query = torch.randn(1, heads, head_dim, generator=generator).bfloat16()
    key, value = torch.randn(2, 1, kv_heads, head_dim, generator=generator).bfloat16()
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        metadata = backend.prepare(layout, torch.bfloat16)
        for _ in range(layers):
            backend.forward(query, key, value, key_cache, value_cache, metadata, head_dim**-0.5)
        timings.append(time.perf_counter() - started)
    block_bytes = 2 * block_size * kv_heads * head_dim * key_cache.element_size()  # K and V
    return statistics.median(timings) * 1000, blocks_read * layers * block_bytes / 2**20


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
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats of the attention-only measurement")
    parser.add_argument(
        "--attention-threads",
        type=int,
        default=1,
        help="threads of the attention-only measurement (on a shared "
        "machine one thread avoids timing a descheduled OpenMP partner)",
    )
    parser.add_argument("--attention-only", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    threads = torch.get_num_threads()
    torch.set_num_threads(args.attention_threads)
    print(f"decode attention per token, one sequence, 30 layers (bf16, CPU backend, {args.attention_threads} threads):")
    print("| context | " + " | ".join(["full", *(f"quest:{b}" for b in args.budgets)]) + " |")
    print("|---" * (len(args.budgets) + 2) + "|")
    for context in args.contexts:
        measured = [attention_per_token(context, budget, args.repeats) for budget in [None, *args.budgets]]
        full = measured[0][0]
        cells = [f"{ms:.2f} ms ({ms / full:.2f}x), {mib:.1f} MiB" for ms, mib in measured]
        print(f"| {context} | " + " | ".join(cells) + " |", flush=True)
    torch.set_num_threads(threads)
    if args.attention_only:
        return
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
