"""4-bit weight copies: exact for GGUF Q4_1 weights, bounded error otherwise, used only for small steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize
from torch.nn import functional as F

from engine.config import ModelConfig
from engine.errors import ConfigError
from engine.loader import open_model
from engine.models.bucketed_linear import BucketedLinear, CompactWeight
from engine.models.int4_weights import (
    GROUP_SIZE,
    GroupLevels,
    NativeInt4Weight,
    TorchInt4Weight,
    quantize_int4,
)
from engine.models.quantize import (
    AMX_INT4_MAX_ROWS,
    F32_INT4_MAX_ROWS,
    TORCH_INT4_MAX_ROWS,
    VECTOR_INT4_MAX_ROWS,
    int4_rows_for,
)
from kernels.native import native_quantized_kernels


def dequantized_through_the_kernel(weight: CompactWeight, in_features: int, dtype: torch.dtype) -> torch.Tensor:
    return weight.matmul(torch.eye(in_features, dtype=dtype)).T


def test_q4_1_weights_of_the_default_model_are_reproduced_exactly(model_path) -> None:
    """In fp32 through PyTorch's kernel and the native fp32 kernel, the file's values as gguf dequantizes them; in
    bf16 through the native kernel (on the AMX tiles and on the vector units, where this CPU has them), those values
    rounded to bf16: the dense bf16 weights, bit for bit."""
    reader = GGUFReader(model_path)
    tensors = [t for t in reader.tensors if t.tensor_type == GGMLQuantizationType.Q4_1]
    assert len(tensors) == 30 * 7
    f32_kernels = native_quantized_kernels(torch.float32)
    assert f32_kernels is not None  # the fp32 kernel builds for every CPU profile
    kernels = native_quantized_kernels(torch.bfloat16)
    for tensor in tensors[:: len(tensors) // 12]:  # every projection kind, across the layers
        reference = torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))
        levels = GroupLevels.of(reference)
        copy = TorchInt4Weight.pack(levels, torch.float32)
        assert torch.equal(dequantized_through_the_kernel(copy, reference.shape[1], torch.float32), reference)
        f32_copy = NativeInt4Weight.pack(f32_kernels, levels, torch.float32)
        assert f32_copy is not None
        assert torch.equal(dequantized_through_the_kernel(f32_copy, reference.shape[1], torch.float32), reference)
        if kernels is None:
            continue
        native = NativeInt4Weight.pack(kernels, levels, torch.bfloat16)
        identity = torch.eye(reference.shape[1], dtype=torch.bfloat16)
        for use_tiles in (True, False) if kernels.has_amx else (False,):
            through_kernel = kernels.linear_int4(identity, native.packed, reference.shape[0], use_tiles).T
            assert torch.equal(through_kernel, reference.to(torch.bfloat16)), (tensor.name, use_tiles)


def test_other_weights_are_within_half_a_level() -> None:
    weight = torch.randn(96, 4 * GROUP_SIZE, generator=torch.Generator().manual_seed(0))
    copy = TorchInt4Weight.pack(GroupLevels.of(weight), torch.float32)
    groups = weight.reshape(96, -1, GROUP_SIZE)
    half_level = ((groups.amax(-1) - groups.amin(-1)) / 15 / 2).repeat_interleave(GROUP_SIZE, dim=1)
    error = (dequantized_through_the_kernel(copy, weight.shape[1], torch.float32) - weight).abs()
    assert (error <= half_level * 1.0001 + 1e-6).all()
    assert error.max() > 0  # random weights are not 4-bit: the bound is not trivially met


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_small_steps_use_the_copy_and_larger_ones_the_dense_weight(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(1)
    layer = BucketedLinear(2 * GROUP_SIZE, 48, bias=False, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(48, 2 * GROUP_SIZE, generator=generator))
    copy = quantize_int4(layer.weight.float(), dtype)
    layer.use_compact(copy, max_rows=4)
    exact = TorchInt4Weight.pack(GroupLevels.of(layer.weight.float()), torch.float32)
    dequantized = dequantized_through_the_kernel(exact, 64, torch.float32)
    with torch.no_grad():
        for rows in (1, 4, 5, 9):
            x = torch.randn(rows, 2 * GROUP_SIZE, generator=generator).to(dtype)
            expected_weight = dequantized if rows <= 4 else layer.weight.float()
            expected = F.linear(x.float(), expected_weight)
            tolerance = 1e-5 if dtype == torch.float32 else 0.03 * expected.abs().max().item()
            torch.testing.assert_close(layer(x).float(), expected, atol=tolerance, rtol=0)
    # The copy differs from the dense weight, so the two paths are told apart above.
    assert not torch.allclose(dequantized, layer.weight.float(), atol=1e-3)


def test_auto_turns_the_copies_on_for_q4_1_projections_where_a_native_kernel_takes_them(model_path) -> None:
    assert open_model(model_path).linear_weights_are_q4_1
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    # By default, as many rows as the copies' kernel on this machine wins at.
    native = native_quantized_kernels(torch.bfloat16)
    expected = TORCH_INT4_MAX_ROWS if native is None else AMX_INT4_MAX_ROWS if native.has_amx else VECTOR_INT4_MAX_ROWS
    assert int4_rows_for(ModelConfig(dtype="bfloat16"), True, cpu) == (expected if native else 0)
    assert int4_rows_for(ModelConfig(dtype="float32"), True, cpu) == F32_INT4_MAX_ROWS
    assert int4_rows_for(ModelConfig(dtype="float16"), True, cpu) == 0
    assert int4_rows_for(ModelConfig(), weights_are_q4_1=False, device=cpu) == 0
    assert int4_rows_for(ModelConfig(), weights_are_q4_1=True, device=cuda) == 0
    assert int4_rows_for(ModelConfig(dtype="bfloat16", weight_quantization="int4"), True, cpu) == expected
    assert int4_rows_for(ModelConfig(weight_quantization="none"), True, cpu) == 0
    assert int4_rows_for(ModelConfig(weight_quantization="int4", int4_max_rows=8), False, cpu) == 8
    with pytest.raises(ConfigError, match="CPU only"):
        int4_rows_for(ModelConfig(weight_quantization="int4"), True, cuda)


@pytest.mark.parametrize(
    ("fields", "message"),
    [({"weight_quantization": "int3"}, "weight_quantization must be one of"), ({"int4_max_rows": 0}, ">= 1")],
)
def test_bad_settings_are_refused(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelConfig(**fields)
