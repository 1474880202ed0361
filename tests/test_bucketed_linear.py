"""BucketedLinear: rows padded to a bounded set of sizes, outputs those of a plain linear layer."""

from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F

from engine.models.bucketed_linear import BucketedLinear
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
@pytest.mark.parametrize("rows", [1, 3, 13, 33, 70, 300])
def test_the_onednn_packed_copy_gives_the_plain_layers_results_bit_for_bit(rows: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    layer = BucketedLinear(576, 960, bias=False, dtype=torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(960, 576, generator=generator))
    x = torch.randn(rows, 576, generator=generator).to(torch.bfloat16)
    plain = layer(x)
    layer.pack(use_amx=False)
    assert torch.equal(layer(x), plain)
    with torch.no_grad():
        layer.weight.mul_(2)
    assert torch.equal(layer(x), plain)  # the packed copy is what computes, until packed again
    layer.pack(use_amx=False)
    assert torch.equal(layer(x), F.linear(x, layer.weight))
