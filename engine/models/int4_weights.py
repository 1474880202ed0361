"""4-bit weight-only copies of linear layers, for the steps whose time is spent reading weights.

A decode step reads every weight once and, at a few dozen rows, does little arithmetic with it, so its time is the
weights' bytes: a 4-bit copy (with one scale and offset per group of 32 input channels) is about a quarter of bf16's.
Two kernels multiply it:

- ``NativeInt4Weight``, the native kernels:
  - bf16 on a CPU with AVX512-BF16: the kernel multiplies the rows by each group's levels (exact in bf16) and applies
    the group's scale and minimum to those fp32 dot products, so no weight is rounded to bf16: on AMX tiles, 16 rows
    at a time, where the CPU has AMX-BF16, else on the vector units (vdpbf16ps), which read the same layout. Ahead of
    the dense weights up to 16 rows on AMX, about 64 on the vector units.
  - fp32 on any CPU (kernels/csrc/cpu_linear_f32.cpp): each weight rebuilt in fp32 exactly as the file's reader
    dequantizes it, so the products are those of an fp32 model of the dequantized weights.
  - fp32 quantized to int8 per group inside the kernel (``INT8_ACTIVATIONS``, kernels/csrc/cpu_linear_q8.cpp, with
    ``activation_quantization: int8``): integer dot products of the levels, lossy and faster.
- ``TorchInt4Weight``: PyTorch's CPU kernel ``_weight_int4pack_mm_for_cpu``, which falls behind the dense weights
  beyond about 4 rows.

A layer holds one of them and uses it for steps of up to ``int4_max_rows`` rows (see ``BucketedLinear``).

The levels are asymmetric min/max per group: ``w = level * scale + min``, levels 0 to 15. A GGUF ``Q4_1`` block stores
exactly this (32 weights, ``w = level * d + m`` with the block's minimum at level 0 and its maximum at 15), so
requantizing its dequantized values recovers the file's own levels, and fp16 scales and minimums (as Q4_1 stores
them) its own ``d`` and ``m``: for such a model the native kernel computes with the file's weights exactly, which
the dense bf16 copy holds rounded.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.models.bucketed_linear import CompactWeight
from kernels.native import AMX_BLOCK, INT8_ACTIVATIONS, NativeKernels, native_quantized_kernels

GROUP_SIZE = 32
_LEVELS = 15
_MIDPOINT = 8  # PyTorch's kernel stores levels around 8: w = (level - 8) * scale + (min + 8 * scale)
assert GROUP_SIZE == AMX_BLOCK


@dataclass(frozen=True)
class GroupLevels:
    """A weight [out, in] as 4-bit levels per group of GROUP_SIZE input channels: w = level * scale + low."""

    levels: torch.Tensor  # int32 [out, in], 0 to 15
    scale: torch.Tensor  # fp32 [out, in / GROUP_SIZE]
    low: torch.Tensor  # fp32 [out, in / GROUP_SIZE]

    @classmethod
    def of(cls, weight: torch.Tensor) -> GroupLevels:
        """The levels of ``weight`` (best given in fp32, before rounding to the activations' dtype)."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low = groups.amin(dim=-1)
        scale = ((groups.amax(dim=-1) - low) / _LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
        levels = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, _LEVELS)
        return cls(levels.reshape(out_features, in_features).to(torch.int32), scale, low)


def supports_int4(weight: torch.Tensor) -> bool:
    return weight.dim() == 2 and weight.device.type == "cpu" and weight.shape[1] % GROUP_SIZE == 0


def quantize_int4(weight: torch.Tensor, activations: torch.dtype) -> CompactWeight:
    """The 4-bit copy of ``weight`` [out, in] for ``activations`` (a dtype, or INT8_ACTIVATIONS), for the fastest
    kernel that takes it (PyTorch's, exact in fp32, where no native one does)."""
    group_levels = GroupLevels.of(weight)
    kernels = native_quantized_kernels(activations)
    if kernels is not None and weight.shape[0] % AMX_BLOCK == 0:
        native = NativeInt4Weight.pack(kernels, group_levels, activations)
        if native is not None:
            return native
    return TorchInt4Weight.pack(group_levels, torch.float32 if activations == INT8_ACTIVATIONS else activations)


@dataclass(frozen=True)
class NativeInt4Weight:
    kernels: NativeKernels
    packed: torch.Tensor  # levels, scales and minimums in the native kernel's layout for the activations' dtype
    out_features: int
    activations: torch.dtype  # bf16, fp32 or INT8_ACTIVATIONS (fp32 in and out)

    @classmethod
    def pack(
        cls, kernels: NativeKernels, group_levels: GroupLevels, activations: torch.dtype
    ) -> NativeInt4Weight | None:
        """The copy for ``activations`` (bf16, fp32 or INT8_ACTIVATIONS), or None where a scale or minimum is beyond
        fp16's range."""
        levels = group_levels.levels.to(torch.uint8)
        scales, lows = group_levels.scale.half(), group_levels.low.half()
        if not (scales.isfinite().all() and lows.isfinite().all()):
            return None
        return cls(kernels, kernels.pack_int4(levels, scales, lows, activations), levels.shape[0], activations)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int4(x.contiguous(), self.packed, self.out_features, activations=self.activations)


@dataclass(frozen=True)
class TorchInt4Weight:
    packed: torch.Tensor  # the levels in the CPU kernel's packed layout
    scales_and_zeros: torch.Tensor  # [in_features / GROUP_SIZE, out_features, 2], in the activations' dtype
    out_features: int

    @classmethod
    def pack(cls, group_levels: GroupLevels, dtype: torch.dtype) -> TorchInt4Weight:
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(group_levels.levels, 1)
        scale = group_levels.scale
        zero = group_levels.low + _MIDPOINT * scale
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, scales_and_zeros, group_levels.levels.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)
