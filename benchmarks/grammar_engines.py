"""Compare grammar engines for JSON Schema decoding on this model's tokenizer: compile time, mask time per token,
and which schema features each one enforces, ignores or refuses.

    .venv/bin/pip install xgrammar==0.2.8 outlines-core==0.2.14   # beside llguidance, which Spindle uses
    .venv/bin/python benchmarks/grammar_engines.py [llguidance xgrammar outlines-core]

Each engine walks the tokens of valid documents, computing the full-vocabulary mask before every token (the token
must be allowed, and the end of sequence after the last). A feature is "enforced" when a valid document passes and
an invalid one is refused, "ignored" when the invalid one passes too, "refused" when the schema does not compile.
All engines produce compact JSON (no whitespace), so that the same token sequences apply to each.
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gguf
import numpy as np
import torch

from engine.loader.default_model import default_model_path
from engine.tokenizer import Tokenizer

TIMED = {  # schema, a valid document
    "order": (
        {
            "type": "object",
            "properties": {
                "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
                "status": {"enum": ["open", "paid", "shipped"]},
                "total": {"type": "number", "minimum": 0},
                "items": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "properties": {"sku": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                        "required": ["sku", "qty"],
                    },
                },
                "shipping": {
                    "type": "object",
                    "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
                    "required": ["city", "zip"],
                },
            },
            "required": ["id", "status", "total", "items", "shipping"],
        },
        {
            "id": "AB-123",
            "status": "paid",
            "total": 129.49,
            "items": [{"sku": "widget-7", "qty": 3}, {"sku": "gadget", "qty": 1}],
            "shipping": {"city": "Springfield", "zip": "12345"},
        },
    ),
    "any object": (
        {"type": "object"},
        {
            "answer": "The capital of France is Paris.",
            "confidence": 0.93,
            "sources": ["wiki", {"page": 12}],
            "ok": True,
        },
    ),
}
FEATURES = {  # schema, a valid and an invalid document
    "minimum/maximum": ({"type": "integer", "minimum": 1, "maximum": 9}, 5, 12),
    "exclusiveMinimum": ({"type": "number", "exclusiveMinimum": 0.5}, 0.75, 0.5),
    "multipleOf": ({"type": "integer", "multipleOf": 5}, 15, 7),
    "pattern": ({"type": "string", "pattern": "^[A-Z]{3}-[0-9]+$"}, "ABC-12", "abc-12"),
    "minLength/maxLength": ({"type": "string", "minLength": 2, "maxLength": 5}, "abc", "abcdefg"),
    "format: date-time": ({"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", "yesterday"),
    "format: email": ({"type": "string", "format": "email"}, "ann@example.com", "not an email"),
    "enum/const": (
        {"type": "object", "properties": {"a": {"enum": [1, "x"]}, "b": {"const": "k"}}, "required": ["a", "b"]},
        {"a": "x", "b": "k"},
        {"a": 2, "b": "k"},
    ),
    "required, no additional": (
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"], "additionalProperties": False},
        {"a": 1},
        {"a": 1, "b": 2},
    ),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "string"}]}, "s", True),
    "oneOf": ({"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    "allOf": (
        {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}}, {"required": ["a"]}]},
        {"a": 1},
        {},
    ),
    "$ref": (
        {
            "$defs": {"p": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
            "type": "array",
            "items": {"$ref": "#/$defs/p"},
        },
        [{"x": 1}],
        [{"y": 1}],
    ),
    "recursive $ref": (
        {
            "$defs": {
                "n": {
                    "type": "object",
                    "properties": {"v": {"type": "integer"}, "kids": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
                    "required": ["v"],
                }
            },
            "$ref": "#/$defs/n",
        },
        {"v": 1, "kids": [{"v": 2, "kids": [{"v": 3}]}]},
        {"v": 1, "kids": [{"kids": []}]},
    ),
    "additionalProperties schema": (
        {"type": "object", "additionalProperties": {"type": "integer"}},
        {"a": 1},
        {"a": "s"},
    ),
    "minItems/maxItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3}, [1, 2], [1]),
    "prefixItems": (
        {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
        ["a", 1],
        ["a", 1, 2],
    ),
    "uniqueItems": ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 2], [1, 1]),
    "patternProperties": (
        {"type": "object", "patternProperties": {"^x_": {"type": "integer"}}},
        {"x_a": 1},
        {"x_a": "s"},
    ),
    "minProperties": ({"type": "object", "minProperties": 1}, {"a": 1}, {}),
    "if/then": (
        {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
        {"a": 1, "b": 2},
        {"a": 1},
    ),
    "not": ({"not": {"type": "string"}}, 1, "s"),
}


@dataclass
class Engine:
    compile: Callable[[dict[str, Any]], Any]  # schema -> compiled grammar (raises for what it refuses)
    matcher: Callable[[Any], Any]  # compiled grammar -> a fresh matcher
    fill: Callable[[Any, torch.Tensor], None]  # write the matcher's mask into an int32 [1, words] bitmask
    advance: Callable[[Any, int], None]


def llguidance_engine(tokenizer: Tokenizer, eos: int) -> Engine:
    import llguidance

    ll_tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=tokenizer.vocab_size, eos_token=eos)
    options = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}

    def compile_(schema: dict[str, Any]) -> Any:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        matcher = llguidance.LLMatcher(ll_tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    return Engine(
        compile_,
        lambda compiled: compiled.deep_copy(),
        lambda matcher, bitmask: matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4),
        lambda matcher, token: matcher.consume_token(token),
    )


def xgrammar_engine(tokenizer: Tokenizer, eos: int) -> Engine:
    import xgrammar

    vocab = tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))
    info = xgrammar.TokenizerInfo(
        vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=tokenizer.vocab_size, stop_token_ids=[eos]
    )
    compiler = xgrammar.GrammarCompiler(info, cache_enabled=False)

    def compile_(schema: dict[str, Any]) -> Any:
        if schema == {"type": "object"}:  # its schema path refuses a second property here; its JSON grammar works
            return compiler.compile_builtin_json_grammar()
        # strict_mode=False: JSON Schema's default of allowing additional properties.
        return compiler.compile_json_schema(
            json.dumps(schema), any_whitespace=False, separators=(",", ":"), strict_mode=False
        )

    return Engine(
        compile_,
        xgrammar.GrammarMatcher,
        lambda matcher, bitmask: matcher.fill_next_token_bitmask(bitmask),
        lambda matcher, token: matcher.accept_token(token),
    )


def outlines_engine(tokenizer: Tokenizer, eos: int) -> Engine:
    import outlines_core

    byte_of = _byte_level_decoder()
    special = {t for t in range(tokenizer.vocab_size) if tokenizer.decode([t]) == ""}
    tokens: dict[bytes, list[int]] = {}
    for token_id, token in enumerate(tokenizer.convert_ids_to_tokens(range(tokenizer.vocab_size))):
        if token_id not in special:
            tokens.setdefault(bytes(byte_of[c] for c in token), []).append(token_id)
    vocabulary = outlines_core.Vocabulary(eos, tokens)

    def compile_(schema: dict[str, Any]) -> Any:
        regex = outlines_core.json_schema.build_regex_from_schema(json.dumps(schema), whitespace_pattern="")
        return outlines_core.Index(regex, vocabulary)

    return Engine(
        compile_,
        outlines_core.Guide,
        lambda guide, bitmask: guide.write_mask_into(bitmask.data_ptr(), bitmask.numel(), 4),
        lambda guide, token: guide.advance(token, return_tokens=False),
    )


def _byte_level_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


ENGINES = {"llguidance": llguidance_engine, "xgrammar": xgrammar_engine, "outlines-core": outlines_engine}


def walk(engine: Engine, compiled: Any, tokens: list[int], eos: int, vocab_size: int) -> tuple[bool, list[float]]:
    """Whether every token (then the end of sequence) is allowed, and the seconds each mask took."""
    matcher = engine.matcher(compiled)
    bitmask = torch.zeros((1, (vocab_size + 31) // 32), dtype=torch.int32)
    times = []
    for token in [*tokens, eos]:
        started = time.perf_counter()
        engine.fill(matcher, bitmask)
        times.append(time.perf_counter() - started)
        word = int(bitmask[0, token // 32].item()) & 0xFFFFFFFF
        if not (word >> (token % 32)) & 1:
            return False, times
        if token != eos:
            engine.advance(matcher, token)
    return True, times


def main() -> None:
    tokenizer = Tokenizer.from_gguf(gguf.GGUFReader(default_model_path()))
    eos, vocab_size = min(tokenizer.eos_token_ids), tokenizer.vocab_size
    encode = lambda document: tokenizer.encode(json.dumps(document, separators=(",", ":")), add_special_tokens=False)  # noqa: E731
    for name in sys.argv[1:] or list(ENGINES):
        started = time.perf_counter()
        engine = ENGINES[name](tokenizer, eos)
        print(f"== {name} (import and tokenizer set-up {time.perf_counter() - started:.2f} s)")
        for label, (schema, document) in TIMED.items():
            started = time.perf_counter()
            compiled = engine.compile(schema)
            compile_ms = (time.perf_counter() - started) * 1e3
            times: list[float] = []
            for _ in range(3):
                ok, walk_times = walk(engine, compiled, encode(document), eos, vocab_size)
                assert ok, f"{name} refused a valid {label} document"
                times += walk_times
            micro = np.array(times) * 1e6
            print(
                f"  {label:10s} compile {compile_ms:7.1f} ms; mask per token: mean {micro.mean():6.1f} us, "
                f"median {statistics.median(micro):6.1f} us, p99 {np.percentile(micro, 99):7.1f} us"
            )
        verdicts: dict[str, list[str]] = {}
        for label, (schema, valid, invalid) in FEATURES.items():
            try:
                compiled = engine.compile(schema)
            except Exception:  # each engine raises its own kinds
                verdicts.setdefault("refused", []).append(label)
                continue
            accepts_valid = walk(engine, compiled, encode(valid), eos, vocab_size)[0]
            accepts_invalid = walk(engine, compiled, encode(invalid), eos, vocab_size)[0]
            verdict = (
                "wrong (refuses a valid document)"
                if not accepts_valid
                else "ignored"
                if accepts_invalid
                else "enforced"
            )
            verdicts.setdefault(verdict, []).append(label)
        for verdict, labels in sorted(verdicts.items()):
            print(f"  {verdict} ({len(labels)}/{len(FEATURES)}): {', '.join(labels)}")


if __name__ == "__main__":
    main()
