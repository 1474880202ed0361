"""Choose an attention backend by name and device.

- ``cpu``: paged attention with the native decode kernel (built with the system C++ compiler at first use);
- ``torch``: the same CPU paths in vectorised PyTorch only, for machines without a compiler;
- ``auto``: ``cpu`` where the native kernel builds, else ``torch`` (with a warning saying why).
"""

from __future__ import annotations

import logging

import torch

from kernels.backend import AttentionBackend
from kernels.cpu_attention import CpuAttentionBackend
from kernels.native import SUPPORTED_HEAD_DIMS, NativeKernelsUnavailable, load_native_kernels

logger = logging.getLogger("spindle.kernels")

BACKENDS = ("auto", "cpu", "torch")


def get_attention_backend(name: str, device: torch.device, head_dim: int) -> AttentionBackend:
    """Raises ValueError for an unknown name, a device without a backend, or an asked-for backend that can't load."""
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if device.type != "cpu":
        raise ValueError(f"no attention backend available for device {device.type!r} in this build")
    if name == "torch":
        return CpuAttentionBackend()
    try:
        if head_dim not in SUPPORTED_HEAD_DIMS:
            raise NativeKernelsUnavailable(f"head_dim {head_dim} is not one of {SUPPORTED_HEAD_DIMS}")
        return CpuAttentionBackend(load_native_kernels())
    except NativeKernelsUnavailable as exc:
        if name == "cpu":
            raise ValueError(f"attention backend 'cpu' is unavailable: {exc}") from exc
        logger.warning("native CPU attention kernel unavailable, using the PyTorch path: %s", exc)
        return CpuAttentionBackend()
