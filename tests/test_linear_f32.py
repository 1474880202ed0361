"""The native 4- and 8-bit linear kernels with fp32 activations (kernels/csrc/cpu_linear_f32.cpp), which every CPU
profile builds, against float64 products of the weights a GGUF reader dequantizes."""

from __future__ import annotations

import pytest
import torch

from engine.models.int4_weights import GroupLevels
from kernels.native import NativeKernels, load_native_kernels

# Row counts around the kernel's chunks of rows (4 or 8 per pass) and out/in sizes of one block and of real layers.
ROWS = pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 40])
SHAPES = pytest.mark.parametrize(("out_features", "in_features"), [(32, 32), (960, 576), (576, 1536)])


@pytest.fixture(scope="module")
def kernels() -> NativeKernels:
    return load_native_kernels()


def _assert_fp32_product(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Within what fp32 summation in any order may differ by: 2^-20 of the sum of the terms' magnitudes (K <= 1536
    terms, each sum rounded at most once per term at 2^-24 relative)."""
    reference = x.double() @ weight.double().T
    magnitudes = x.double().abs() @ weight.double().abs().T
    assert out.dtype == torch.float32 and out.shape == reference.shape
    assert ((out.double() - reference).abs() <= magnitudes * 2.0**-20).all()


@ROWS
@SHAPES
def test_the_4_bit_kernel_multiplies_by_level_times_scale_plus_minimum(
    kernels: NativeKernels, rows: int, out_features: int, in_features: int
) -> None:
    generator = torch.Generator().manual_seed(rows + out_features)
    levels = GroupLevels.of(torch.randn(out_features, in_features, generator=generator))
    scales, minimums = levels.scale.half(), levels.low.half()
    groups = levels.levels.float().reshape(out_features, -1, 32)
    dequantized = (groups * scales.float()[..., None] + minimums.float()[..., None]).reshape(out_features, in_features)
    packed = kernels.pack_int4(levels.levels.to(torch.uint8), scales, minimums, torch.float32)
    assert packed.numel() * 2 == out_features * in_features * 5 // 4  # 4 bits a weight, 32 bits of scales per 32
    x = torch.randn(rows, in_features, generator=generator)
    _assert_fp32_product(kernels.linear_int4(x, packed, out_features), x, dequantized)
    # The identity gives back each weight exactly: the kernel computes with the dequantized values themselves.
    identity = torch.eye(in_features)
    assert torch.equal(kernels.linear_int4(identity, packed, out_features).T, dequantized)


@ROWS
@SHAPES
def test_the_8_bit_kernel_multiplies_by_value_times_scale(
    kernels: NativeKernels, rows: int, out_features: int, in_features: int
) -> None:
    generator = torch.Generator().manual_seed(rows * in_features)
    values = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales = (torch.rand(out_features, in_features // 32, generator=generator) * 0.02).half()
    dequantized = (values.float().reshape(out_features, -1, 32) * scales.float()[..., None]).reshape(values.shape)
    packed = kernels.pack_int8(values, scales, torch.float32)
    assert packed.numel() == values.numel() * 17 // 16  # 8 bits a weight, and 16 bits of scale per 32
    x = torch.randn(rows, in_features, generator=generator)
    _assert_fp32_product(kernels.linear_int8(x, packed, out_features), x, dequantized)
    assert torch.equal(kernels.linear_int8(torch.eye(in_features), packed, out_features).T, dequantized)


def test_the_fp32_kernels_refuse_what_they_cannot_read(kernels: NativeKernels) -> None:
    scales = torch.ones(64, 2, dtype=torch.float16)
    packed = kernels.pack_int4(torch.zeros(64, 64, dtype=torch.uint8), scales, scales, torch.float32)
    with pytest.raises(ValueError, match="is not"):
        kernels.linear_int4(torch.zeros(3, 64), packed, 96)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.linear_int4(torch.zeros(64, 3).t(), packed, 64)
    with pytest.raises(ValueError, match=r"no 4-bit linear kernel for torch\.float16"):
        kernels.linear_int4(torch.zeros(3, 64, dtype=torch.float16), packed, 64)
    with pytest.raises(ValueError, match="multiples of 32"):
        kernels.pack_int8(torch.zeros(48, 64, dtype=torch.int8), scales[:48], torch.float32)
