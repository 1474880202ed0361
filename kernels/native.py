"""Build and load the native CPU kernels (kernels/csrc) with the system C++ compiler, called through ctypes.

The shared library is compiled once per source, compiler and CPU (``-march=native``) into a cache directory
(``$SPINDLE_KERNEL_CACHE``, default ``~/.cache/spindle/kernels``) and reused by every later process. No PyTorch
headers are involved, so a build takes about a second. Where no compiler is found or the build fails,
``load_native_kernels`` returns None with the reason, and the vectorised PyTorch path serves instead.
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
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

logger = logging.getLogger("spindle.kernels")

SOURCE = Path(__file__).parent / "csrc" / "cpu_paged_attention.cpp"
FLAGS = ("-O3", "-march=native", "-fopenmp", "-std=c++17", "-shared", "-fPIC")
SUPPORTED_HEAD_DIMS = (64, 80, 96, 128, 256)  # instantiated in the kernel source
_ENTRY_POINTS = {
    torch.float32: "spindle_decode_attention_f32",
    torch.float16: "spindle_decode_attention_f16",
    torch.bfloat16: "spindle_decode_attention_bf16",
}


class NativeKernelsUnavailable(RuntimeError):
    pass


@dataclass(frozen=True)
class NativeKernels:
    library: ctypes.CDLL

    def decode_attention(
        self,
        query: torch.Tensor,
        key_cache: torch.Tensor,
        value_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        row_counts: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """query [R, H, D], caches [blocks, block_size, KVH, D], int32 block_tables [S, max_blocks], context_lens
        [S] and row_counts [S] -> [R, H, D]. Sequence ``s`` owns the next ``row_counts[s]`` query rows (default: one
        each), the last at context length ``context_lens[s]`` and each earlier one a position before the next; the
        kernel reads the sequence's K/V once for all of them."""
        num_heads, head_dim = query.shape[1:]
        num_seqs = block_tables.shape[0]
        if row_counts is None:
            row_counts = torch.ones(num_seqs, dtype=torch.int32)
        _, block_size, num_kv_heads, cache_head_dim = key_cache.shape
        if cache_head_dim != head_dim or head_dim not in SUPPORTED_HEAD_DIMS or num_heads % num_kv_heads:
            raise ValueError(f"unsupported attention shape: query {tuple(query.shape)}, cache {tuple(key_cache.shape)}")
        for tensor in (query, key_cache, value_cache, block_tables, context_lens, row_counts):
            if not tensor.is_contiguous() or tensor.device.type != "cpu":
                raise ValueError("native decode attention needs contiguous CPU tensors")
        if any(tensor.dtype != torch.int32 for tensor in (block_tables, context_lens, row_counts)):
            raise ValueError("block tables, context lengths and row counts must be int32")
        output = torch.empty_like(query)
        entry = getattr(self.library, _ENTRY_POINTS[query.dtype])
        handled = entry(
            ctypes.c_void_p(query.data_ptr()),
            ctypes.c_void_p(key_cache.data_ptr()),
            ctypes.c_void_p(value_cache.data_ptr()),
            ctypes.c_void_p(block_tables.data_ptr()),
            ctypes.c_void_p(context_lens.data_ptr()),
            ctypes.c_void_p(row_counts.data_ptr()),
            ctypes.c_void_p(output.data_ptr()),
            num_seqs,
            num_heads,
            num_kv_heads,
            head_dim,
            block_size,
            block_tables.shape[1],
            ctypes.c_float(scale),
            torch.get_num_threads(),
        )
        if not handled:
            raise ValueError(f"the native kernel has no instantiation for head_dim {head_dim}")
        return output


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


def _build(compiler: str) -> Path:
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), compiler, version, " ".join(FLAGS), _cpu_signature()]).encode()
    ).hexdigest()[:16]
    target = _cache_dir() / f"{SOURCE.stem}-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Build under a temporary name and rename: concurrent processes never load a half-written library.
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        result = subprocess.run(
            [compiler, *FLAGS, str(SOURCE), "-o", str(built)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise NativeKernelsUnavailable(f"building {SOURCE.name} failed:\n{result.stderr.strip()[-2000:]}")
        os.replace(built, target)
    return target


@cache
def load_native_kernels() -> NativeKernels:
    """Build (if needed) and load the native kernels; raises NativeKernelsUnavailable saying why they can't be."""
    try:
        path = _build(_compiler())
        library = ctypes.CDLL(str(path))
    except OSError as error:
        raise NativeKernelsUnavailable(f"loading the native kernels failed: {error}") from error
    for name in _ENTRY_POINTS.values():
        getattr(library, name).restype = ctypes.c_bool
    logger.debug("native CPU kernels loaded from %s", path)
    return NativeKernels(library)
