"""The decoder layer's elementwise ops (engine/models/layer_ops.py), native and PyTorch, against Hugging Face's own
Llama modules: RMSNorm after the residual add, SiLU-and-multiply, rotary embedding of Q and K."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN
from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

from engine.models.layer_ops import TORCH_LAYER_OPS, LayerOps, NativeLayerOps, RotaryAngles
from kernels.native import load_native_kernels

HIDDEN, HEADS, KV_HEADS, HEAD_DIM, INTERMEDIATE = 576, 9, 3, 64, 1536
EPS = 1e-5
# Both paths compute in fp32 and round where the reference returns a tensor, so they differ from it only in fp32's
# last bits (summation order, exp): in fp32 by that, in bf16 and fp16 by a unit or two of the last place where such
# a difference crosses a rounding boundary, which few elements may do.
TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (0.0, 2**-6), torch.float16: (1e-2, 2e-3)}
MAX_ROUNDING_FLIPS = 1e-3  # of the elements, in bf16 and fp16
# 1 and 37 rows run on the calling thread; 300 rows are shared out among the threads.
ROWS = (1, 37, 300)
# The native bf16 kernels take 16 or 128 columns at a time: the second size of each leaves a remainder to the rest.
HIDDEN_SIZES, INTERMEDIATE_SIZES, HEAD_DIMS = (HIDDEN, 200), (INTERMEDIATE, 200), (HEAD_DIM, 40)


@pytest.fixture(scope="module", params=["native", "torch"])
def ops(request: pytest.FixtureRequest) -> LayerOps:
    return NativeLayerOps(load_native_kernels()) if request.param == "native" else TORCH_LAYER_OPS


def assert_matches(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    atol, rtol = TOLERANCES[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)
    if expected.dtype != torch.float32:
        assert (actual != expected).float().mean().item() <= MAX_ROUNDING_FLIPS


def hf_norm(dtype: torch.dtype, weight: torch.Tensor, hidden: int) -> LlamaRMSNorm:
    norm = LlamaRMSNorm(hidden, eps=EPS).to(dtype)
    norm.weight.data.copy_(weight)
    return norm


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("rows", ROWS)
def test_rms_norm_and_residual_add_match_hugging_face(
    ops: LayerOps, dtype: torch.dtype, rows: int, hidden: int
) -> None:
    generator = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, hidden, generator=generator) * 3).to(dtype)
    residual = torch.randn(rows, hidden, generator=generator).to(dtype)
    weight = torch.randn(hidden, generator=generator).to(dtype)
    reference = hf_norm(dtype, weight, hidden)
    with torch.inference_mode():
        assert_matches(ops.rms_norm(x, weight, EPS), reference(x))
        stream = residual.clone()
        normed = ops.rms_norm(x, weight, EPS, stream)
        added = residual + x  # the reference layer's residual add, in the activations' dtype
        assert torch.equal(stream, added)  # the residual stream now holds the sum
        assert_matches(normed, reference(added))


@pytest.mark.parametrize("width", INTERMEDIATE_SIZES)
@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("rows", ROWS)
def test_silu_and_mul_matches_hugging_face(ops: LayerOps, dtype: torch.dtype, rows: int, width: int) -> None:
    gate_up = (torch.randn(rows, 2 * width, generator=torch.Generator().manual_seed(rows)) * 4).to(dtype)
    gate, up = gate_up[:, :width], gate_up[:, width:]
    assert_matches(ops.silu_and_mul(gate_up), ACT2FN["silu"](gate) * up)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", TOLERANCES)
@pytest.mark.parametrize("rows", ROWS)
def test_rotary_of_q_and_k_matches_hugging_face(ops: LayerOps, dtype: torch.dtype, rows: int, head_dim: int) -> None:
    generator = torch.Generator().manual_seed(rows)
    width = (HEADS + 2 * KV_HEADS) * head_dim
    qkv = torch.randn(rows, width, generator=generator).to(dtype)
    angles = torch.rand(rows, head_dim // 2, generator=generator) * 100
    angles = torch.cat((angles, angles), dim=-1)  # rotate-half layout, as the rotary tables are
    cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    q, k = ops.rotary_qk(qkv, HEADS, KV_HEADS, RotaryAngles(cos, sin))
    q_in = qkv[:, : HEADS * head_dim].reshape(rows, HEADS, head_dim)
    k_in = qkv[:, HEADS * head_dim : (HEADS + KV_HEADS) * head_dim].reshape(rows, KV_HEADS, head_dim)
    q_expected, k_expected = apply_rotary_pos_emb(q_in, k_in, cos, sin, unsqueeze_dim=1)
    assert_matches(q, q_expected)
    assert_matches(k, k_expected)


def test_native_ops_refuse_what_they_cannot_read() -> None:
    kernels = load_native_kernels()
    x = torch.randn(4, HIDDEN)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
        kernels.rms_norm(x.t().contiguous().t(), torch.ones(HIDDEN), EPS)
    with pytest.raises(ValueError, match="contiguous CPU tensors of one dtype"):
        kernels.rms_norm(x, torch.ones(HIDDEN, dtype=torch.bfloat16), EPS)
    with pytest.raises(ValueError, match="take"):
        kernels.silu_and_mul(torch.ones(4, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="a weight \\[hidden\\]"):
        kernels.rms_norm(x, torch.ones(HIDDEN - 1), EPS)
    with pytest.raises(ValueError, match="a residual shaped like x"):
        kernels.rms_norm(x, torch.ones(HIDDEN), EPS, torch.zeros(3, HIDDEN))
    tables = torch.zeros(3, HEAD_DIM)  # one row short of the source's
    with pytest.raises(ValueError, match="one row of contiguous head vectors per table row"):
        kernels.rotary_qk(torch.zeros(4, (HEADS + 2 * KV_HEADS) * HEAD_DIM), HEADS, KV_HEADS, tables, tables)
