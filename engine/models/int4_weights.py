"""4-bit weight-only copies of linear layers, for the small steps whose time is spent reading weights.

A decode step of a few sequences reads every weight once and does little arithmetic with it, so its time is the
weights' bytes: a 4-bit copy (with one scale and offset per group of 32 input channels) is about a quarter of bf16's
and runs several times faster at one to four rows on this kind of CPU. Larger steps are bound by arithmetic, where the
dense bf16 weights on AMX win, so a layer keeps both and picks by the step's row count (see ``BucketedLinear``).

The levels are asymmetric min/max per group: ``w = (level - 8) * scale + zero`` with ``zero = min + 8 * scale``, the
form of PyTorch's CPU kernel ``_weight_int4pack_mm_for_cpu``. A GGUF ``Q4_1`` block stores exactly this (32 weights,
``w = level * d + m`` with the block's minimum at level 0 and its maximum at 15), so requantizing its dequantized
values recovers the file's own levels: for such a model the 4-bit path computes with the weights as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

GROUP_SIZE = 32
_LEVELS = 15
_MIDPOINT = 8


@dataclass(frozen=True)
class Int4Weight:
    packed: torch.Tensor  # the levels in the CPU kernel's packed layout
    scales_and_zeros: torch.Tensor  # [in_features / GROUP_SIZE, out_features, 2], in the activations' dtype
    out_features: int

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        return weight.dim() == 2 and weight.device.type == "cpu" and weight.shape[1] % GROUP_SIZE == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor, dtype: torch.dtype) -> Int4Weight:
        """Levels from ``weight`` [out, in] (best given in fp32, before rounding to ``dtype``); scales in ``dtype``."""
        out_features, in_features = weight.shape
        groups = weight.float().reshape(out_features, in_features // GROUP_SIZE, GROUP_SIZE)
        low = groups.amin(dim=-1)
        scale = ((groups.amax(dim=-1) - low) / _LEVELS).clamp(min=torch.finfo(torch.float32).tiny)
        levels = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, _LEVELS)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            levels.reshape(out_features, in_features).to(torch.int32), 1
        )
        zero = low + _MIDPOINT * scale
        scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(dtype)
        return cls(packed, scales_and_zeros, out_features)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [rows, in] in the scales' dtype."""
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, self.packed, GROUP_SIZE, self.scales_and_zeros)
