"""KV-cache policies and quantized KV measured: memory, quality and speed of each setting on the default model.

    .venv/bin/python benchmarks/kv_policies.py [--settings none int8 kivi-int2 think:0.5+int4 snapkv:256 ...]
        [--chunk 64] [--skip-quality] [--skip-throughput] [--json results/kv_policies.json]

A setting is ``+``-joined parts: a KV-cache dtype (``int8``, ``int4``), a block codec (``kivi-int4``, ``kivi-int2``,
``gear-int4``, ``gear-int2``: GEAR with rank 2 and 2 % outliers), ThinK key-channel pruning (``think:FRACTION``
kept), an eviction policy and its budget in rows (``snapkv:256``). For each setting it prints one table row:
- KV bytes per token (all layers, K and V; a full block's worth under block codecs), and the KV memory one sequence
  holding the perplexity text saves against bf16 with no policy: bytes per token times the rows it keeps (the
  budget, or every token).
- Perplexity (fp32) of a long real English text (Debian's GPL-3, ~7.6k tokens) read through the engine in chunks
  of --chunk tokens with prompt logprobs, so that eviction happens as the text streams in; and its change against
  no policy.
- Passkey retrieval (fp32): a 5-digit key hidden at several depths of filler text of several lengths; the share of
  greedy answers that contain the key.
- Peak concurrent sequences (bf16) in a fixed KV memory (--concurrency-memory) with 1024-token prompts and 64 output
  tokens each: how many the scheduler actually ran at once.
- Decode throughput (bf16) at concurrency 32: output tokens/s of 32 requests decoding together (--decode-prompt
  tokens of prompt each, timed from the step after every prompt is in until --decode-tokens tokens each), and its
  ratio to no policy measured in the same run.

--skip-quality leaves out perplexity, passkey and peak sequences (printed as "-"), for a throughput-only run;
--keys-per-cell 0 leaves out passkey, --concurrency-requests 0 peak sequences.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from engine.config import build_config
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.sampling_params import SamplingParams

TEXT = Path("/usr/share/common-licenses/GPL-3")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "\nWhat is the pass key? The pass key is"


DEFAULT_SETTINGS = [
    *("none", "int8", "int4", "sink_window:256", "sink_window:1024", "key_norm:256", "key_norm:1024"),
    *("snapkv:256", "snapkv:1024", "evict_merge:256", "evict_merge:1024", "int8+snapkv:256"),
    *("kivi-int4", "kivi-int2", "gear-int4", "gear-int2", "think:0.5", "think:0.5+int4"),
]
CODECS = {"kivi-int4": ("kivi", 4), "kivi-int2": ("kivi", 2), "gear-int4": ("gear", 4), "gear-int2": ("gear", 2)}


@dataclass
class Row:
    setting: str
    kv_bytes_per_token: float
    kv_saving: float
    perplexity: float | None
    passkey: float | None
    peak_sequences: int | None
    decode_tokens_per_s: float | None


def parse_setting(setting: str) -> dict[str, str | int | float]:
    """``int8+snapkv:256`` / ``think:0.5+int4`` / ``kivi-int2`` -> the config fields it sets."""
    fields: dict[str, str | int | float] = {"kv_cache_dtype": "auto", "kv_policy": "none"}
    for part in setting.split("+"):
        name, _, parameter = part.partition(":")
        if name in ("int8", "int4"):
            fields["kv_cache_dtype"] = name
        elif name in CODECS:
            fields["kv_codec"], fields["kv_codec_bits"] = CODECS[name]
        elif name == "think":
            fields["kv_key_channel_keep"] = float(parameter)
        else:
            fields["kv_policy"] = name
            if parameter:
                fields["kv_budget"] = int(parameter)
    return fields


def make_engine(source: ModelSource, setting: str, **overrides) -> LLMEngine:
    return LLMEngine(build_config(None, {**parse_setting(setting), **overrides}), source=source, progress=False)


def kv_bytes_per_token(source: ModelSource, setting: str) -> float:
    """In bf16, the serving dtype."""
    cache = build_config(None, parse_setting(setting)).cache
    codecs = cache.codec_settings()
    layout = KVCacheLayout.for_model(source.spec, cache.block_size, torch.bfloat16, cache.kv_cache_dtype, codecs)
    return layout.bytes_per_token


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


def decode_throughput(engine: LLMEngine, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens/s of the steps after every request has its first token, up to the end."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"d{i}", prompt, params)
    started: set[str] = set()
    while len(started) < len(prompts):
        started.update(output.request_id for output in engine.step() if output.new_token_ids)
    tokens, begin = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        tokens += sum(len(output.new_token_ids) for output in engine.step())
    return tokens / (time.perf_counter() - begin)


def text_slices(ids: list[int], count: int, length: int) -> list[list[int]]:
    stride = max((len(ids) - length) // count, 1)
    return [ids[(i * stride) % (len(ids) - length) :][:length] for i in range(count)]


def measure(source: ModelSource, setting: str, args: argparse.Namespace, text: list[int]) -> Row:
    ppl = keys = peak = speed = None
    if not args.skip_quality:
        quality = {"dtype": "float32", "max_num_batched_tokens": args.chunk, "kv_cache_memory": "512MiB"}
        ppl = perplexity(make_engine(source, setting, **quality, max_num_seqs=1), text)
        cases = passkey_prompts(source, args.passkey_lengths, args.depths, args.keys_per_cell)
        if cases:
            keys = passkey_accuracy(make_engine(source, setting, **{**quality, "max_num_seqs": len(cases)}), cases)
        if args.concurrency_requests:
            # Each request's prefill grows its cache by at most 256 rows per step before compaction. At most as many
            # sequences as requests: block codecs reserve a full-precision residual per sequence.
            serving = {
                "max_num_seqs": args.concurrency_requests,
                "long_prefill_token_threshold": 256,
                "max_num_batched_tokens": 512,
            }
            engine = make_engine(source, setting, kv_cache_memory=args.concurrency_memory, **serving)
            peak = peak_sequences(engine, text_slices(text, args.concurrency_requests, 1024))
    bytes_per_token, bf16_bytes = kv_bytes_per_token(source, setting), kv_bytes_per_token(source, "none")
    policy = build_config(None, parse_setting(setting)).cache.eviction_policy()
    rows = policy.budget if policy is not None else len(text)
    if not args.skip_throughput:
        engine = make_engine(source, setting, max_num_seqs=32, kv_cache_memory="1GiB")
        speed = decode_throughput(engine, text_slices(text, 32, args.decode_prompt), args.decode_tokens)
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
    parser.add_argument("--skip-quality", action="store_true", help="only bytes per token and decode throughput")
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--decode-prompt", type=int, default=512, help="prompt tokens of each decoding request")
    parser.add_argument("--decode-tokens", type=int, default=128, help="output tokens of each decoding request")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    args = parser.parse_args()
    source = open_model()
    text = source.tokenizer.encode(TEXT.read_text())
    print(f"text: {len(text)} tokens; passkey contexts {args.passkey_lengths}, depths {args.depths}")
    columns = ["setting", "KV bytes/token", "KV saved on the text", "perplexity", "vs none", "passkey"]
    columns += ["peak sequences", "decode tok/s at 32", "vs none"]
    print("| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|", flush=True)
    rows: list[Row] = []
    baseline: Row | None = None
    for setting in args.settings:
        row = measure(source, setting, args, text)
        rows.append(row)
        baseline = row if setting == "none" else baseline
        ppl, keys, peak, speed = row.perplexity, row.passkey, row.peak_sequences, row.decode_tokens_per_s
        ppl_change = ppl / baseline.perplexity - 1 if ppl and baseline and baseline.perplexity else None
        base_speed = baseline.decode_tokens_per_s if baseline else None
        cells = [
            setting,
            f"{row.kv_bytes_per_token:,.0f}",
            f"{row.kv_saving:.1f}x",
            "-" if ppl is None else f"{ppl:.3f}",
            "-" if ppl_change is None else f"{ppl_change * 100:+.1f}%",
            "-" if keys is None else f"{keys:.0%}",
            "-" if peak is None else str(peak),
            "-" if speed is None else f"{speed:.1f}",
            "-" if speed is None or not base_speed else f"{speed / base_speed:.2f}x",
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([asdict(row) for row in rows], indent=2))


if __name__ == "__main__":
    main()
