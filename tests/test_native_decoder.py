"""The native decoder (every layer of a decode step in one call) computes what the layer-by-layer path computes, bit
for bit, and leaves every step it cannot take to that path."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import build_config
from engine.models import AttentionContext, LlamaForCausalLM
from engine.models.native_decoder import NativeDecoder
from kernels.native import native_quantized_kernels


def _decoder_or_skip(llm: LLM):
    decoder = llm.engine.runner.native_decoder
    if decoder is None:
        pytest.skip("no native 4-bit kernels on this CPU")
    return decoder


@pytest.fixture(scope="module", params=["float32", "bfloat16", "int8"], ids=["fp32", "bf16", "fp32-int8-activations"])
def speculating_llm(request: pytest.FixtureRequest) -> Iterator[LLM]:
    """Each activation type the decoder has kernels for, with the 4-bit copies (the default), drafting n-grams:
    decode steps with one row per sequence and verification steps with several."""
    if request.param == "bfloat16" and native_quantized_kernels(torch.bfloat16) is None:
        pytest.skip("this CPU has no AVX512-BF16")
    dtype, activations = ("float32", "int8") if request.param == "int8" else (request.param, "none")
    overrides = {
        "dtype": dtype,
        "activation_quantization": activations,
        "speculative_method": "ngram",
        "speculative_max_batch_size": None,
    }
    llm = LLM(config=build_config(None, overrides))
    yield llm
    llm.close()


class BothPaths:
    """Runs each step the native decoder takes through the layer-by-layer path too, and records whether the two
    final hidden states are equal (the second run writes the same K/V rows again); records the steps it leaves to
    that path too."""

    def __init__(self, model: LlamaForCausalLM, decoder: NativeDecoder, monkeypatch: pytest.MonkeyPatch) -> None:
        self.model, self.decoder = model, decoder
        self.steps: list[tuple[int, bool, bool]] = []  # (rows, taken natively, equal)
        monkeypatch.setattr(model, "forward", self.layered)
        monkeypatch.setattr(decoder, "forward", self.native)

    def layered(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        self.steps.append((input_ids.shape[0], False, True))
        return LlamaForCausalLM.forward(self.model, input_ids, positions, ctx)

    def native(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        native = NativeDecoder.forward(self.decoder, input_ids, positions, ctx)
        layered = LlamaForCausalLM.forward(self.model, input_ids, positions, ctx)
        self.steps.append((input_ids.shape[0], True, torch.equal(native, layered)))
        return native


def test_decode_and_verification_steps_equal_the_layer_by_layer_path(speculating_llm: LLM, monkeypatch) -> None:
    decoder = _decoder_or_skip(speculating_llm)
    both = BothPaths(speculating_llm.engine.runner.model, decoder, monkeypatch)
    prompts = [
        "Count: 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,",
        "Write a short poem about rain on a tin roof.",
        "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return",
    ]
    # Different lengths: the batch shrinks as requests finish.
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in (40, 24, 12)]
    speculating_llm.generate(prompts, params)
    native_steps = [(rows, equal) for rows, native, equal in both.steps if native]
    assert all(equal for _, equal in native_steps), native_steps
    assert len(native_steps) >= 20
    row_counts = {rows for rows, _ in native_steps}
    # More rows than the three sequences: drafts verified; one row: the last request alone.
    assert len(row_counts) >= 3 and max(row_counts) > 3 and 1 in row_counts, row_counts
    assert any(not native for _, native, _ in both.steps)  # the prompts' prefill steps


def test_steps_it_cannot_take_go_layer_by_layer(speculating_llm: LLM, monkeypatch) -> None:
    decoder = _decoder_or_skip(speculating_llm)
    both = BothPaths(speculating_llm.engine.runner.model, decoder, monkeypatch)
    monkeypatch.setattr(decoder, "max_rows", 2)
    params = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    speculating_llm.generate([f"Name a colour, number {i}." for i in range(4)], params)
    assert all(rows <= 2 for rows, native, _ in both.steps if native)
    assert any(rows > 2 and not native for rows, native, _ in both.steps)


@pytest.mark.parametrize(
    "overrides",
    [
        {"dtype": "float16"},  # the decoder runs bf16 or fp32
        {"weight_quantization": "none"},  # no 4-bit copies
    ],
)
def test_models_it_cannot_serve_have_none(overrides: dict) -> None:
    llm = LLM(config=build_config(None, overrides))
    try:
        assert llm.engine.runner.native_decoder is None
    finally:
        llm.close()


def test_quantized_caches_are_never_given_to_it(monkeypatch) -> None:
    llm = LLM(config=build_config(None, {"kv_cache_dtype": "int8"}))
    try:
        decoder = _decoder_or_skip(llm)
        taken = []
        monkeypatch.setattr(decoder, "forward", lambda *args: taken.append(args))
        outputs = llm.generate(["Hello there"], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True))
        assert len(outputs[0].outputs[0].token_ids) == 4 and not taken
    finally:
        llm.close()
