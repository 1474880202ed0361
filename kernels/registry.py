"""Choose an attention backend by name and device."""

from __future__ import annotations

import torch

from kernels.backend import AttentionBackend
from kernels.cpu_attention import CpuAttentionBackend

BACKENDS = ("auto", "cpu")


def get_attention_backend(name: str, device: torch.device) -> AttentionBackend:
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r} (choose one of: {', '.join(BACKENDS)})")
    if device.type != "cpu":
        raise ValueError(f"no attention backend available for device {device.type!r} in this build")
    return CpuAttentionBackend()
