"""A decode step's projections (every layer of the default model's shapes, each with its own weights, so they are read
from memory as in a real step) through each fp32-activation kernel, alternating in one process: the dense fp32
weights (PyTorch), the exact 4-bit kernel (kernels/csrc/cpu_linear_f32.cpp) and the 4-bit kernel with int8-quantized
activations (kernels/csrc/cpu_linear_q8.cpp). Prints the median time per step and each kernel's ratio to the dense
weights. Run under a CPU profile to see that tier's kernels:

    SPINDLE_CPU_PROFILE=avx2 .venv/bin/python benchmarks/quantized_linear.py [--rows 1 8 16 32] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from engine.models.int4_weights import GroupLevels
from kernels.cpu_profile import cpu_profile
from kernels.native import INT8_ACTIVATIONS, load_native_kernels

LAYERS = 30
# (out, in) of the default model's fused projections: qkv, o, gate_up, down
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 8, 16, 32])
    parser.add_argument("--repeats", type=int, default=30)
    args = parser.parse_args()
    kernels = load_native_kernels()
    generator = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(LAYERS):
        for out_features, in_features in SHAPES:
            levels = GroupLevels.of(torch.randn(out_features, in_features, generator=generator) * 0.05)
            scales, lows = levels.scale.half(), levels.low.half()
            as_bytes = levels.levels.to(torch.uint8)
            dense = (
                levels.levels.float().reshape(out_features, -1, 32) * scales.float()[..., None]
                + lows.float()[..., None]
            ).reshape(out_features, in_features)
            exact = kernels.pack_int4(as_bytes, scales, lows, torch.float32)
            quantized = kernels.pack_int4(as_bytes, scales, lows, INT8_ACTIVATIONS)
            layers.append((out_features, in_features, dense, exact, quantized))

    def step(rows: int, kind: str) -> Callable[[], None]:
        inputs = {in_features: torch.randn(rows, in_features) for _, in_features in SHAPES}

        def run() -> None:
            for out_features, in_features, dense, exact, quantized in layers:
                x = inputs[in_features]
                if kind == "dense fp32":
                    torch.nn.functional.linear(x, dense)
                elif kind == "4-bit exact":
                    kernels.linear_int4(x, exact, out_features)
                else:
                    kernels.linear_int4(x, quantized, out_features, activations=INT8_ACTIVATIONS)

        return run

    kinds = ["dense fp32", "4-bit exact", "4-bit int8 activations"]
    print(f"CPU: {cpu_profile().describe()}, threads: {torch.get_num_threads()}, {LAYERS} layers")
    ratios = "exact / dense | int8 / dense | int8 / exact"
    print("| rows | " + " | ".join(f"{kind} (ms)" for kind in kinds) + f" | {ratios} |")
    print("| --- " * (len(kinds) + 4) + "|")
    for rows in args.rows:
        runs = {kind: step(rows, kind) for kind in kinds}
        times: dict[str, list[float]] = {kind: [] for kind in kinds}
        for run in runs.values():
            run()  # warm-up
        for _ in range(args.repeats):
            for kind, run in runs.items():
                started = time.perf_counter()
                run()
                times[kind].append(time.perf_counter() - started)
        median = {kind: statistics.median(values) * 1000 for kind, values in times.items()}
        dense, exact, quantized = (median[kind] for kind in kinds)
        print(
            f"| {rows} | {dense:.2f} | {exact:.2f} | {quantized:.2f} | {exact / dense:.2f} | {quantized / dense:.2f} "
            f"| {quantized / exact:.2f} |"
        )


if __name__ == "__main__":
    main()
