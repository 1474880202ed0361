"""The native linear kernels (AMX bf16; 4-bit on AMX tiles or on the vector units) against fp32 matmuls of the same
values, and their place in BucketedLinear."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine.models.amx_weights import AmxWeight
from engine.models.bucketed_linear import BucketedLinear
from engine.models.int4_weights import GroupLevels, NativeInt4Weight, TorchInt4Weight, quantize_int4
from kernels.native import NativeKernelsUnavailable, load_native_kernels


def _amx_kernels():
    kernels = _native_kernels()
    if not kernels.has_amx:
        pytest.skip("this CPU has no AMX-BF16")
    return kernels


def _quantized_kernels(use_tiles: bool):
    """The native kernels, for the 4-bit kernel on the AMX tiles or the 4- and 8-bit ones on the vector units (skips
    where not built)."""
    kernels = _amx_kernels() if use_tiles else _native_kernels()
    if torch.bfloat16 not in kernels.quantized_linear_dtypes:
        pytest.skip("this CPU has no AVX512-BF16")
    return kernels


def _native_kernels():
    try:
        return load_native_kernels()
    except NativeKernelsUnavailable as exc:
        pytest.skip(f"native kernels unavailable: {exc}")


INT4_KERNELS = pytest.mark.parametrize("use_tiles", [True, False], ids=["tiles", "vectors"])


def _bf16(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(torch.bfloat16)


def _assert_rounded_reference(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
    """Each output is the fp32 product rounded to bf16: within one bf16 step of it, plus what fp32 summation in
    another order may differ by (a generous 2^-20 of the sum of the terms' magnitudes)."""
    reference = F.linear(x.float(), weight.float())
    assert out.dtype == torch.bfloat16 and out.shape == reference.shape
    summation = F.linear(x.float().abs(), weight.float().abs()) * 2.0**-20
    assert ((out.float() - reference).abs() <= reference.abs() * 2.0**-7 + summation).all()
    assert (out == reference.to(torch.bfloat16)).float().mean() > 0.99


# Row counts: one tile row, a partial and a full 16-row tile, one and more 32-row blocks with and without a tail,
# and (700 rows of 1536 channels) passes of rows whose x fits in L2.
@pytest.mark.parametrize("rows", [1, 7, 16, 17, 32, 33, 50, 64, 161, 700])
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536), (64, 32)])
def test_amx_linear_gives_the_rounded_fp32_product(rows: int, out_features: int, in_features: int) -> None:
    kernels = _amx_kernels()
    generator = torch.Generator().manual_seed(rows * out_features)
    weight, x = _bf16((out_features, in_features), generator), _bf16((rows, in_features), generator)
    out = kernels.amx_linear(x, kernels.pack_amx_weight(weight), out_features)
    _assert_rounded_reference(out, x, weight)


@pytest.mark.parametrize("threads", [1, 2])
def test_amx_linear_is_the_same_on_any_number_of_threads(threads: int) -> None:
    kernels = _amx_kernels()
    generator = torch.Generator().manual_seed(threads)
    weight, x = _bf16((3072, 576), generator), _bf16((40, 576), generator)
    packed = kernels.pack_amx_weight(weight)
    previous = torch.get_num_threads()
    try:
        torch.set_num_threads(threads)
        out = kernels.amx_linear(x, packed, 3072)
    finally:
        torch.set_num_threads(previous)
    _assert_rounded_reference(out, x, weight)
    assert torch.equal(out, kernels.amx_linear(x, packed, 3072))  # each output's sum has one order


@INT4_KERNELS
@pytest.mark.parametrize("rows", [1, 3, 16, 32, 45, 161])
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536)])
def test_the_4_bit_kernel_multiplies_by_its_levels_times_scales_plus_minimums(
    rows: int, out_features: int, in_features: int, use_tiles: bool
) -> None:
    kernels = _quantized_kernels(use_tiles)
    generator = torch.Generator().manual_seed(rows + out_features)
    weight = torch.randn(out_features, in_features, generator=generator)
    levels = GroupLevels.of(weight)
    scales, minimums = levels.scale.half(), levels.low.half()
    # The weight the kernel computes with: each level times its group's fp16 scale plus its fp16 minimum, in fp32
    # (never rounded to bf16).
    groups = levels.levels.float().reshape(out_features, -1, 32)
    dequantized = (groups * scales.float()[..., None] + minimums.float()[..., None]).reshape(weight.shape)
    packed = kernels.pack_int4(levels.levels.to(torch.uint8), scales, minimums, torch.bfloat16)
    assert packed.numel() * 2 == weight.numel() * 5 // 4  # 4 bits a weight, and 32 bits of scales per 32
    x = _bf16((rows, in_features), generator)
    _assert_rounded_reference(kernels.linear_int4(x, packed, out_features, use_tiles), x, dequantized)


def test_bf16_4_bit_copies_use_the_native_kernel_where_the_shape_allows() -> None:
    _quantized_kernels(use_tiles=False)
    weight = torch.randn(96, 64, generator=torch.Generator().manual_seed(3))
    for dtype in (torch.bfloat16, torch.float32):
        copy = quantize_int4(weight, dtype)
        assert isinstance(copy, NativeInt4Weight) and copy.activations == dtype
        assert isinstance(quantize_int4(weight[:48], dtype), TorchInt4Weight)  # 48 outputs: not a multiple of 32


def test_amx_linear_refuses_what_it_cannot_read() -> None:
    kernels = _amx_kernels()
    weight = torch.zeros(64, 64, dtype=torch.bfloat16)
    packed = kernels.pack_amx_weight(weight)
    with pytest.raises(ValueError, match="multiples of 32"):
        kernels.pack_amx_weight(torch.zeros(48, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="is not"):
        kernels.amx_linear(torch.zeros(3, 64, dtype=torch.bfloat16), packed, 96)
    with pytest.raises(ValueError, match=r"no AMX linear kernel for torch\.float32"):
        kernels.amx_linear(torch.zeros(3, 64), packed.float(), 64)
    with pytest.raises(ValueError, match="contiguous"):
        kernels.amx_linear(torch.zeros(64, 3, dtype=torch.bfloat16).t(), packed, 64)
    with pytest.raises(ValueError, match="is not"):
        kernels.linear_int4(torch.zeros(3, 64, dtype=torch.bfloat16), packed, 64)  # a bf16 packing
    scales = torch.ones(64, 2, dtype=torch.float16)
    with pytest.raises(ValueError, match="uint8 levels"):
        kernels.pack_int4(torch.zeros(64, 64, dtype=torch.int32), scales, scales, torch.bfloat16)
    with pytest.raises(ValueError, match="fp16"):
        kernels.pack_int4(torch.zeros(64, 64, dtype=torch.uint8), scales.float(), scales.float(), torch.bfloat16)


def test_a_bf16_layer_computes_with_the_amx_copy_and_falls_back_where_it_cannot() -> None:
    _amx_kernels()
    generator = torch.Generator().manual_seed(0)
    layer = BucketedLinear(576, 960, bias=True, dtype=torch.bfloat16)
    odd = BucketedLinear(576, 100, bias=False, dtype=torch.bfloat16)  # 100 outputs: not a multiple of 32
    with torch.no_grad():
        layer.weight.copy_(_bf16((960, 576), generator))
        layer.bias.copy_(_bf16((960,), generator))
        odd.weight.copy_(_bf16((100, 576), generator))
    layer.pack()
    odd.pack()
    assert isinstance(layer.amx, AmxWeight) and layer.packed is None
    assert odd.amx is None and odd.packed is not None  # oneDNN's copy serves it
    x = _bf16((21, 576), generator)
    with torch.no_grad():
        without_bias = layer.amx.matmul(x)
        _assert_rounded_reference(without_bias, x, layer.weight)
        assert torch.equal(layer(x), without_bias + layer.bias)
        assert torch.equal(layer(x[:, None, :]), F.linear(x[:, None, :], layer.weight, layer.bias))  # 3-d: plain
        torch.testing.assert_close(odd(x), F.linear(x, odd.weight))
    layer.pack(use_amx=False)
    assert layer.amx is None and layer.packed is not None


@pytest.mark.parametrize("rows", [1, 5, 16, 17, 40])
@pytest.mark.parametrize(("out_features", "in_features"), [(960, 576), (576, 1536)])
def test_the_8_bit_kernel_multiplies_by_its_values_times_scales(rows: int, out_features: int, in_features: int) -> None:
    kernels = _quantized_kernels(use_tiles=False)
    generator = torch.Generator().manual_seed(rows * in_features)
    values = torch.randint(-127, 128, (out_features, in_features), generator=generator, dtype=torch.int8)
    scales = (torch.rand(out_features, in_features // 32, generator=generator) * 0.02).half()
    # The weight the kernel computes with: each value times its group's fp16 scale, in fp32.
    dequantized = (values.float().reshape(out_features, -1, 32) * scales.float()[..., None]).reshape(values.shape)
    packed = kernels.pack_int8(values, scales, torch.bfloat16)
    assert packed.numel() == values.numel() * 17 // 16  # 8 bits a weight, and 16 bits of scale per 32
    x = _bf16((rows, in_features), generator)
    _assert_rounded_reference(kernels.linear_int8(x, packed, out_features), x, dequantized)
