"""Block codecs through the engine (fp32): greedy output against the unmodified engine, losslessness while no block
fills, prefix caching, exact block accounting under preemption, the memory each codec reports, start-up refusals."""

from __future__ import annotations

import pytest
import torch
from prometheus_client import generate_latest

from engine.config import build_config
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from server.metrics import EngineMetrics
from tests.conftest import long_text
from tests.test_kv_policy import generate

MAX_TOKENS = 16

# Per setting: how many of the reference prompts must keep their greedy continuation identical to no codec, and how
# many of the continuations' 64 tokens must match before each first diverges (a broken codec diverges at once).
# Measured under this setup: gear-int2 0 of 4 identical and 31 tokens, gear-int4 2 and 40, kivi-int2 0 and 26,
# kivi-int4 2 and 45, think-0.5 1 and 24, think-0.5+int4 1 and 31.
SETTINGS = {
    "kivi-int4": ({"kv_codec": "kivi", "kv_codec_bits": 4}, 1, 32),
    "kivi-int2": ({"kv_codec": "kivi", "kv_codec_bits": 2}, 0, 16),
    "gear-int4": ({"kv_codec": "gear", "kv_codec_bits": 4}, 1, 32),
    "gear-int2": ({"kv_codec": "gear", "kv_codec_bits": 2}, 0, 16),
    "think-0.5": ({"kv_key_channel_keep": 0.5}, 0, 16),
    "think-0.5+int4": ({"kv_key_channel_keep": 0.5, "kv_cache_dtype": "int4"}, 0, 16),
}


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


def make_engine(source: ModelSource, **overrides) -> LLMEngine:
    settings = {"kv_cache_memory": "48MiB", "max_num_seqs": 8, "max_num_batched_tokens": 256, **overrides}
    config = build_config("fp32", settings)
    return LLMEngine(config, source=source, progress=False)


@pytest.fixture(scope="module")
def prompts(source) -> list[list[int]]:
    tokenizer = source.tokenizer
    chats = [
        tokenizer.encode_chat([{"role": "user", "content": question}])
        for question in ("What is a prime number?", "Why is the sky blue?")
    ]
    return [*chats, tokenizer.encode("Once upon a time"), tokenizer.encode(long_text(600))]


@pytest.fixture(scope="module")
def reference(source, prompts) -> list[list[int]]:
    return generate(make_engine(source), prompts, MAX_TOKENS)


def common_prefix(a: list[int], b: list[int]) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_codec_output_stays_close_to_full_precision(source, prompts, reference, name: str) -> None:
    overrides, identical_floor, prefix_floor = SETTINGS[name]
    engine = make_engine(source, **overrides)
    layout = engine.kv_layout
    assert engine.num_kv_blocks == (48 * 2**20 - layout.residual_bytes(8)) // layout.bytes_per_block
    # Every setting stores at most half the keys' bytes (ThinK alone: keys only), so at most 3/4 of fp32's K + V.
    assert layout.bytes_per_token < 0.76 * 2 * 30 * 3 * 64 * 4
    got = generate(engine, prompts, MAX_TOKENS)  # checks the block accounting after every step
    identical = sum(g == r for g, r in zip(got, reference))
    matching = sum(common_prefix(g, r) for g, r in zip(got, reference))
    print(f"{name}: {identical} of {len(prompts)} continuations identical, {matching} tokens before divergence")
    assert identical >= identical_floor and matching >= prefix_floor
    assert engine.kv_manager.pool.enable_prefix_caching is ("kv_key_channel_keep" not in overrides)


@pytest.mark.parametrize(
    "overrides", [{"kv_codec": "kivi", "kv_codec_bits": 2}, {"kv_codec": "gear", "kv_codec_bits": 2}]
)
def test_a_codec_is_lossless_while_no_block_fills(source, prompts, reference, overrides: dict) -> None:
    """The residual keeps a filling block exact: with blocks longer than prompt + output nothing is compressed."""
    short = prompts[2]
    assert len(short) + MAX_TOKENS <= 32
    assert generate(make_engine(source, block_size=32, **overrides), [short], MAX_TOKENS)[0] == reference[2]


def test_prefix_caching_reuses_kivi_blocks_exactly(source) -> None:
    """A sealed block depends on its own rows only: a request served from another's cached blocks generates what it
    generates with prefix caching off."""
    tokenizer = source.tokenizer
    shared = tokenizer.encode(long_text(1000))[:96]  # six full blocks
    first, second = shared + tokenizer.encode(" And so"), shared + tokenizer.encode(" In the end")
    kivi = {"kv_codec": "kivi", "kv_codec_bits": 2}
    engine = make_engine(source, **kivi)
    generate(engine, [first], 4)
    cached = generate(engine, [second], 8)[0]
    assert engine.stats().prefix_cache_hits >= 96
    assert cached == generate(make_engine(source, enable_prefix_caching=False, **kivi), [second], 8)[0]


def test_preemption_and_recompute_keep_accounting_exact(source) -> None:
    """Four long prompts in a pool that cannot hold them all: requests are preempted and recomputed, residual
    slots are released and reused, and every block comes back."""
    tokenizer = source.tokenizer
    prompts = [tokenizer.encode(long_text(300 + 80 * i)) for i in range(4)]
    # Prefix caching off: the prompts share their first blocks, which the per-request accounting check counts twice.
    overrides = {"kv_codec": "kivi", "kv_codec_bits": 2, "dtype": "bfloat16", "max_num_batched_tokens": 64}
    overrides["enable_prefix_caching"] = False
    codecs = build_config(None, {"kv_codec": "kivi", "kv_codec_bits": 2}).cache.codec_settings()
    layout = KVCacheLayout.for_model(source.spec, 16, torch.bfloat16, "auto", codecs)
    memory = layout.residual_bytes(8) + 14 * layout.bytes_per_block
    engine = make_engine(source, kv_cache_memory=str(memory), **overrides)
    assert engine.num_kv_blocks == 14
    tokens = generate(engine, prompts, 24)
    assert all(len(t) == 24 for t in tokens)
    assert engine.stats().num_preemptions > 0


def test_start_up_refuses_what_block_codecs_cannot_do(source) -> None:
    with pytest.raises(ConfigError, match="speculative decoding cannot be combined with block codecs"):
        make_engine(source, kv_codec="kivi", speculative_method="ngram")
    with pytest.raises(ConfigError, match="residual for 64 sequences"):
        make_engine(source, kv_codec="kivi", kv_cache_memory="8MiB", max_num_seqs=64)
    with pytest.raises(ConfigError, match="do not pack into whole bytes"):
        make_engine(source, kv_key_channel_keep=0.3, kv_cache_dtype="int4")  # 19 channels at 4 bits


def test_metrics_report_the_codec() -> None:
    metrics = EngineMetrics("m", kv_codec="kivi-int2", kv_bytes_per_token=4680.0)
    text = generate_latest(metrics.registry).decode()
    assert 'spindle:kv_cache_codec_info{bytes_per_token="4680",codec="kivi-int2",model_name="m"} 1.0' in text
