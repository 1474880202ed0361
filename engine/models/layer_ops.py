"""The elementwise parts of a decoder layer: RMSNorm (after the residual add), SiLU-and-multiply, rotary embedding.

On the CPU they run as one native kernel each (kernels/csrc/cpu_layer_ops.cpp): in PyTorch each is a chain of five
to ten small operators, whose fixed cost per call was about a fifth of a one-sequence decode step. Elsewhere (a GPU,
or a CPU without a C++ compiler) the PyTorch chains below run. Both compute in fp32 and round to the activations'
type wherever the reference chain does, so they differ only where fp32's last bits (summation order) tip a rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from typing import Protocol

import torch
from torch.nn import functional as F

from kernels.native import NativeKernels, NativeKernelsUnavailable, load_native_kernels


@dataclass(frozen=True)
class RotaryAngles:
    """cos and sin [T, head_dim] of one step's positions, in the activations' dtype."""

    cos: torch.Tensor
    sin: torch.Tensor


class LayerOps(Protocol):
    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        """RMSNorm of ``x`` [T, hidden], or with ``residual`` of ``residual + x``, written into ``residual``."""
        ...

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` of ``gate_up`` [T, 2 * width] = [gate | up]."""
        ...

    def rotary_qk(
        self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, angles: RotaryAngles
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Q [T, num_heads, D] and K [T, num_kv_heads, D], rotated, from the fused projection's output [T, >=]."""
        ...


class TorchLayerOps:
    """The reference chains, as Hugging Face's Llama computes them."""

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        if residual is not None:
            x = residual.add_(x)
        # Normalise in fp32 so bf16 activations don't lose the small variances; round before the weight.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
        return weight * x32.to(x.dtype)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up

    def rotary_qk(
        self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, angles: RotaryAngles
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Q and K sit side by side in the fused projection's output: rotate them as one [T, heads + KV heads] tensor.
        head_dim = angles.cos.shape[-1]
        q_and_k = qkv[:, : (num_heads + num_kv_heads) * head_dim].view(-1, num_heads + num_kv_heads, head_dim)
        half = head_dim // 2
        rotated = torch.cat((-q_and_k[..., half:], q_and_k[..., :half]), dim=-1)
        out = q_and_k * angles.cos.unsqueeze(1) + rotated * angles.sin.unsqueeze(1)
        q, k = out.split([num_heads, num_kv_heads], dim=1)
        return q, k


@dataclass(frozen=True)
class NativeLayerOps:
    kernels: NativeKernels

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.kernels.rms_norm(x.contiguous(), weight, eps, residual)

    def silu_and_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        return self.kernels.silu_and_mul(gate_up.contiguous())

    def rotary_qk(
        self, qkv: torch.Tensor, num_heads: int, num_kv_heads: int, angles: RotaryAngles
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kernels.rotary_qk(qkv, num_heads, num_kv_heads, angles.cos, angles.sin)


TORCH_LAYER_OPS = TorchLayerOps()


@cache
def layer_ops_for(device_type: str) -> LayerOps:
    """The native kernels on the CPU when they build, else the PyTorch chains."""
    if device_type != "cpu":
        return TORCH_LAYER_OPS
    try:
        return NativeLayerOps(load_native_kernels())
    except NativeKernelsUnavailable:  # logged once, with the reason, where the build failed
        return TORCH_LAYER_OPS
