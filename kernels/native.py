"""Build and load the native CPU kernels (kernels/csrc) with the system C++ compiler, called through ctypes.

The sources (decode attention, prompt attention, a layer's elementwise ops, the bf16, 8- and 4-bit linear layers,
and a decode step's decoder layers chained in one call) are
compiled into one shared library once per source text, compiler, CPU and CPU profile (``-march=native``, or the
profile's target: kernels/cpu_profile.py) into a cache directory (``$SPINDLE_KERNEL_CACHE``, default
``~/.cache/spindle/kernels``) and reused by every later process. No PyTorch headers are involved, so a build takes a
few seconds. Each kernel has a path for every target (wide-vector code where the target has it, portable C++
otherwise), and the library reports which it was built with. Where no compiler is found or the build fails,
``load_native_kernels`` raises NativeKernelsUnavailable with the reason (logged once), and the vectorised PyTorch
paths serve instead.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import torch

from kernels.cpu_profile import cpu_profile

logger = logging.getLogger("spindle.kernels")

SOURCE_DIR = Path(__file__).parent / "csrc"
# built into one library, with the headers beside them
SOURCES = (
    "cpu_paged_attention.cpp",
    "cpu_prompt_attention.cpp",
    "cpu_layer_ops.cpp",
    "cpu_linear.cpp",
    "cpu_linear_f32.cpp",
    "cpu_linear_q8.cpp",
    "cpu_decode_layers.cpp",
)
LIBRARY_NAME = "spindle_cpu_kernels"
# -Wno-psabi: the kernels pass 64-byte vectors between their own inline functions, whose ABI note is irrelevant here.
FLAGS = ("-O3", "-fopenmp", "-std=c++17", "-shared", "-fPIC", "-Wno-psabi")
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)  # instantiated in the kernel source
# The 4-bit kernel that takes fp32 activations and quantizes them to int8 per group of 32 channels inside
# (cpu_linear_q8.cpp: lossy, faster) is named by this activation "type"; it reads and writes fp32.
INT8_ACTIVATIONS = torch.int8
DTYPE_SUFFIXES = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", INT8_ACTIVATIONS: "q8"}
_POINTER, _INT, _INT64, _FLOAT = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
_LINEAR = [_POINTER] * 3 + [_INT64] * 3 + [_INT]  # x, packed weight, out, rows, out and in features, threads


def _for(dtypes: tuple[torch.dtype, ...], argtypes: list[Any]) -> dict[torch.dtype, list[Any]]:
    return dict.fromkeys(dtypes, argtypes)


_ALL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_BF16, _F32, _Q8 = (torch.bfloat16,), (torch.float32,), (INT8_ACTIVATIONS,)
_SIGNATURES = {  # entry point prefix -> (restype, {dtype it has an entry for: argtypes})
    "spindle_decode_attention": (ctypes.c_bool, _for(_ALL_DTYPES, [_POINTER] * 7 + [_INT] * 6 + [_FLOAT, _INT])),
    "spindle_prompt_attention": (
        ctypes.c_bool,
        _for(_BF16, [_POINTER] * 5 + [_INT] * 4 + [_INT64] * 4 + [_FLOAT, _INT]),
    ),
    "spindle_rms_norm": (None, _for(_ALL_DTYPES, [_POINTER] * 4 + [_INT64, _INT, _FLOAT])),
    "spindle_silu_and_mul": (None, _for(_ALL_DTYPES, [_POINTER, _POINTER, _INT64, _INT])),
    "spindle_rotary": (None, _for(_ALL_DTYPES, [_POINTER, _INT64] + [_POINTER] * 4 + [_INT64, _INT, _INT, _INT])),
    "spindle_amx_pack": (None, _for(_BF16, [_POINTER, _POINTER, _INT64, _INT64])),
    "spindle_amx_linear": (ctypes.c_bool, _for(_BF16, _LINEAR)),
    # 4- and 8-bit weights: a layout per activation dtype (bf16: cpu_linear.cpp, fp32: cpu_linear_f32.cpp, int8:
    # cpu_linear_q8.cpp)
    "spindle_pack_int4": (None, _for(_BF16 + _F32 + _Q8, [_POINTER] * 4 + [_INT64] * 2)),
    "spindle_pack_int8": (None, _for(_BF16 + _F32, [_POINTER] * 3 + [_INT64] * 2)),
    "spindle_linear_int8": (ctypes.c_bool, _for(_BF16 + _F32, _LINEAR)),
    "spindle_linear_int4": (ctypes.c_bool, {torch.bfloat16: [*_LINEAR, ctypes.c_bool]} | _for(_F32 + _Q8, _LINEAR)),
    "spindle_decode_layers": (ctypes.c_bool, _for(_BF16 + _F32 + _Q8, [_POINTER] * 9 + [_INT64, _INT])),
}
AMX_BLOCK = 32  # the AMX and 4-bit linear kernels' weights: both dimensions a multiple of this (4-bit groups too)
INT4_BYTES_PER_GROUP = 20  # the 4-bit layout: 32 levels of 4 bits, an fp16 scale and an fp16 minimum
INT8_BYTES_PER_GROUP = 34  # the 8-bit layout: 32 values of 8 bits and an fp16 scale


DECODER_LAYER_FIELDS = 8  # a layer's row of the decoder's layer table: see kernels/csrc/cpu_decode_layers.cpp


class NativeKernelsUnavailable(RuntimeError):
    pass


class DecoderShape(ctypes.Structure):
    """The model's shape as ``spindle_decode_layers`` reads it."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate")),
        ("block_size", ctypes.c_int64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class _DecodeBatchArgs(ctypes.Structure):
    _fields_ = [
        ("block_tables", _POINTER),
        ("context_lens", _POINTER),
        ("row_counts", _POINTER),
        ("sequences", ctypes.c_int64),
        ("max_blocks", ctypes.c_int64),
    ]


@dataclass(frozen=True)
class DecodeBatch:
    """The sequences a decode step's attention reads: checked once here, not again on every layer's call.

    Sequence ``s`` owns the next ``row_counts[s]`` query rows (one, or one plus its drafts), the last at context
    length ``context_lens[s]`` and each earlier one a position before the next."""

    block_tables: torch.Tensor  # int32 [sequences, max blocks], padded with block 0 (never read past context_lens)
    context_lens: torch.Tensor  # int32 [sequences]: the context of each sequence's last row
    row_counts: torch.Tensor  # int32 [sequences]

    def __post_init__(self) -> None:
        for tensor in (self.block_tables, self.context_lens, self.row_counts):
            if tensor.dtype != torch.int32 or not tensor.is_contiguous() or tensor.device.type != "cpu":
                raise ValueError("block tables, context lengths and row counts must be contiguous int32 CPU tensors")
        sequences = self.block_tables.shape[0]
        if self.context_lens.shape != (sequences,) or self.row_counts.shape != (sequences,):
            raise ValueError("a decode batch needs one context length and one row count per block table")


@dataclass(frozen=True)
class NativeKernels:
    library: ctypes.CDLL
    entries: dict[tuple[str, torch.dtype], Callable[..., Any]]  # (entry point prefix, dtype) -> configured function
    has_amx: bool  # the AMX-BF16 linear kernel is built for this CPU and the process may use the tiles
    has_prompt_attention: bool  # the bf16 prompt attention kernel is built for this CPU (AVX512-BF16)
    # The activation dtypes the 4- and 8-bit linear kernels take here: fp32 everywhere; bf16 where the library is
    # built for AVX512-BF16 (the 4-bit one on AMX tiles too where there are any); INT8_ACTIVATIONS (4-bit only)
    # everywhere
    quantized_linear_dtypes: frozenset[torch.dtype]

    def decode_attention(
        self, query: torch.Tensor, key_cache: torch.Tensor, value_cache: torch.Tensor, batch: DecodeBatch, scale: float
    ) -> torch.Tensor:
        """query [R, H, D] (R = the batch's rows), caches [blocks, block_size, KVH, D] -> [R, H, D]; the kernel
        reads each sequence's K/V once for all its rows."""
        num_heads, head_dim = query.shape[1:]
        _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
        if cache_head_dim != head_dim or head_dim not in SUPPORTED_HEAD_DIMS or num_heads % num_kv_heads:
            raise ValueError(f"unsupported attention shape: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}")
        _check_rows(query, key_cache, value_cache)
        output = torch.empty_like(query)
        handled = self._entry("spindle_decode_attention", query.dtype)(
            query.data_ptr(),
            key_cache.data_ptr(),
            value_cache.data_ptr(),
            batch.block_tables.data_ptr(),
            batch.context_lens.data_ptr(),
            batch.row_counts.data_ptr(),
            output.data_ptr(),
            batch.block_tables.shape[0],
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            batch.block_tables.shape[1],
            scale,
            torch.get_num_threads(),
        )
        if not handled:
            raise ValueError(f"the native kernel has no instantiation for head_dim {head_dim}")
        return output

    def prompt_attention(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        output: torch.Tensor,
        prompts: torch.Tensor,
        scale: float,
    ) -> None:
        """Causal attention of prompts without a cached prefix, ``prompts`` int32 [n, 2] of (first row, rows), into
        their rows of ``output``: query and output [T, H, D], key and value [T, KVH, D], bf16, each row's heads
        contiguous (rows may be strided)."""
        num_heads, head_dim = query.shape[1:]
        num_kv_heads = key.shape[1]
        if not self.has_prompt_attention:
            raise ValueError("the native kernels have no prompt attention kernel on this CPU")
        for tensor, heads in ((query, num_heads), (key, num_kv_heads), (value, num_kv_heads), (output, num_heads)):
            if (
                tensor.dtype != torch.bfloat16
                or tensor.shape[1:] != (heads, head_dim)
                or tensor.stride()[1:] != (head_dim, 1)
            ):
                raise ValueError("prompt attention needs bf16 rows of contiguous heads, query and output alike")
        if head_dim not in SUPPORTED_HEAD_DIMS or num_heads % num_kv_heads:
            raise ValueError(f"unsupported attention shape: query {tuple(query.shape)}, key {tuple(key.shape)}")
        if prompts.dtype != torch.int32 or prompts.dim() != 2 or prompts.shape[1] != 2:
            raise ValueError("prompt attention takes the prompts' (first row, rows) as int32 [n, 2]")
        _check_rows(prompts)
        if prompts.numel() and (prompts[:, 0].min() < 0 or (prompts[:, 0] + prompts[:, 1]).max() > query.shape[0]):
            raise ValueError("a prompt's rows lie outside the step's")
        self._entry("spindle_prompt_attention", torch.bfloat16)(
            query.data_ptr(),
            key.data_ptr(),
            value.data_ptr(),
            output.data_ptr(),
            prompts.data_ptr(),
            prompts.shape[0],
            num_heads,
            num_kv_heads,
            head_dim,
            query.stride(0),
            key.stride(0),
            value.stride(0),
            output.stride(0),
            scale,
            torch.get_num_threads(),
        )

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RMSNorm of ``x`` [rows, hidden] (contiguous); with ``residual``, of ``residual + x``, which is also
        written into ``residual`` (in place)."""
        _check_rows(x, weight, *(() if residual is None else (residual,)))
        if x.dim() != 2 or weight.shape != x.shape[1:] or (residual is not None and residual.shape != x.shape):
            raise ValueError("rms_norm needs x [rows, hidden], a weight [hidden] and a residual shaped like x")
        output = torch.empty_like(x)
        self._entry("spindle_rms_norm", x.dtype)(
            x.data_ptr(),
            None if residual is None else residual.data_ptr(),
            weight.data_ptr(),
            output.data_ptr(),
            x.shape[0],
            x.shape[1],
            eps,
        )
        return output

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` for ``gate_up`` [rows, 2 * width] = [gate | up] (contiguous) -> [rows, width]."""
        _check_rows(gate_up)
        rows, width = gate_up.shape[0], gate_up.shape[1] // 2
        output = gate_up.new_empty(rows, width)
        self._entry("spindle_silu_and_mul", gate_up.dtype)(gate_up.data_ptr(), output.data_ptr(), rows, width)
        return output

    def rotary_qk(
        self, source: torch.Tensor, q_heads: int, k_heads: int, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotate-half RoPE of Q and K, the first ``q_heads`` and the next ``k_heads`` head vectors of each row of
        ``source`` [rows, >= (q_heads + k_heads) * dim] (rows may be strided, elements not), with ``cos``/``sin``
        [rows, dim] -> new Q [rows, q_heads, dim] and K [rows, k_heads, dim]."""
        rows, dim = cos.shape
        if (
            source.stride(1) != 1
            or source.shape[0] != rows
            or source.shape[1] < (q_heads + k_heads) * dim
            or sin.shape != cos.shape
            or source.dtype != cos.dtype
        ):
            raise ValueError("rotary needs one row of contiguous head vectors per table row, in the tables' dtype")
        _check_rows(cos, sin)
        q, k = source.new_empty(rows, q_heads, dim), source.new_empty(rows, k_heads, dim)
        self._entry("spindle_rotary", source.dtype)(
            source.data_ptr(),
            source.stride(0),
            cos.data_ptr(),
            sin.data_ptr(),
            q.data_ptr(),
            k.data_ptr(),
            rows,
            q_heads,
            k_heads,
            dim,
        )
        return q, k

    def decode_layers(
        self,
        layer_table: torch.Tensor,
        shape: DecoderShape,
        batch: DecodeBatch,
        final_norm: torch.Tensor,
        residual: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        slots: torch.Tensor,
        activations: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Every decoder layer of a decode step, then the final norm: ``residual`` [rows, hidden] holds the step's
        embeddings and is left holding the residual stream; returns the final norm's output. ``layer_table`` int64
        [layers, DECODER_LAYER_FIELDS] holds each layer's tensors' addresses (norm weights, 4-bit projections, bf16
        K/V caches, in the order cpu_decode_layers.cpp names), which the caller keeps alive; each row's K/V goes to
        its flat cache slot in ``slots`` (int64 [rows]). Everything of the residual's dtype but the tables; the
        projections are packed for ``activations`` (default: that dtype; INT8_ACTIVATIONS with fp32)."""
        rows = residual.shape[0]
        activations = _activations_of(residual, activations)
        if activations not in self.quantized_linear_dtypes:
            raise ValueError(f"the native kernels have no 4-bit linear kernel for {residual.dtype} on this CPU")
        if layer_table.dtype != torch.int64 or layer_table.shape != (shape.layers, DECODER_LAYER_FIELDS):
            raise ValueError(f"a decoder layer table is int64 [{shape.layers}, {DECODER_LAYER_FIELDS}]")
        if residual.shape != (rows, shape.hidden) or cos.shape != (rows, shape.head_dim) or sin.shape != cos.shape:
            raise ValueError("decode_layers needs residual [rows, hidden] and cos/sin [rows, head_dim]")
        if slots.dtype != torch.int64 or slots.shape != (rows,):
            raise ValueError("decode_layers needs one int64 cache slot per row")
        _check_rows(residual, final_norm, cos, sin)
        _check_rows(layer_table, slots)
        tables = batch.block_tables
        batch_args = _DecodeBatchArgs(
            tables.data_ptr(), batch.context_lens.data_ptr(), batch.row_counts.data_ptr(), *tables.shape
        )
        output = torch.empty_like(residual)
        handled = self._entry("spindle_decode_layers", activations)(
            layer_table.data_ptr(),
            ctypes.byref(shape),
            ctypes.byref(batch_args),
            final_norm.data_ptr(),
            residual.data_ptr(),
            output.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            slots.data_ptr(),
            rows,
            torch.get_num_threads(),
        )
        if not handled:
            raise ValueError(f"the native kernel has no instantiation for head_dim {shape.head_dim}")
        return output

    def pack_amx_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """A bf16 weight [out, in] (both multiples of AMX_BLOCK) in the AMX linear kernel's tile layout."""
        self._check_block_weight(weight.shape, self.has_amx, "AMX")
        _check_rows(weight)
        packed = torch.empty(weight.numel(), dtype=weight.dtype)
        self._entry("spindle_amx_pack", weight.dtype)(weight.data_ptr(), packed.data_ptr(), *weight.shape)
        return packed

    def pack_int4(
        self, levels: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor, activations: torch.dtype
    ) -> torch.Tensor:
        """4-bit weights in the layout of the 4-bit kernel for ``activations`` (bf16 or fp32), from ``levels``
        [out, in] (uint8, 0-15) and the fp16 ``scales`` and ``minimums`` [out, in / AMX_BLOCK] of each group of
        AMX_BLOCK input channels: w = level * scale + min."""
        self._check_block_weight(levels.shape, activations in self.quantized_linear_dtypes, f"4-bit {activations}")
        groups = (levels.shape[0], levels.shape[1] // AMX_BLOCK)
        if levels.dtype != torch.uint8 or scales.shape != groups or minimums.shape != groups:
            raise ValueError("4-bit packing needs uint8 levels [out, in] and a scale and minimum per group")
        _check_rows(levels)
        _check_rows(scales, minimums)
        if scales.dtype != torch.float16:
            raise ValueError("4-bit scales and minimums are fp16")
        packed = torch.empty(groups[0] * groups[1] * INT4_BYTES_PER_GROUP, dtype=torch.uint8)
        self._entry("spindle_pack_int4", activations)(
            levels.data_ptr(), scales.data_ptr(), minimums.data_ptr(), packed.data_ptr(), *levels.shape
        )
        return packed

    def pack_int8(self, values: torch.Tensor, scales: torch.Tensor, activations: torch.dtype) -> torch.Tensor:
        """8-bit weights in the layout of the 8-bit kernel for ``activations`` (bf16 or fp32), from ``values``
        [out, in] (int8, -127 to 127) and the fp16 ``scales`` [out, in / AMX_BLOCK] of each group of AMX_BLOCK input
        channels: w = value * scale."""
        self._check_block_weight(values.shape, activations in self.quantized_linear_dtypes, f"8-bit {activations}")
        groups = (values.shape[0], values.shape[1] // AMX_BLOCK)
        if values.dtype != torch.int8 or scales.shape != groups or scales.dtype != torch.float16:
            raise ValueError("8-bit packing needs int8 values [out, in] and an fp16 scale per group")
        _check_rows(values)
        _check_rows(scales)
        packed = torch.empty(groups[0] * groups[1] * INT8_BYTES_PER_GROUP, dtype=torch.uint8)
        self._entry("spindle_pack_int8", activations)(
            values.data_ptr(), scales.data_ptr(), packed.data_ptr(), *values.shape
        )
        return packed

    def linear_int8(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [rows, in] (bf16 or fp32, contiguous) and W [out_features, in] packed by pack_int8
        for x's dtype."""
        packed_bytes = out_features * x.shape[-1] // AMX_BLOCK * INT8_BYTES_PER_GROUP
        kernel = (x.dtype in self.quantized_linear_dtypes, "8-bit")
        return self._linear_call("spindle_linear_int8", kernel, x, packed, torch.uint8, packed_bytes, out_features)

    def amx_linear(self, x: torch.Tensor, packed: torch.Tensor, out_features: int) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [rows, in] (bf16, contiguous) and W [out_features, in] packed by pack_amx_weight."""
        packed_elements = out_features * x.shape[-1]
        kernel = (self.has_amx and x.dtype == torch.bfloat16, "AMX")
        return self._linear_call("spindle_amx_linear", kernel, x, packed, torch.bfloat16, packed_elements, out_features)

    def linear_int4(
        self,
        x: torch.Tensor,
        packed: torch.Tensor,
        out_features: int,
        use_tiles: bool = True,
        activations: torch.dtype | None = None,
    ) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [rows, in] (bf16 or fp32, contiguous) and W [out_features, in] packed by pack_int4
        for ``activations`` (default: x's dtype; INT8_ACTIVATIONS with fp32 x): in bf16 on the AMX tiles where there
        are any, unless ``use_tiles`` is False, else on the vector units."""
        activations = _activations_of(x, activations)
        groups = out_features * x.shape[-1] // AMX_BLOCK
        packed_bytes = groups * INT4_BYTES_PER_GROUP
        kernel = (activations in self.quantized_linear_dtypes, "4-bit")
        options = (use_tiles,) if x.dtype == torch.bfloat16 else ()
        return self._linear_call(
            "spindle_linear_int4",
            kernel,
            x,
            packed,
            torch.uint8,
            packed_bytes,
            out_features,
            *options,
            entry=activations,
        )

    def _linear_call(
        self,
        prefix: str,
        kernel: tuple[bool, str],  # whether the kernel is built here, and its name for errors
        x: torch.Tensor,
        packed: torch.Tensor,
        packed_dtype: torch.dtype,
        packed_elements: int,
        out_features: int,
        *options: bool,  # the entry point's arguments after the thread count
        entry: torch.dtype | None = None,  # the entry point's activation type, if not x's dtype
    ) -> torch.Tensor:
        # Called for every projection of every step: the checks are kept to what a few attribute reads tell.
        if x.dim() != 2:
            raise ValueError(f"the native linear kernels take activations [rows, in], not {tuple(x.shape)}")
        if not (x.is_contiguous() and x.is_cpu and packed.is_contiguous() and packed.is_cpu):
            raise ValueError("the native kernels need contiguous CPU tensors")
        rows, in_features = x.shape
        available, kind = kernel
        if not available:
            raise ValueError(f"the native kernels have no {kind} linear kernel for {x.dtype} on this CPU")
        if (
            packed.dtype != packed_dtype
            or packed.numel() != packed_elements
            or out_features % AMX_BLOCK
            or in_features % AMX_BLOCK
        ):
            raise ValueError(f"a packed weight of {packed.numel()} elements is not [{out_features}, {in_features}]")
        output = torch.empty((rows, out_features), dtype=x.dtype)
        handled = self._entry(prefix, entry or x.dtype)(
            x.data_ptr(),
            packed.data_ptr(),
            output.data_ptr(),
            rows,
            out_features,
            in_features,
            torch.get_num_threads(),
            *options,
        )
        if not handled:
            raise ValueError(f"{prefix} was built without a kernel for this CPU")
        return output

    @staticmethod
    def _check_block_weight(shape: tuple[int, ...], available: bool, kind: str) -> None:
        if not available:
            raise ValueError(f"the native kernels have no {kind} linear kernel on this CPU")
        if len(shape) != 2 or shape[0] % AMX_BLOCK or shape[1] % AMX_BLOCK:
            raise ValueError(f"the {kind} linear kernel needs a weight [out, in], both multiples of {AMX_BLOCK}")

    def _entry(self, prefix: str, dtype: torch.dtype) -> Callable[..., Any]:
        entry = self.entries.get((prefix, dtype))
        if entry is None:
            dtypes = ", ".join(str(known) for name, known in self.entries if name == prefix)
            raise ValueError(f"{prefix} takes {dtypes}, not {dtype}")
        return entry


def _activations_of(x: torch.Tensor, activations: torch.dtype | None) -> torch.dtype:
    """The kernels' activation type for ``x``: its dtype, or INT8_ACTIVATIONS, which takes fp32."""
    if activations is None:
        return x.dtype
    if activations == INT8_ACTIVATIONS and x.dtype != torch.float32:
        raise ValueError(f"the int8-activation kernels take fp32 activations, not {x.dtype}")
    if activations not in (INT8_ACTIVATIONS, x.dtype):
        raise ValueError(f"weights packed for {activations} activations cannot multiply {x.dtype} ones")
    return activations


def _check_rows(first: torch.Tensor, *others: torch.Tensor) -> None:
    for tensor in (first, *others):
        if not tensor.is_contiguous() or not tensor.is_cpu or tensor.dtype != first.dtype:
            raise ValueError("the native kernels need contiguous CPU tensors of one dtype")


def _compiler() -> str:
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    if compiler is None:
        raise NativeKernelsUnavailable("no C++ compiler found (set CXX or install g++)")
    return compiler


def _cpu_signature() -> str:
    """-march=native output depends on the CPU: key the cache on its model and flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(wanted)))


def _cache_dir() -> Path:
    configured = os.environ.get("SPINDLE_KERNEL_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "spindle" / "kernels"


def compile_command(compiler: str, target_cpu: str | None = None) -> list[str]:
    """The command that compiles the library for ``target_cpu`` (a ``-march`` value; default: the CPU profile's),
    less its output file."""
    target = cpu_profile().compiler_target if target_cpu is None else target_cpu
    return [compiler, *FLAGS, f"-march={target}", *(str(SOURCE_DIR / name) for name in SOURCES)]


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    texts = [path.read_text() for path in sorted(SOURCE_DIR.glob("*")) if path.suffix in (".cpp", ".h")]
    key = hashlib.sha256(
        "\0".join([*texts, " ".join(compile_command(compiler)), version, _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{LIBRARY_NAME}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load a half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [*compile_command(compiler), "-o", str(built)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise NativeKernelsUnavailable(f"building {', '.join(SOURCES)} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


def amx_kernels() -> NativeKernels | None:
    """The native kernels where their AMX-BF16 kernels can run here, else None."""
    return _kernels_where(lambda kernels: kernels.has_amx)


def native_quantized_kernels(activations: torch.dtype) -> NativeKernels | None:
    """The native kernels where their 4- and 8-bit linear kernels run here for ``activations``, else None."""
    return _kernels_where(lambda kernels: activations in kernels.quantized_linear_dtypes)


def _kernels_where(usable: Callable[[NativeKernels], bool]) -> NativeKernels | None:
    try:
        kernels = load_native_kernels()
    except NativeKernelsUnavailable:
        return None
    return kernels if usable(kernels) else None


def load_native_kernels() -> NativeKernels:
    """Build (if needed) and load the native kernels; raises NativeKernelsUnavailable saying why they can't be.

    Either outcome is kept for the life of the process: every layer asks, and a build that failed once would only
    fail again, seconds at a time."""
    loaded = _load_once()
    if isinstance(loaded, NativeKernelsUnavailable):
        raise NativeKernelsUnavailable(str(loaded))
    return loaded


@cache
def _load_once() -> NativeKernels | NativeKernelsUnavailable:
    try:
        path = _build(_compiler())
        library = ctypes.CDLL(str(path))
    except (NativeKernelsUnavailable, OSError) as error:
        unavailable = (
            error
            if isinstance(error, NativeKernelsUnavailable)
            else NativeKernelsUnavailable(f"loading the native kernels failed: {error}")
        )
        logger.warning("native CPU kernels unavailable, PyTorch's CPU paths serve instead: %s", unavailable)
        return unavailable
    entries = {}
    for prefix, (restype, signatures) in _SIGNATURES.items():
        for dtype, argtypes in signatures.items():
            entry = getattr(library, f"{prefix}_{DTYPE_SUFFIXES[dtype]}")
            entry.restype, entry.argtypes = restype, argtypes
            entries[prefix, dtype] = entry
    library.spindle_amx_enable.restype = ctypes.c_bool
    library.spindle_prompt_attention_enable.restype = ctypes.c_bool
    library.spindle_quantized_linear_enable.restype = ctypes.c_bool
    has_amx = bool(library.spindle_amx_enable())
    has_prompt_attention = bool(library.spindle_prompt_attention_enable())
    bf16 = (torch.bfloat16,) if library.spindle_quantized_linear_enable() else ()
    quantized = frozenset({torch.float32, INT8_ACTIVATIONS, *bf16})
    profile = cpu_profile()
    logger.info(
        "native CPU kernels (%s): AMX linear %s, bf16 prompt attention %s, 4/8-bit linear for %s",
        profile.describe(),
        "yes" if has_amx else "no",
        "yes" if has_prompt_attention else "no",
        " and ".join(sorted(str(dtype).removeprefix("torch.") for dtype in quantized)),
    )
    return NativeKernels(library, entries, has_amx, has_prompt_attention, quantized)
