"""The 4-bit linear kernel with int8-quantized activations (kernels/csrc/cpu_linear_q8.cpp), which every CPU profile
builds, against its arithmetic written out in float64: activations quantized per group of 32 channels to
round(x / d), d = max|x| / 127, the levels' integer dot products times scale * d, plus minimum times the exact sum of
the group's activations."""

from __future__ import annotations

import pytest
import torch

from engine.models.int4_weights import GroupLevels
from kernels.native import INT8_ACTIVATIONS, NativeKernels, load_native_kernels

ROWS = pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8, 9, 17, 40])
SHAPES = pytest.mark.parametrize(("out_features", "in_features"), [(32, 32), (960, 576), (576, 1536)])


@pytest.fixture(scope="module")
def kernels() -> NativeKernels:
    return load_native_kernels()


def _packed_layer(
    kernels: NativeKernels, out_features: int, in_features: int, generator: torch.Generator
) -> tuple[torch.Tensor, GroupLevels, torch.Tensor, torch.Tensor]:
    levels = GroupLevels.of(torch.randn(out_features, in_features, generator=generator))
    scales, minimums = levels.scale.half(), levels.low.half()
    packed = kernels.pack_int4(levels.levels.to(torch.uint8), scales, minimums, INT8_ACTIVATIONS)
    return packed, levels, scales.double(), minimums.double()


def _quantized_product(
    x: torch.Tensor, levels: torch.Tensor, scales: torch.Tensor, minimums: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The product, and the magnitude its fp32 evaluation may be off by (a few roundings of each group's terms)."""
    rows, in_features = x.shape
    groups = x.reshape(rows, in_features // 32, 32)
    d = groups.abs().amax(dim=-1) / 127  # in fp32, as the kernel computes it, and so is its inverse
    inverse = torch.where(d > 0, 1 / torch.where(d > 0, d, 1), 0)
    q = torch.round(groups * inverse[..., None]).double()  # half to even, as nearbyint
    level_groups = levels.double().reshape(levels.shape[0], in_features // 32, 32)
    dots = torch.einsum("rgj,ngj->rng", q, level_groups)  # exact integers
    sums = groups.double().sum(-1)
    terms = dots * scales[None] * d.double()[:, None, :] + minimums[None] * sums[:, None, :]
    magnitudes = dots.abs() * scales[None] * d.double()[:, None, :]
    magnitudes += minimums.abs()[None] * groups.abs().double().sum(-1)[:, None, :] * 32
    return terms.sum(-1), magnitudes.sum(-1) * 2.0**-20


@ROWS
@SHAPES
def test_the_kernel_computes_the_quantized_product(
    kernels: NativeKernels, rows: int, out_features: int, in_features: int
) -> None:
    generator = torch.Generator().manual_seed(rows + out_features)
    packed, levels, scales, minimums = _packed_layer(kernels, out_features, in_features, generator)
    assert packed.numel() * 2 == out_features * in_features * 5 // 4  # the fp32 kernel's size: 4 bits a weight + scales
    x = torch.randn(rows, in_features, generator=generator)
    out = kernels.linear_int4(x, packed, out_features, activations=INT8_ACTIVATIONS)
    reference, tolerance = _quantized_product(x, levels.levels, scales, minimums)
    assert out.dtype == torch.float32
    assert ((out.double() - reference).abs() <= tolerance).all()


def test_activations_on_the_int8_grid_give_the_exact_product(kernels: NativeKernels) -> None:
    """Integers up to 127 with 127 in every group are their own quantization: the result is x @ W.T in fp32."""
    generator = torch.Generator().manual_seed(7)
    packed, levels, scales, minimums = _packed_layer(kernels, 64, 96, generator)
    x = torch.randint(-127, 128, (3, 96), generator=generator).float()
    x[:, ::32] = 127.0
    groups = levels.levels.double().reshape(64, 3, 32)
    weight = (groups * scales[..., None] + minimums[..., None]).reshape(64, 96)
    out = kernels.linear_int4(x, packed, 64, activations=INT8_ACTIVATIONS)
    reference = x.double() @ weight.T
    assert ((out.double() - reference).abs() <= (x.double().abs() @ weight.abs().T) * 2.0**-20).all()


def test_the_quantization_error_is_bounded_by_half_a_step_per_activation(kernels: NativeKernels) -> None:
    """Against the exact fp32 product, each activation is off by at most d / 2 (its group's step), times the
    weight it multiplies."""
    generator = torch.Generator().manual_seed(11)
    packed, levels, scales, minimums = _packed_layer(kernels, 576, 1536, generator)
    x = torch.randn(4, 1536, generator=generator)
    groups = levels.levels.double().reshape(576, -1, 32)
    weight = (groups * scales[..., None] + minimums[..., None]).reshape(576, 1536)
    out = kernels.linear_int4(x, packed, 576, activations=INT8_ACTIVATIONS).double()
    exact = x.double() @ weight.T
    step = (x.abs().reshape(4, -1, 32).amax(-1) / 127).double().repeat_interleave(32, dim=1)
    bound = (step / 2) @ weight.abs().T * (1 + 1e-3)
    error = (out - exact).abs()
    assert (error <= bound).all()
    assert error.max() > 0  # the kernel really quantizes (the exact kernel would be within fp32 rounding)


def test_the_int8_activation_kernel_takes_fp32_only(kernels: NativeKernels) -> None:
    scales = torch.ones(64, 2, dtype=torch.float16)
    packed = kernels.pack_int4(torch.zeros(64, 64, dtype=torch.uint8), scales, scales, INT8_ACTIVATIONS)
    with pytest.raises(ValueError, match="take fp32 activations"):
        kernels.linear_int4(torch.zeros(3, 64, dtype=torch.bfloat16), packed, 64, activations=INT8_ACTIVATIONS)
    with pytest.raises(ValueError, match="cannot multiply"):
        kernels.linear_int4(torch.zeros(3, 64), packed, 64, activations=torch.bfloat16)
