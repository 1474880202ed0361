"""Compile Spindle's Triton kernels for a CUDA architecture on a machine without a GPU.

Triton's compiler and ``ptxas`` ship in its wheel, so every specialisation the engine can launch (dtype, head dim,
page size, KV format) can be lowered to a cubin anywhere: this catches what the CPU interpreter cannot (type and
shape rules of the real compiler, tensor-core ``dot`` constraints) and reports each program's shared memory, to
check the launch choices against a GPU's limits (99 KiB per block on sm_86/sm_89, 163 KiB on A100, 227 KiB on H100).

    .venv/bin/python -m kernels.triton_ops.ahead_of_time [--arch 80] [--quick]
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from kernels.triton_ops import block_scores, kv_write, paged_decode, paged_prefill

TRITON_TYPES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
LAUNCH_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
HEAD_DIMS = (64, 96, 128)
QUANT_BITS = (0, 8, 4)
CODEC_BITS = (2, 4, 8)  # KIVI blocks: read by the attention kernels, written by PyTorch


@dataclass(frozen=True)
class Specialisation:
    kernel: str
    dtype: torch.dtype
    head_dim: int
    bits: int
    page: int = 16
    group: int = 4  # query heads per KV head
    codec: bool = False

    @property
    def label(self) -> str:
        cache = f"kivi{self.bits}" if self.codec else f"int{self.bits or '-'}"
        return f"{self.kernel} {TRITON_TYPES[self.dtype]} d{self.head_dim} page{self.page} {cache}"


def _argument_types(spec: Specialisation) -> dict[str, str | tuple[str, ...]]:
    """Pointer and tuple arguments' types (every other argument is an i32, or the fp32 ``sm_scale``)."""
    activation = TRITON_TYPES[spec.dtype]
    cache = "u8" if spec.bits else activation
    # Formats pass their data pointer for the arguments they do not use.
    side = ("fp16" if spec.codec else "fp32") if spec.bits else activation
    residual = activation if spec.codec else cache
    types: dict[str, str | tuple[str, ...]] = {name: activation for name in ("query", "key", "value", "output")}
    for prefix in ("key", "value"):
        types |= {f"{prefix}_data": cache, f"{prefix}_scale": side, f"{prefix}_zero": side}
        types[f"{prefix}_cache"] = (cache, side, side, residual)  # the attention kernels take them as one tuple
    names = ("block_tables", "context_lens", "query_starts", "query_lens", "residual_buffers")
    types |= {name: "i32" for name in names}
    types |= {"slots": "i64", "partial_out": "fp32", "partial_max": "fp32", "partial_sum": "fp32", "scores": "fp32"}
    types |= {"minimum": activation, "maximum": activation}  # page-selection key summaries
    pointers = {
        name: "*" + kind if isinstance(kind, str) else tuple("*" + one for one in kind) for name, kind in types.items()
    }
    strides = {"cache_strides": ("i32",) * 6, "key_scale_strides": ("i32",) * 4, "value_scale_strides": ("i32",) * 4}
    return pointers | strides


def _kernel_and_launch(spec: Specialisation) -> tuple[Any, dict[str, Any]]:
    if spec.kernel == "decode":
        launch = paged_decode.decode_launch(spec.group, spec.head_dim, spec.page, spec.bits, spec.codec, spec.dtype)
        return paged_decode._decode_split_kernel, launch
    if spec.kernel == "merge":
        return paged_decode._merge_splits_kernel, paged_decode.merge_launch(spec.head_dim, num_splits=8)
    if spec.kernel == "prefill":
        launch = paged_prefill.prefill_launch(spec.group, spec.head_dim, spec.page, spec.bits, spec.codec, spec.dtype)
        return paged_prefill._prefill_kernel, launch
    if spec.kernel == "scores":
        return block_scores._block_scores_kernel, block_scores.scores_launch(3, spec.group, spec.head_dim)
    return kv_write._write_kv_kernel, kv_write.write_kv_launch(spec.head_dim, spec.page, spec.bits)


def compile_specialisation(spec: Specialisation, arch: int) -> Any:
    """The compiled kernel (``.asm`` holds ttir ... cubin; ``.metadata.shared`` its shared memory in bytes)."""
    kernel, launch = _kernel_and_launch(spec)
    constants = {name: value for name, value in launch.items() if name not in LAUNCH_OPTIONS}
    options = {name: value for name, value in launch.items() if name in LAUNCH_OPTIONS}
    types = _argument_types(spec)
    signature: dict[str, str | tuple[str, ...]] = {}
    for name in kernel.arg_names:
        if name in constants:
            signature[name] = "constexpr"
        elif name in types:
            signature[name] = types[name]
        else:
            signature[name] = "fp32" if name == "sm_scale" else "i32"
    return triton.compile(ASTSource(kernel, signature, constants), target=GPUTarget("cuda", arch, 32), options=options)


def specialisations(quick: bool) -> Iterator[Specialisation]:
    """Every launchable combination, or (quick) a covering set: each kernel sees every dtype, head dim and format."""
    if quick:
        for kernel in ("decode", "prefill", "write"):
            for i in range(3):
                yield Specialisation(kernel, DTYPES[i], HEAD_DIMS[(i + 1) % 3], QUANT_BITS[i], page=(16, 32)[i % 2])
        yield Specialisation("decode", torch.float16, 128, 2, codec=True)
        yield Specialisation("prefill", torch.bfloat16, 64, 4, page=32, codec=True)
        yield Specialisation("merge", torch.float16, 128, 0)
        yield Specialisation("scores", torch.bfloat16, 64, 0)
        return
    for kernel in ("decode", "prefill", "write"):
        for dtype, head_dim, bits in itertools.product(DTYPES, HEAD_DIMS, QUANT_BITS):
            yield Specialisation(kernel, dtype, head_dim, bits)
    for kernel in ("decode", "prefill"):
        for dtype, head_dim, bits in itertools.product(DTYPES, HEAD_DIMS, CODEC_BITS):
            yield Specialisation(kernel, dtype, head_dim, bits, codec=True)
    for dtype, head_dim in itertools.product(DTYPES, HEAD_DIMS):
        yield Specialisation("merge", dtype, head_dim, 0)
        yield Specialisation("scores", dtype, head_dim, 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=80, help="compute capability x 10 (80 = A100, 90 = H100)")
    parser.add_argument("--quick", action="store_true", help="a covering subset instead of every specialisation")
    args = parser.parse_args()
    print(f"| kernel | sm_{args.arch} shared memory per program (KiB) |")
    print("|---|---:|")
    for spec in specialisations(args.quick):
        compiled = compile_specialisation(spec, args.arch)
        print(f"| {spec.label} | {compiled.metadata.shared / 1024:.1f} |", flush=True)


if __name__ == "__main__":
    main()
