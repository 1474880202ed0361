"""bf16 weights in the tile layout of the native AMX linear kernel (kernels/csrc/cpu_linear.cpp).

On a CPU with AMX-BF16 this kernel serves every row count of a bf16 projection: it reads the weights near the
machine's memory bandwidth where decode steps are bound by them, and stays ahead of oneDNN's matmul on prefill
rows. It compiles nothing per shape, so the layers that use it need no row buckets.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.native import AMX_BLOCK, NativeKernels, amx_kernels


@dataclass(frozen=True)
class AmxWeight:
    kernels: NativeKernels
    packed: torch.Tensor  # the weight in the kernel's tile layout
    out_features: int

    @classmethod
    def pack(cls, weight: torch.Tensor) -> AmxWeight | None:
        """The packed copy of ``weight`` [out, in], or None where the kernel cannot take it: not bf16 on the CPU,
        a dimension not a multiple of AMX_BLOCK, or no AMX kernel on this machine."""
        if weight.dtype != torch.bfloat16 or weight.device.type != "cpu" or weight.dim() != 2:
            return None
        if weight.shape[0] % AMX_BLOCK or weight.shape[1] % AMX_BLOCK:
            return None
        kernels = amx_kernels()
        if kernels is None:
            return None
        return cls(kernels, kernels.pack_amx_weight(weight.detach().contiguous()), weight.shape[0])

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [rows, in] in bf16."""
        return self.kernels.amx_linear(x.contiguous(), self.packed, self.out_features)
