"""Milliseconds per call of the CPU paged-attention decode path against a naive per-sequence implementation.

.venv/bin/python benchmarks/cpu_attention.py [--threads 2] [--repeats 15] [--batches 1 8 32] [--contexts 256 1024 4096]
    [--verify-rows 5]

One layer of the default model's shape (9 query heads, 3 KV heads, head_dim 64), every sequence decoding one token
with ``context`` tokens in the paged cache (block size 16, blocks scattered). "native" and "torch" are
``CpuAttentionBackend.forward`` (K/V write + batched decode attention) with the native decode kernel (the default)
and with the vectorised PyTorch path; ``prepare`` runs once per step and is shown apart. "naive" gathers each
sequence's blocks with ``torch.cat``, repeats K/V heads and runs softmax attention sequence by sequence. All are
called in turn and the median of the repetitions is reported.

With ``--verify-rows N`` it instead times the native kernel on sequences that each verify N - 1 speculative drafts
(N query rows at consecutive positions): all N rows of a sequence in one pass over its K/V ("grouped", as the
engine calls it) against each row as a sequence of its own ("per row", reading the K/V N times).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Iterator
from functools import partial

import torch

from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend, write_kv
from kernels.native import load_native_kernels

NUM_HEADS, NUM_KV_HEADS, HEAD_DIM, BLOCK_SIZE = 9, 3, 64, 16


def naive_decode(query, key, value, key_cache, value_cache, layout: BatchLayout, scale: float) -> torch.Tensor:
    """query [B, H, D] of B decoding sequences -> [B, H, D], one sequence at a time."""
    write_kv(key, value, key_cache, value_cache, layout.slot_mapping)
    group = NUM_HEADS // NUM_KV_HEADS
    outputs = []
    for row, (length, table) in enumerate(zip(layout.context_lens, layout.block_tables)):
        keys = torch.cat([key_cache[block] for block in table]).narrow(0, 0, length)  # [L, KVH, D]
        values = torch.cat([value_cache[block] for block in table]).narrow(0, 0, length)
        keys = keys.repeat_interleave(group, dim=1).transpose(0, 1)  # [H, L, D]
        values = values.repeat_interleave(group, dim=1).transpose(0, 1)
        scores = torch.matmul(query[row].unsqueeze(1), keys.transpose(1, 2)).float() * scale  # [H, 1, L]
        probs = torch.softmax(scores, dim=-1).to(query.dtype)
        outputs.append(torch.matmul(probs, values).squeeze(1))  # [H, D]
    return torch.stack(outputs)


def make_step(batch: int, context: int, dtype: torch.dtype, generator: torch.Generator):
    blocks_per_seq = -(-context // BLOCK_SIZE)
    num_blocks = batch * blocks_per_seq + 1
    order = torch.randperm(num_blocks, generator=generator).tolist()
    tables = [order[i * blocks_per_seq : (i + 1) * blocks_per_seq] for i in range(batch)]
    slots = [table[(context - 1) // BLOCK_SIZE] * BLOCK_SIZE + (context - 1) % BLOCK_SIZE for table in tables]
    layout = BatchLayout([1] * batch, [context] * batch, tables, torch.tensor(slots), BLOCK_SIZE)
    shape = (num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM)
    key_cache = torch.randn(shape, generator=generator).to(dtype)
    value_cache = torch.randn(shape, generator=generator).to(dtype)
    query = torch.randn(batch, NUM_HEADS, HEAD_DIM, generator=generator).to(dtype)
    key = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    value = torch.randn(batch, NUM_KV_HEADS, HEAD_DIM, generator=generator).to(dtype)
    return layout, query, key, value, key_cache, value_cache


def seconds(fn, calls: int) -> float:
    started = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - started) / calls


def cases(args: argparse.Namespace) -> Iterator[tuple[str, torch.dtype, int, int]]:
    """(dtype name, dtype, batch, context) for every combination asked for."""
    for dtype_name in args.dtypes:
        for batch in args.batches:
            for context in args.contexts:
                yield dtype_name, getattr(torch, dtype_name), batch, context


def interleaved_ms(candidates: dict[str, Callable[[], object]], repeats: int, calls: int) -> dict[str, float]:
    """Median milliseconds per call of each candidate, the candidates called in turn ``repeats`` times."""
    runs: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            runs[name].append(seconds(fn, calls))
    return {name: statistics.median(times) * 1000 for name, times in runs.items()}


def verification_rows(args: argparse.Namespace, generator: torch.Generator) -> None:
    native = load_native_kernels()
    rows, scale = args.verify_rows, HEAD_DIM**-0.5
    print(f"native kernel, {rows} query rows per sequence, median of {args.repeats} interleaved repetitions")
    print("| dtype | sequences | context | per row ms | grouped ms | per row/grouped |")
    print("|---|---:|---:|---:|---:|---:|")
    for dtype_name, dtype, batch, context in cases(args):
        layout, _, _, _, key_cache, value_cache = make_step(batch, context, dtype, generator)
        query = torch.randn(batch * rows, NUM_HEADS, HEAD_DIM, generator=generator).to(dtype)
        tables = torch.tensor(layout.block_tables, dtype=torch.int32)
        ends = torch.tensor(layout.context_lens, dtype=torch.int32)
        row_tables = tables.repeat_interleave(rows, dim=0)
        row_ends = (ends[:, None] - torch.arange(rows - 1, -1, -1, dtype=torch.int32)).flatten()
        counts = torch.full((batch,), rows, dtype=torch.int32)
        grouped = partial(native.decode_attention, query, key_cache, value_cache, tables, ends, scale, counts)
        per_row = partial(native.decode_attention, query, key_cache, value_cache, row_tables, row_ends, scale)
        torch.testing.assert_close(grouped().float(), per_row().float(), atol=1e-2, rtol=1e-2)
        calls = min(50, max(1, int(200 * 256 / (batch * rows * context))))
        ms = interleaved_ms({"per row": per_row, "grouped": grouped}, args.repeats, calls)
        print(
            f"| {dtype_name} | {batch} | {context} | {ms['per row']:.3f} | {ms['grouped']:.3f} | "
            f"{ms['per row'] / ms['grouped']:.2f}x |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    parser.add_argument("--verify-rows", type=int, default=0, help="time N-row verification instead (see above)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    if args.verify_rows:
        verification_rows(args, generator)
        return
    backends = {"native": CpuAttentionBackend(load_native_kernels()), "torch": CpuAttentionBackend()}
    scale = HEAD_DIM**-0.5

    print(f"threads: {torch.get_num_threads()}  heads: {NUM_HEADS}/{NUM_KV_HEADS} kv  head_dim: {HEAD_DIM}")
    print(f"block size: {BLOCK_SIZE}  median of {args.repeats} interleaved repetitions, ms per call")
    print("| dtype | batch | context | native ms | torch ms | naive ms | torch/native | naive/native | prepare ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for dtype_name, dtype, batch, context in cases(args):
        layout, query, key, value, key_cache, value_cache = make_step(batch, context, dtype, generator)
        metadata = {name: backend.prepare(layout, dtype) for name, backend in backends.items()}
        expected = naive_decode(query, key, value, key_cache, value_cache, layout, scale)
        tolerance = 1e-4 if dtype == torch.float32 else 3e-2
        for name, backend in backends.items():
            got = backend.forward(query, key, value, key_cache, value_cache, metadata[name], scale)
            torch.testing.assert_close(got.float(), expected.float(), atol=tolerance, rtol=tolerance)

        calls = min(50, max(1, int(200 * 256 / (batch * context))))  # about the same work per sample
        candidates: dict[str, Callable[[], object]] = {
            name: partial(backend.forward, query, key, value, key_cache, value_cache, metadata[name], scale)
            for name, backend in backends.items()
        }
        candidates["naive"] = partial(naive_decode, query, key, value, key_cache, value_cache, layout, scale)
        candidates["prepare"] = partial(backends["native"].prepare, layout, dtype)
        ms = interleaved_ms(candidates, args.repeats, calls)
        print(
            f"| {dtype_name} | {batch} | {context} | {ms['native']:.3f} | {ms['torch']:.3f} | "
            f"{ms['naive']:.3f} | {ms['torch'] / ms['native']:.2f}x | {ms['naive'] / ms['native']:.2f}x | "
            f"{ms['prepare']:.3f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
