"""The Triton attention backend as the engine uses it: against the CPU backend on identical inputs, through a whole
engine run, and compiled for a real CUDA architecture ahead of time (no GPU needed)."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
import torch

from engine.config import build_config
from engine.llm_engine import LLMEngine
from engine.loader import open_model
from engine.sampling_params import SamplingParams
from kernels.backend import BatchLayout
from kernels.cpu_attention import CpuAttentionBackend
from kernels.native import load_native_kernels
from kernels.registry import get_attention_backend
from kernels.triton_backend import TritonAttentionBackend
from kernels.xformers_backend import XFormersAttentionBackend
from tests.attention_reference import make_case, mixed_batch, reference_attention, reference_write

CPU = torch.device("cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("block_size", [16, 32])
def test_triton_and_cpu_backends_agree_on_identical_inputs(block_size: int, dtype: torch.dtype) -> None:
    decodes, prefills = mixed_batch(random.Random(block_size), block_size)
    case = make_case(random.Random(1), decodes, prefills, block_size, 9, 3, 64, dtype)
    outputs, caches = {}, {}
    for name, backend in (
        ("triton", TritonAttentionBackend(CPU)),
        ("cpu", CpuAttentionBackend(load_native_kernels())),
    ):
        key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
        metadata = backend.prepare(case.layout, dtype)
        outputs[name] = backend.forward(case.query, case.key, case.value, key_cache, value_cache, metadata, 0.125)
        caches[name] = (key_cache, value_cache)
    assert torch.equal(caches["triton"][0], caches["cpu"][0]) and torch.equal(caches["triton"][1], caches["cpu"][1])
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(outputs["triton"], outputs["cpu"], atol=tolerance, rtol=tolerance)


def reference_packed_prefill(query, key, value, query_lens, context_lens, scale) -> torch.Tensor:
    """A stand-in for xFormers' call with the same contract, computed with the naive reference attention."""
    out, query_start, key_start = [], 0, 0
    for query_len, context_len in zip(query_lens, context_lens):
        keys = key[key_start : key_start + context_len].unsqueeze(0)  # a one-block "cache" holding the context
        values = value[key_start : key_start + context_len].unsqueeze(0)
        layout = BatchLayout([query_len], [context_len], [[0]], torch.empty(0), context_len)
        out.append(reference_attention(query[query_start : query_start + query_len], keys, values, layout, scale))
        query_start, key_start = query_start + query_len, key_start + context_len
    return torch.cat(out).to(query.dtype)


def test_xformers_backend_gathers_each_prefill_context() -> None:
    """The glue around xFormers' kernel (context gather, packing, decodes through Triton), with the kernel replaced
    by a reference of the same contract: xFormers itself needs CUDA."""
    decodes, prefills = mixed_batch(random.Random(3), 16)
    case = make_case(random.Random(4), decodes, prefills, 16, 8, 2, 64, torch.float32)
    key_cache, value_cache = case.key_cache.clone(), case.value_cache.clone()
    reference_write(key_cache, value_cache, case.key, case.value, case.slots)
    expected = reference_attention(case.query, key_cache, value_cache, case.layout, 0.125)

    backend = XFormersAttentionBackend(CPU, packed_prefill=reference_packed_prefill)
    metadata = backend.prepare(case.layout, torch.float32)
    out = backend.forward(case.query, case.key, case.value, case.key_cache, case.value_cache, metadata, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_registry_picks_triton_only_where_it_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    assert get_attention_backend("triton", CPU, 64).name == "triton"  # the interpreter is on in this test session
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="'triton' needs a CUDA device"):
        get_attention_backend("triton", CPU, 64)
    with pytest.raises(ValueError, match="'cpu' runs on the CPU only"):
        get_attention_backend("cpu", torch.device("cuda"), 64)


def test_registry_reports_missing_xformers(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ValueError, match=re.escape("needs xformers: pip install 'spindle[cuda]'")):
        get_attention_backend("xformers", CPU, 64)


# 8 bits: the backends' attention differs in the last fp32 bits, which at 2 bits already moves some keys to the
# next level (a quarter of their range) a few layers in, and the greedy tokens with them.
KIVI_INT8 = {"kv_codec": "kivi", "kv_codec_bits": 8, "max_num_seqs": 4}  # residual buffers for 4 sequences fit


# The interpreter takes over a minute a run; the codec cache's kernel path is also checked on its own (default suite).
@pytest.mark.parametrize("cache", [{}, pytest.param(KIVI_INT8, marks=pytest.mark.slow)], ids=["plain", "kivi-int8"])
def test_engine_steps_run_through_the_triton_kernels(model_path, cache: dict) -> None:
    """A whole engine run (chunked prefill, then batched decode) gives the same greedy tokens on either backend,
    with a plain cache and with KIVI's blocks (which the Triton kernels read in place)."""
    source = open_model(model_path)
    prompts = [source.tokenizer.encode(text) for text in ("The capital of France is", "def add(a, b):")]
    prompts.append(source.tokenizer.encode("A long prompt split into chunks: " + "one two three four " * 10))
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    tokens: dict[str, dict[str, list[int]]] = {}
    for backend in ("triton", "cpu"):
        overrides = {"attention_backend": backend, "max_num_batched_tokens": 32, "kv_cache_memory": "32MiB", **cache}
        engine = LLMEngine(build_config("fp32", overrides), source=source, progress=False)
        assert engine.runner.backend.name == backend
        generated: dict[str, list[int]] = {f"r{i}": [] for i in range(len(prompts))}
        for request_id, prompt in zip(generated, prompts):
            engine.add_request(request_id, prompt, params)
        while engine.has_unfinished_requests():
            for output in engine.step():
                generated[output.request_id] += output.new_token_ids
        tokens[backend] = generated
    assert all(len(ids) == 4 for ids in tokens["cpu"].values())
    assert tokens["triton"] == tokens["cpu"]


def run_ahead_of_time(*args: str) -> list[tuple[str, float]]:
    environment = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "kernels.triton_ops.ahead_of_time", *args],
        capture_output=True,
        text=True,
        env=environment,
        timeout=1800,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = re.findall(r"^\| (\w+ [^|]+?) \| ([\d.]+) \|$", result.stdout, flags=re.MULTILINE)
    return [(label, float(kib)) for label, kib in rows]


# Per program, what the smallest Ampere/Ada parts give one block; the launch choices are meant to fit them.
SHARED_MEMORY_LIMIT_KIB = 99


def test_kernels_compile_for_sm80_without_a_gpu() -> None:
    rows = run_ahead_of_time("--arch", "80", "--quick")
    kernels = {label.split()[0] for label, _ in rows}
    assert kernels == {"decode", "prefill", "write", "merge", "scores"} and len(rows) == 13
    assert all(kib <= SHARED_MEMORY_LIMIT_KIB for _, kib in rows), rows


@pytest.mark.slow
@pytest.mark.parametrize("arch", [80, 90])
def test_every_specialisation_compiles(arch: int) -> None:
    rows = run_ahead_of_time("--arch", str(arch))
    assert len(rows) == 3 * 27 + 2 * 27 + 9 + 9
    assert all(kib <= SHARED_MEMORY_LIMIT_KIB for _, kib in rows), rows
