"""8-bit copies of Q8_0 weights: exact for the default model's LM head, refused for anything else."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize

from engine.loader import open_model
from engine.models import build_model
from engine.models.int8_weights import GROUP_SIZE, LM_HEAD_INT8_MAX_ROWS, Int8Weight
from kernels.native import native_quantized_kernels

HAS_BF16_KERNEL = native_quantized_kernels(torch.bfloat16) is not None
ACTIVATIONS = pytest.mark.parametrize(
    "dtype",
    [
        torch.float32,
        pytest.param(
            torch.bfloat16, marks=pytest.mark.skipif(not HAS_BF16_KERNEL, reason="this CPU has no AVX512-BF16")
        ),
    ],
    ids=["fp32", "bf16"],
)


@ACTIVATIONS
def test_the_q8_0_embedding_of_the_default_model_is_reproduced_exactly(model_path, dtype: torch.dtype) -> None:
    """Through the kernel, the identity matrix gives back the file's Q8_0 values as gguf dequantizes them (in bf16:
    rounded to bf16, the dense bf16 weights), bit for bit, in slices of the vocabulary across the table."""
    (tensor,) = [t for t in GGUFReader(model_path).tensors if t.name == "token_embd.weight"]
    assert tensor.tensor_type == GGMLQuantizationType.Q8_0
    table = _token_embedding(model_path)
    identity = torch.eye(table.shape[1], dtype=dtype)
    for start in range(0, table.shape[0], table.shape[0] // 4):
        rows = table[start : start + 1024]
        copy = Int8Weight.of_q8_0(rows, dtype)
        assert copy is not None
        assert torch.equal(copy.matmul(identity).T, rows.to(dtype)), start


@ACTIVATIONS
def test_weights_that_are_not_q8_0_get_no_copy(dtype: torch.dtype) -> None:
    generator = torch.Generator().manual_seed(0)
    scales = (torch.rand(64, 2, 1, generator=generator) * 0.01).half().float()
    values = torch.randint(-127, 128, (64, 2, GROUP_SIZE), generator=generator).float()
    values[:, :, 0] = 127  # Q8_0's quantizer gives each group's largest magnitude the value 127
    q8_0 = (values * scales).reshape(64, 2 * GROUP_SIZE)
    assert Int8Weight.of_q8_0(q8_0, dtype) is not None
    assert Int8Weight.of_q8_0(torch.zeros(64, 64), dtype) is not None  # all-zero groups: zero scales
    assert Int8Weight.of_q8_0(q8_0 + 1e-4, dtype) is None  # no longer value * scale
    assert Int8Weight.of_q8_0(torch.randn(64, 64, generator=generator), dtype) is None
    assert Int8Weight.of_q8_0(q8_0[:48], dtype) is None  # 48 outputs: not a multiple of the kernel's block


@pytest.mark.skipif(not HAS_BF16_KERNEL, reason="this CPU has no AVX512-BF16")
def test_the_default_model_in_bf16_samples_small_steps_through_the_8_bit_head(model_path) -> None:
    model = build_model(open_model(model_path), torch.bfloat16, torch.device("cpu"), False, int4_max_rows=16)
    head = model.lm_head
    assert isinstance(head.compact, Int8Weight) and head.compact_max_rows == LM_HEAD_INT8_MAX_ROWS
    generator = torch.Generator().manual_seed(1)
    hidden = torch.randn(LM_HEAD_INT8_MAX_ROWS, head.in_features, generator=generator).to(torch.bfloat16)
    table = _token_embedding(model_path)
    exact, magnitudes = hidden.float() @ table.T, hidden.float().abs() @ table.abs().T
    # The file's exact weights: the fp32 product rounded once (plus what another summation order may differ by),
    # which the dense bf16 weights, each rounded, do not give.
    small = head(hidden).float()
    assert ((small - exact).abs() <= exact.abs() * 2.0**-8 + magnitudes * 2.0**-20).all()
    assert not torch.equal(small, torch.nn.functional.linear(hidden, head.weight).float())


def _token_embedding(model_path) -> torch.Tensor:
    (tensor,) = [t for t in GGUFReader(model_path).tensors if t.name == "token_embd.weight"]
    return torch.from_numpy(np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32))


def test_the_default_model_in_fp32_samples_small_steps_through_the_file_s_exact_head(model_path) -> None:
    """In fp32 the 8-bit copy holds the very weights the dense fp32 head holds: the products agree to fp32
    summation order, and the copy is what computes (it reads a quarter of the bytes)."""
    model = build_model(open_model(model_path), torch.float32, torch.device("cpu"), False, int4_max_rows=16)
    head = model.lm_head
    assert isinstance(head.compact, Int8Weight) and head.compact_max_rows == LM_HEAD_INT8_MAX_ROWS
    hidden = torch.randn(LM_HEAD_INT8_MAX_ROWS, head.in_features, generator=torch.Generator().manual_seed(2))
    table = _token_embedding(model_path)
    exact = (hidden.double() @ table.double().T).float()
    magnitudes = hidden.abs() @ table.abs().T
    assert ((head(hidden) - exact).abs() <= magnitudes * 2.0**-17).all()
