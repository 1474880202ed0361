"""Grammar mask cost per token: compile time, the masks of model-sampled JSON outputs replayed in batches, and
decode steps with and without a schema.

.venv/bin/python benchmarks/structured_output.py [--samples 16] [--max-tokens 128] [--dtype bfloat16]

The model samples ``--samples`` outputs per schema at temperature 1; their token sequences are then replayed through
fresh matchers, batch by batch as the engine would see them, timing the batched mask computation (llguidance, in
its own threads; in the engine it runs beside the model forward) and the vectorised apply to a [batch, vocab]
logits tensor separately. Then batches of 1 and ``--samples`` greedy requests decode 64 tokens under
``records_format.json`` (a schema no such output can finish) and without it, in alternating pairs; each prints the
median decode step.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from engine import LLM, SamplingParams
from engine.llm_engine import LLMEngine
from engine.structured import GrammarCompiler, GrammarMasks, StructuredOutputs

RECORDS = json.loads((Path(__file__).parent / "records_format.json").read_text())["json_schema"]["schema"]

SCHEMAS = {
    "order (nested, arrays, enums, bounds, pattern)": {
        "type": "object",
        "properties": {
            "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
            "status": {"enum": ["open", "paid", "shipped"]},
            "total": {"type": "number", "minimum": 0, "maximum": 1000},
            "items": {
                "type": "array",
                "minItems": 1,
                "maxItems": 3,
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string", "maxLength": 8}, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["sku", "qty"],
                },
            },
            "customer": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]},
        },
        "required": ["id", "status", "total", "items", "customer"],
    },
    "json_object (any object)": None,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=128)
    args = parser.parse_args()

    llm = LLM(dtype=args.dtype)
    tokenizer, vocab_size = llm.tokenizer, llm.engine.source.spec.vocab_size
    prompt = tokenizer.encode_chat([{"role": "user", "content": "Write an example order record as JSON."}])
    print(f"vocabulary: {vocab_size} tokens, threads: {torch.get_num_threads()}")
    for name, schema in SCHEMAS.items():
        spec = StructuredOutputs.json_object() if schema is None else StructuredOutputs.json_schema(schema)
        compiler = GrammarCompiler(tokenizer, vocab_size)
        compiler.matcher(StructuredOutputs("regex", "x"))  # builds the tokenizer tables, once per engine
        started = time.perf_counter()
        compiler.compile(spec)
        compile_ms = (time.perf_counter() - started) * 1e3
        started = time.perf_counter()
        compiler.matcher(spec)
        copy_us = (time.perf_counter() - started) * 1e6
        params = SamplingParams(
            temperature=1.0, seed=0, max_tokens=args.max_tokens, n=args.samples, structured_outputs=spec
        )
        sequences = [o.token_ids for o in llm.generate([prompt], params)[0].outputs]
        mean_len = statistics.mean(len(s) for s in sequences)
        print(f"\n{name}: compile {compile_ms:.1f} ms, matcher copy {copy_us:.0f} us, outputs {mean_len:.0f} tokens")
        for batch in (1, args.samples):
            compute, apply, masks, steps = replay(compiler, spec, sequences[:batch], vocab_size)
            print(
                f"  batch {batch:3d}: mask computation {compute / masks * 1e6:6.1f} us/token "
                f"({compute / steps * 1e3:.2f} ms/step); apply {apply / masks * 1e6:6.1f} us/token "
                f"({apply / steps * 1e3:.2f} ms/step)"
            )
    print("\ndecode steps, 64 tokens per request, greedy:")
    for batch in (1, args.samples):
        for _ in range(3):
            free, constrained = (median_step(llm.engine, prompt, batch, spec) for spec in (None, RECORDS))
            print(
                f"  batch {batch:3d}: free {free * 1e3:5.1f} ms, schema {constrained * 1e3:5.1f} ms "
                f"({constrained / free:.2f}x)"
            )


def median_step(engine: LLMEngine, prompt: list[int], batch: int, schema: dict | None) -> float:
    """The median step time once every request is decoding."""
    spec = None if schema is None else StructuredOutputs.json_schema(schema)
    params = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True, structured_outputs=spec)
    for index in range(batch):
        engine.add_request(f"step-{time.monotonic()}-{index}", prompt, params)
    steps = []
    while engine.has_unfinished_requests():
        started = time.perf_counter()
        engine.step()
        steps.append(time.perf_counter() - started)
    return statistics.median(steps[2:])


def replay(
    compiler: GrammarCompiler, spec: StructuredOutputs, sequences: list[list[int]], vocab_size: int
) -> tuple[float, float, int, int]:
    """Seconds computing masks and applying them, the number of masks (row-steps) and of steps, over the replay.

    Rows leave the batch when their sequence ends, as finished requests leave the engine's.
    """
    matchers = [compiler.matcher(spec) for _ in sequences]
    masks = GrammarMasks()
    compute = apply = 0.0
    num_masks = 0
    steps = max(len(s) for s in sequences)
    for step in range(steps):
        live = [i for i, s in enumerate(sequences) if step < len(s)]
        logits = torch.randn(len(live), vocab_size)
        pending = masks.start([matchers[i] for i in live])  # what the engine does beside the forward ...
        assert pending is not None
        pending.done.result()
        started = time.perf_counter()
        masks.fill([matchers[i] for i in live], pending.bitmask)  # ... timed here without the thread hand-off
        computed = time.perf_counter()
        pending.apply(logits)
        compute += computed - started
        apply += time.perf_counter() - computed
        num_masks += len(live)
        for row, i in enumerate(live):
            assert torch.isfinite(logits[row, sequences[i][step]])  # the sampled token is still allowed
            matchers[i].advance(sequences[i][step])
    return compute, apply, num_masks, steps


if __name__ == "__main__":
    main()
