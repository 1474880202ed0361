"""A linear layer that rounds its row count up to one of a few sizes on the CPU in reduced precision.

oneDNN, which runs PyTorch's bf16/fp16 matmuls on the CPU, compiles and keeps one kernel per input shape; a serving
engine's steps have every row count from 1 to ``max_num_batched_tokens``, so resident memory grew by more than a
gigabyte over a long run. Rows are padded to a bucket (kernels/shape_buckets.py): about fifty shapes per weight, all
compiled at start-up. Steps of up to 64 rows (decodes) are bound by reading the weights more than by their rows, so
they pad to a multiple of 8; longer ones pad by at most an eighth, and a step that fills a power-of-two token budget
exactly not at all.

In bf16, ``pack`` keeps a second copy of the weight in the layout its kernel reads. On a CPU with AMX-BF16 that is
the native AMX kernel's (``AmxWeight``), which takes every row count without padding and without compiling
anything. Elsewhere, where oneDNN packs bf16 weights at all (AVX-512BW/VL/DQ or AVX-NE-CONVERT: PyTorch raises an
error without them, kernels/cpu_profile.py), it is oneDNN's blocked layout, which its matmuls otherwise rebuild from
the plain weight on every call: 5-10% off a whole decode step at 1 and 8 sequences and 4% off a prefill (measured in
one process, alternating), with the same results bit for bit where the CPU has bf16 dot products (within one bf16
rounding elsewhere, where the two paths sum in different orders). The plain weight stays for everything else that
reads it.

A layer may also hold a compact copy of its weight (4-bit: engine/models/int4_weights.py; 8-bit: int8_weights.py)
that steps of up to ``compact_max_rows`` rows use: such steps spend their time reading the weight.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn
from torch.nn import functional as F

from engine.models.amx_weights import AmxWeight
from kernels.cpu_profile import cpu_profile
from kernels.shape_buckets import BUCKETED_DTYPES, bucket_rows, bucket_sizes


class CompactWeight(Protocol):
    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` for ``x`` [rows, in] in the layer's dtype."""
        ...


class BucketedLinear(nn.Linear):
    compact: CompactWeight | None = None
    compact_max_rows: int = 0
    amx: AmxWeight | None = None  # the weight in the native AMX kernel's layout
    packed: torch.Tensor | None = None  # the weight in oneDNN's blocked layout, where there is no AMX kernel

    def use_compact(self, weight: CompactWeight, max_rows: int) -> None:
        self.compact, self.compact_max_rows = weight, max_rows

    @torch.inference_mode()
    def pack(self, use_amx: bool = True) -> None:
        """Keep a copy of the weight in its kernel's layout (bf16 on the CPU only; a no-op elsewhere): the native AMX
        kernel's where it can run (unless ``use_amx`` is False), else oneDNN's where the CPU profile allows it. Call it
        again after changing the weight."""
        self.amx = self.packed = None
        if not self.bucketed or self.weight.dtype != torch.bfloat16:
            return
        self.amx = AmxWeight.pack(self.weight) if use_amx else None
        if self.amx is None and torch.backends.mkldnn.is_available() and cpu_profile().onednn_packs_bf16:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), None)

    @property
    def bucketed(self) -> bool:
        return self.weight.device.type == "cpu" and self.weight.dtype in BUCKETED_DTYPES

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if self.compact is not None and x.dim() == 2 and rows <= self.compact_max_rows:
            out = self.compact.matmul(x)
            return out if self.bias is None else out + self.bias
        if not self.bucketed or x.dim() != 2:
            return F.linear(x, self.weight, self.bias)
        if self.amx is not None:
            out = self.amx.matmul(x)
            return out if self.bias is None else out + self.bias
        padded = bucket_rows(rows)
        if padded == rows:
            return self._dense(x)
        return self._dense(F.pad(x, (0, 0, 0, padded - rows)))[:rows]

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is None:
            return F.linear(x, self.weight, self.bias)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    @torch.inference_mode()
    def warm_up(self, max_rows: int) -> None:
        """Run every bucket up to ``max_rows`` rows once, so its kernel is compiled now rather than during serving."""
        if not self.bucketed or self.amx is not None:
            return
        for rows in bucket_sizes(max_rows):
            self(torch.zeros(rows, self.in_features, dtype=self.weight.dtype))
