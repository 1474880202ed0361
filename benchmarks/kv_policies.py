"""KV-cache policies and quantized KV measured: memory, quality and speed of each setting on the default model.

    .venv/bin/python benchmarks/kv_policies.py [--settings none int8 snapkv:256 int8+snapkv:256 ...]
        [--chunk 64] [--skip-throughput] [--json results/kv_policies.json]

A setting is ``[int8+|int4+]POLICY[:BUDGET]``: an optional KV-cache dtype, then a policy and its budget in rows.
For each setting it prints one table row:
- KV bytes per token (all layers, K and V), and the KV memory one sequence holding the perplexity text saves against
  bf16 with no policy: bytes per token times the rows it keeps (the budget, or every token).
- Perplexity (fp32) of a long real English text (Debian's GPL-3, ~7.6k tokens) read through the engine in chunks
  of --chunk tokens with prompt logprobs, so that eviction happens as the text streams in; and its change against
  no policy.
- Passkey retrieval (fp32): a 5-digit key hidden at several depths of filler text of several lengths; the share of
  greedy answers that contain the key.
- Peak concurrent sequences (bf16) in a fixed KV memory (--concurrency-memory) with 1024-token prompts and 64 output
  tokens each: how many the scheduler actually ran at once.
- Decode throughput (bf16) at concurrency 32: output tokens/s over 32 requests of 512 prompt tokens -> 128 tokens.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.offline import run_offline
from engine.config import build_config
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams

TEXT = Path("/usr/share/common-licenses/GPL-3")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


DEFAULT_SETTINGS = [
    *("none", "int8", "int4", "sink_window:256", "sink_window:1024", "key_norm:256", "key_norm:1024"),
    *("snapkv:256", "snapkv:1024", "evict_merge:256", "evict_merge:1024", "int8+snapkv:256"),
]


@dataclass
class Row:
    setting: str
    kv_bytes_per_token: int
    kv_saving: float
    perplexity: float
    passkey: float
    peak_sequences: int
    decode_tokens_per_s: float | None


def parse_setting(setting: str) -> dict[str, str | int]:
    """``int8+snapkv:256`` -> the config fields it sets."""
    dtype, _, rest = setting.rpartition("+")
    if not dtype and rest in ("int8", "int4"):  # a KV-cache dtype alone
        dtype, rest = rest, "none"
    policy, _, budget = rest.partition(":")
    fields: dict[str, str | int] = {"kv_cache_dtype": dtype or "auto", "kv_policy": policy}
    if budget:
        fields["kv_budget"] = int(budget)
    return fields


def make_engine(source: ModelSource, setting: str, **overrides) -> LLMEngine:
    return LLMEngine(build_config(None, {**parse_setting(setting), **overrides}), source=source, progress=False)


def perplexity(engine: LLMEngine, ids: list[int]) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=0)
    engine.add_request("ppl", ids, params)
    entries = None
    while engine.has_unfinished_requests():
        for output in engine.step():
            entries = output.prompt_logprobs if output.prompt_logprobs is not None else entries
    assert entries is not None and len(entries) == len(ids) - 1
    return math.exp(-sum(entry.logprob for entry in entries) / len(entries))


def passkey_prompts(source: ModelSource, lengths: list[int], depths: list[float], keys_per_cell: int):
    """(prompt ids, key) pairs: the needle at each depth of filler cut to about each length."""
    tokenizer = source.tokenizer
    filler = tokenizer.encode(FILLER * 400)
    rng = random.Random(0)
    cases = []
    for length in lengths:
        for depth in depths:
            for _ in range(keys_per_cell):
                key = str(rng.randrange(10000, 100000))
                needle = tokenizer.encode(f"The pass key is {key}. Remember it. {key} is the pass key. ")
                body = filler[: length - len(needle) - 16]
                at = int(len(body) * depth)
                cases.append((body[:at] + needle + body[at:] + tokenizer.encode(QUESTION), key))
    return cases


def passkey_accuracy(engine: LLMEngine, cases) -> float:
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    texts: dict[str, str] = {}
    for i, (prompt, _) in enumerate(cases):
        engine.add_request(f"key{i}", prompt, params)
    while engine.has_unfinished_requests():
        for output in engine.step():
            texts[output.request_id] = texts.get(output.request_id, "") + output.new_text
    return sum(key in texts[f"key{i}"] for i, (_, key) in enumerate(cases)) / len(cases)


def peak_sequences(engine: LLMEngine, prompts: list[list[int]]) -> int:
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"c{i}", prompt, params)
    peak = 0
    while engine.has_unfinished_requests():
        engine.step()
        peak = max(peak, engine.scheduler.num_running)
    return peak


def text_slices(ids: list[int], count: int, length: int) -> list[list[int]]:
    stride = max((len(ids) - length) // count, 1)
    return [ids[(i * stride) % (len(ids) - length) :][:length] for i in range(count)]


def measure(source: ModelSource, setting: str, args: argparse.Namespace, text: list[int]) -> Row:
    quality = {"dtype": "float32", "max_num_batched_tokens": args.chunk, "kv_cache_memory": "512MiB"}
    ppl = perplexity(make_engine(source, setting, **quality), text)
    cases = passkey_prompts(source, args.passkey_lengths, args.depths, args.keys_per_cell)
    keys = passkey_accuracy(make_engine(source, setting, **{**quality, "max_num_seqs": len(cases)}), cases)
    # Each request's prefill grows its cache by at most 256 rows per step before compaction.
    serving = {"max_num_seqs": 256, "long_prefill_token_threshold": 256, "max_num_batched_tokens": 512}
    engine = make_engine(source, setting, kv_cache_memory=args.concurrency_memory, **serving)
    peak = peak_sequences(engine, text_slices(text, args.concurrency_requests, 1024))
    bytes_per_token = engine.kv_layout.bytes_per_token
    bf16_bytes = make_engine(source, "none", kv_cache_memory="1MiB").kv_layout.bytes_per_token
    rows = engine.compactor.policy.budget if engine.compactor is not None else len(text)
    speed = None
    if not args.skip_throughput:
        engine = make_engine(source, setting, max_num_seqs=32, kv_cache_memory="1GiB")
        run = run_offline(engine, text_slices(text, 32, 512), [128] * 32)
        speed = run.output_tokens / run.duration
    saving = bf16_bytes * len(text) / (bytes_per_token * rows)
    return Row(setting, bytes_per_token, saving, ppl, keys, peak, speed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    parser.add_argument("--chunk", type=int, default=64, help="tokens per prefill step when reading the text")
    parser.add_argument("--passkey-lengths", nargs="+", type=int, default=[1024, 3072])
    parser.add_argument("--depths", nargs="+", type=float, default=[0.2, 0.5, 0.8])
    parser.add_argument("--keys-per-cell", type=int, default=2)
    parser.add_argument("--concurrency-memory", default="96MiB")
    parser.add_argument("--concurrency-requests", type=int, default=48)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    source = open_model()
    text = source.tokenizer.encode(TEXT.read_text())
    print(f"text: {len(text)} tokens; passkey contexts {args.passkey_lengths}, depths {args.depths}")
    columns = ["setting", "KV bytes/token", "KV saved on the text", "perplexity", "vs none", "passkey"]
    print("| " + " | ".join([*columns, "peak sequences", "decode tok/s"]) + " |\n" + "|---" * 8 + "|", flush=True)
    rows: list[Row] = []
    baseline = None
    for setting in args.settings:
        row = measure(source, setting, args, text)
        rows.append(row)
        baseline = row.perplexity if setting == "none" else baseline
        change = f"{(row.perplexity / baseline - 1) * 100:+.1f}%" if baseline else "-"
        speed = f"{row.decode_tokens_per_s:.1f}" if row.decode_tokens_per_s is not None else "-"
        print(
            f"| {setting} | {row.kv_bytes_per_token} | {row.kv_saving:.1f}x | {row.perplexity:.3f} | {change} | "
            f"{row.passkey:.0%} | {row.peak_sequences} | {speed} |",
            flush=True,
        )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))


if __name__ == "__main__":
    main()
