"""BucketedLinear: rows padded to a bounded set of sizes, outputs those of a plain linear layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine.models.bucketed_linear import BucketedLinear
from kernels.cpu_profile import cpu_flags, cpu_profile, profile_for
from kernels.shape_buckets import bucket_rows


def test_buckets_are_few_cover_every_row_count_and_pad_little() -> None:
    buckets = {bucket_rows(rows) for rows in range(1, 2049)}
    assert len(buckets) <= 56
    for rows in range(1, 4097):
        padded = bucket_rows(rows)
        assert padded >= rows and bucket_rows(padded) == padded  # a bucket is its own bucket
        assert padded - rows < (8 if rows <= 64 else rows / 8)
    assert bucket_rows(2048) == 2048 and bucket_rows(1) == 1  # full-budget steps and single decodes: no padding


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("rows", [1, 3, 13, 33, 70, 300])
def test_outputs_match_a_plain_linear_layer(dtype: torch.dtype, rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    layer = BucketedLinear(64, 96, bias=True, dtype=dtype)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(96, 64, generator=generator))
        layer.bias.copy_(torch.randn(96, generator=generator))
        x = torch.randn(rows, 64, generator=generator).to(dtype)
        out = layer(x)
        # Row by row: the reference never sees a padded shape.
        expected = torch.cat(
            [F.linear(x[i : i + 1].float(), layer.weight.float(), layer.bias.float()) for i in range(rows)]
        )
    assert out.shape == (rows, 96) and out.dtype == dtype and out.is_contiguous()
    tolerance = 0.0 if dtype == torch.float32 else 0.05
    torch.testing.assert_close(out.float(), expected, atol=tolerance * expected.abs().max().item() + 1e-4, rtol=0)


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")
@pytest.mark.skipif(not cpu_profile().onednn_packs_bf16, reason="oneDNN packs no bf16 weights on this CPU profile")
@pytest.mark.parametrize("rows", [1, 3, 13, 33, 70, 300])
def test_the_onednn_packed_copy_gives_the_plain_layers_results(rows: int) -> None:
    """Bit for bit where the CPU has bf16 dot products (both paths run the same oneDNN kernel there); elsewhere the
    packed and plain paths take different kernels whose fp32 sums differ in order, so the bf16 outputs may differ by
    one rounding."""
    generator = torch.Generator().manual_seed(rows)
    layer = BucketedLinear(576, 960, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(960, 576, generator=generator))
    x = torch.randn(rows, 576, generator=generator).to(torch.bfloat16)

    def assert_same(actual: torch.Tensor, expected: torch.Tensor) -> None:
        if cpu_profile().has_native_bf16:
            assert torch.equal(actual, expected)
        else:
            torch.testing.assert_close(actual.float(), expected.float(), rtol=2.0**-7, atol=1e-2)

    plain = layer(x)
    layer.pack(use_amx=False)
    assert layer.packed is not None
    assert_same(layer(x), plain)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert_same(layer(x), plain)  # the packed copy is what computes, until packed again
    assert not torch.allclose(F.linear(x, layer.weight).float(), plain.float())
    layer.pack(use_amx=False)
    assert_same(layer(x), F.linear(x, layer.weight))


def test_no_onednn_packing_where_the_profile_lacks_avx512bw(monkeypatch: pytest.MonkeyPatch) -> None:
    """PyTorch's bf16 prepacking raises on a CPU without AVX-512BW/VL/DQ (AMD Zen 2/3, most laptops): the layer asks
    the CPU probe first and serves from the plain weight instead."""
    avx2 = profile_for("avx2", "x86_64", cpu_flags("flags: avx avx2 fma f16c avx512f avx512bw avx512vl avx512dq"))
    assert not avx2.onednn_packs_bf16
    monkeypatch.setattr("engine.models.bucketed_linear.cpu_profile", lambda: avx2)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", _refuse_like_pytorch_without_avx512bw)
    layer = BucketedLinear(64, 96, bias=False, dtype=torch.bfloat16)
    layer.pack(use_amx=False)
    assert layer.packed is None and layer.amx is None
    x = torch.randn(3, 64).to(torch.bfloat16)
    assert torch.equal(layer(x), F.linear(x, layer.weight))


def _refuse_like_pytorch_without_avx512bw(*args: object) -> torch.Tensor:
    raise RuntimeError("mkldnn_reorder_linear_weight: bf16 path needs the cpu support avx_ne_convert or avx512bw")
