"""Choose an attention backend by name and device.

- ``triton``: Spindle's Triton kernels; the default on CUDA. On a CPU only under ``TRITON_INTERPRET=1`` (Triton's
  interpreter, for checking the kernels; far too slow to serve).
- ``xformers``: on CUDA, prefill in xFormers' memory-efficient attention, the rest in Triton; needs the ``cuda``
  extra.
- ``cpu``: paged attention with the native decode kernel (built with the system C++ compiler at first use);
- ``torch``: the same CPU paths in vectorised PyTorch only, for machines without a compiler;
- ``auto``: ``triton`` on CUDA; on a CPU ``cpu`` where the native kernel builds, else ``torch`` (with a warning).

Page selection (kernels/page_selecting_backend.py) wraps ``cpu`` or ``triton`` over a plain (not quantized) cache.
"""

from __future__ import annotations

import importlib.util
import logging
import os

import torch

from kernels.backend import AttentionBackend
from kernels.cpu_attention import CpuAttentionBackend
from kernels.dequantizing_backend import DequantizingBackend
from kernels.kv_codecs import CodecSettings
from kernels.native import SUPPORTED_HEAD_DIMS, NativeKernelsUnavailable, load_native_kernels
from kernels.page_selecting_backend import PageSelectingBackend
from kernels.page_selection import PageSelectionPolicy

logger = logging.getLogger("spindle.kernels")

BACKENDS = ("auto", "cpu", "torch", "triton", "xformers")
CPU_BACKENDS = ("cpu", "torch")
PAGE_SELECTION_BACKENDS = ("cpu", "triton")


def get_attention_backend(
    name: str,
    device: torch.device,
    head_dim: int,
    quantized_cache: bool = False,
    block_codec: CodecSettings | None = None,
    query_decay: float = 0.0,
    page_selection: bool = False,
) -> AttentionBackend:
    """Raises ValueError for an unknown name, a backend that doesn't run on ``device``, or one that can't load.

    ``quantized_cache``: the KV cache is a QuantizedCache. Triton reads it in its kernels; the CPU backends through
    a dequantized working set (kernels/dequantizing_backend.py); xFormers cannot.
    ``page_selection``: the backend will be wrapped by ``with_page_selection``; refuses what that cannot wrap.
    ``block_codec``: the cache is a CodecCache of these settings (KIVI, GEAR, ThinK). Triton's kernels read KIVI's
    blocks in place; GEAR's and ThinK's blocks, and every codec on the CPU backends, are read through the same
    working set; ``query_decay`` is then ThinK's per-token decay of the query energy. xFormers reads none.
    """
    backend = _backend(name, device, head_dim)
    if page_selection:
        if quantized_cache:
            raise ValueError("kv_policy quest needs a plain KV cache (kv_cache_dtype auto), not a quantized one")
        if backend.name not in PAGE_SELECTION_BACKENDS:
            raise ValueError(
                f"kv_policy quest needs attention backend 'cpu' (the native kernel) or 'triton', not {backend.name!r}"
            )
    if block_codec is not None and block_codec.active:
        if backend.name == "xformers":
            raise ValueError(
                "attention backend 'xformers' cannot read a block-compressed KV cache (kv_codec, "
                "kv_key_channel_keep); use 'triton'"
            )
        if backend.name == "triton" and block_codec.read_in_kernels:
            return backend
        return DequantizingBackend(backend, query_decay)
    if not quantized_cache or backend.name == "triton":
        return backend
    if backend.name == "xformers":
        raise ValueError("attention backend 'xformers' cannot read a quantized KV cache; use 'triton'")
    return DequantizingBackend(backend)


def _backend(name: str, device: torch.device, head_dim: int) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"no attention backend available for device {device.type!r}")
    if name == "auto":
        name = "triton" if device.type == "cuda" else "cpu"
        if name == "cpu":
            return _cpu_backend(head_dim, required=False)
    if name in CPU_BACKENDS:
        if device.type != "cpu":
            raise ValueError(f"attention backend {name!r} runs on the CPU only; use 'triton' or 'xformers' on CUDA")
        return _cpu_backend(head_dim, required=True) if name == "cpu" else CpuAttentionBackend()
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"attention backend {name!r} needs a CUDA device (or TRITON_INTERPRET=1 to run Triton's interpreter on "
            "the CPU, for testing only)"
        )
    if name == "xformers":
        if importlib.util.find_spec("xformers") is None:
            raise ValueError("attention backend 'xformers' needs xformers: pip install 'spindle[cuda]'")
        from kernels.xformers_backend import XFormersAttentionBackend

        return XFormersAttentionBackend(device)
    from kernels.triton_backend import TritonAttentionBackend

    return TritonAttentionBackend(device)


def _cpu_backend(head_dim: int, required: bool) -> CpuAttentionBackend:
    try:
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise NativeKernelsUnavailable(f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
        return CpuAttentionBackend(load_native_kernels())
    except NativeKernelsUnavailable as exc:
        if required:
            raise ValueError(f"attention backend 'cpu' is unavailable: {exc}") from exc
        logger.warning("native CPU attention kernel unavailable, using the PyTorch path: %s", exc)
        return CpuAttentionBackend()


def with_page_selection(
    backend: AttentionBackend, policy: PageSelectionPolicy, key_caches: list[torch.Tensor]
) -> PageSelectingBackend:
    """``backend`` (from ``get_attention_backend(..., page_selection=True)``) with decode page selection; blocks
    are scored in a Triton kernel under the Triton backend, in PyTorch under the CPU one."""
    if backend.name == "triton":
        from kernels.triton_ops.block_scores import block_scores

        return PageSelectingBackend(backend, policy, key_caches, block_scores)  # type: ignore[arg-type]
    return PageSelectingBackend(backend, policy, key_caches)  # type: ignore[arg-type]
