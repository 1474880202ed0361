"""The compact weight copies small steps multiply with, applied to any model from outside its definition.

Which copies: a 4-bit one (engine/models/int4_weights.py) for every ``BucketedLinear`` projection and, where the
LM head's weights are exactly GGUF Q8_0, an 8-bit one for it (int8_weights.py). ``int4_rows_for`` decides for how
many rows a step uses them (0: none); ``WeightCopies`` builds them while the model loads, from the tensors as given
(fp32: the exact levels of a Q4_1 file), before they are rounded to the parameters' dtype. It builds each as soon as
its parameter is complete, so at most one fused projection is staged at a time: building them after loading would
need the whole model kept in fp32.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.bucketed_linear import BucketedLinear
from engine.models.int4_weights import quantize_int4, supports_int4
from engine.models.int8_weights import LM_HEAD_INT8_MAX_ROWS, Int8Weight
from kernels.native import native_quantized_kernels

if TYPE_CHECKING:
    from engine.config import ModelConfig

# Measured with the 4-bit copies against the dense bf16 weights (time ratios):
AMX_INT4_MAX_ROWS = 16  # the native kernel on AMX tiles, decode steps: 0.78x at 8 sequences, 0.88x at 16
# The native kernel on the vector units of a CPU with AVX512-BF16 and no AMX (AMD Zen 5), a decode step's
# projections from memory: 0.38x at 1 row, 0.65x at 16, 0.85x at 32, 0.81x at 48, 0.93x at 64.
VECTOR_INT4_MAX_ROWS = 48
TORCH_INT4_MAX_ROWS = 4  # PyTorch's 4-bit kernel on AMX: 0.70x at 1 sequence, 0.94x at 4, 1.16x at 8
F32_INT4_MAX_ROWS = 32  # the native kernel with fp32 activations (any CPU)


def int4_rows_for(config: ModelConfig, weights_are_q4_1: bool, device: torch.device) -> int:
    """How many rows a step may have to use the 4-bit copies; 0: build none."""
    if config.weight_quantization == "int4" and device.type != "cpu":
        raise ConfigError(f"weight_quantization int4 runs on the CPU only, not on {device.type}")
    dtype = config.torch_dtype
    native = native_quantized_kernels(dtype) if device.type == "cpu" and dtype != torch.float16 else None
    wanted = config.weight_quantization == "int4" or (
        config.weight_quantization == "auto" and weights_are_q4_1 and native is not None
    )
    if not wanted:
        return 0
    if config.int4_max_rows is not None:
        return config.int4_max_rows
    if native is None:
        return TORCH_INT4_MAX_ROWS
    if dtype == torch.float32:
        return F32_INT4_MAX_ROWS
    return AMX_INT4_MAX_ROWS if native.has_amx else VECTOR_INT4_MAX_ROWS


class WeightCopies:
    """Gives ``model``'s projections their 4-bit copies for steps of up to ``max_rows`` rows, packed for
    ``activations`` (default: each parameter's dtype; kernels.native.INT8_ACTIVATIONS to quantize fp32 ones), and its
    ``lm_head`` its Q8_0 copy. Pass ``copied`` as the model's ``load_weights`` observer."""

    def __init__(self, model: nn.Module, max_rows: int, activations: torch.dtype | None = None) -> None:
        head = model.get_submodule("lm_head")
        assert isinstance(head, BucketedLinear)
        self.max_rows, self.activations, self.head = max_rows, activations, head
        # By identity: with tied embeddings the head's parameter loads under the embedding's name.
        self.head_name = next(name for name, param in model.named_parameters() if param is head.weight)
        self.projections = {
            f"{name}.weight": module
            for name, module in model.named_modules()
            if isinstance(module, BucketedLinear) and module is not head
        }
        self.staged: dict[str, tuple[torch.Tensor, int]] = {}  # a fused parameter's parts so far, and their rows

    def copied(self, name: str, first_row: int, tensor: torch.Tensor) -> None:
        """``tensor`` (as given) was copied into rows ``first_row``.. of parameter ``name``."""
        if name == self.head_name:
            head_copy = Int8Weight.of_q8_0(tensor, self.head.weight.dtype)
            if head_copy is not None:
                self.head.use_compact(head_copy, LM_HEAD_INT8_MAX_ROWS)
        projection = self.projections.get(name)
        if projection is None:
            return
        full = tensor
        if tensor.shape != projection.weight.shape:  # one part of a fused projection
            full, rows = self.staged.pop(name, (torch.empty(projection.weight.shape, dtype=tensor.dtype), 0))
            full[first_row : first_row + tensor.shape[0]].copy_(tensor)
            rows += tensor.shape[0]
            if rows < full.shape[0]:
                self.staged[name] = (full, rows)
                return
        if supports_int4(full):
            projection.use_compact(quantize_int4(full, self.activations or projection.weight.dtype), self.max_rows)
