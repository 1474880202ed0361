"""8-bit copies of weights stored as GGUF Q8_0, for the steps whose time is spent reading them.

Q8_0 stores a weight as ``value * scale``: values -127 to 127, one fp16 scale per 32 input channels. The embedded
model's token embedding, which is also its LM head, is Q8_0: its dense bf16 copy holds every weight rounded, in
twice the bytes. ``Int8Weight.of_q8_0`` recovers the values and scales from the file's dequantized fp32 weights (a
group's largest magnitude is 127 times its scale, as Q8_0's quantizer sets it) and keeps them only where they
reproduce every weight exactly; the native kernel (bf16 activations on AVX512-BF16, fp32 on any CPU) then multiplies
with the file's own weights.
Measured on the LM head (49152 x 576) read from memory, against the dense bf16 copy: 0.57x the time at 1 row, 0.56x
at 8, 0.74x at 16, 1.07x at 32 (AMD Zen 5, bf16), hence LM_HEAD_INT8_MAX_ROWS.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.native import AMX_BLOCK, NativeKernels, native_quantized_kernels

GROUP_SIZE = 32
_LARGEST_VALUE = 127
LM_HEAD_INT8_MAX_ROWS = 16
assert GROUP_SIZE == AMX_BLOCK


@dataclass(frozen=True)
class Int8Weight:
    kernels: NativeKernels
    packed: torch.Tensor  # values and scales in the native kernel's 8-bit layout
    out_features: int

    @classmethod
    def of_q8_0(cls, weight: torch.Tensor, activations: torch.dtype) -> Int8Weight | None:
        """The copy of ``weight`` [out, in] (the dequantized fp32 values) for ``activations``, or None where those
        are not exactly Q8_0 groups, the shape does not fit the kernel, or there is no kernel here."""
        kernels = native_quantized_kernels(activations)
        if kernels is None or weight.dim() != 2 or weight.shape[0] % AMX_BLOCK or weight.shape[1] % GROUP_SIZE:
            return None
        groups = weight.float().reshape(weight.shape[0], -1, GROUP_SIZE)
        scales = (groups.abs().amax(dim=-1) / _LARGEST_VALUE).half()
        if not scales.isfinite().all():
            return None
        divisor = scales.float().where(scales != 0, 1.0)[..., None]  # an all-zero group has zero values
        values = torch.round(groups / divisor).clamp(-_LARGEST_VALUE, _LARGEST_VALUE)
        if not torch.equal(values * scales.float()[..., None], groups):
            return None
        packed = kernels.pack_int8(values.to(torch.int8).reshape(weight.shape), scales, activations)
        return cls(kernels, packed, weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        return self.kernels.linear_int8(x.contiguous(), self.packed, self.out_features)
