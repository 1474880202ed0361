"""Block codecs (KIVI, GEAR, ThinK) against their definitions, and the codec cache's staging, sealing and residual
buffers through the CPU backends against the naive attention reference."""

from __future__ import annotations

import math

import pytest
import torch

from engine.config import build_config
from engine.errors import ConfigError
from engine.kv_policy.residuals import ResidualBuffers
from kernels.backend import BatchLayout
from kernels.codec_cache import CodecCache
from kernels.dequantizing_backend import DequantizingBackend
from kernels.kv_codecs import ChannelPruner, CodecSettings, GearCodec, GroupQuantizer, PlainCodec
from kernels.registry import get_attention_backend
from tests.attention_reference import reference_attention

CPU = torch.device("cpu")
BLOCK, KV_HEADS, HEAD_DIM = 16, 3, 64


def key_like_blocks(n: int = 5, seed: int = 0) -> torch.Tensor:
    """[n, BLOCK, KV_HEADS, HEAD_DIM] with a few channels of large magnitude, as real keys have."""
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randn(n, BLOCK, KV_HEADS, HEAD_DIM, generator=generator)
    channel_scale = torch.ones(HEAD_DIM)
    channel_scale[[3, 17, 40]] = 12.0
    return blocks * channel_scale + torch.randn(HEAD_DIM, generator=generator) * 2


def naive_group_quantize(x: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """Dequantized ``x`` [n, BLOCK, KVH, D], group by group with Python loops, fp16 scale and zero point."""
    out = torch.empty_like(x)
    n, block, heads, dim = x.shape
    groups = (
        [(b, slice(None), h, c) for b in range(n) for h in range(heads) for c in range(dim)]
        if per_channel
        else [(b, t, h, slice(None)) for b in range(n) for t in range(block) for h in range(heads)]
    )
    for index in groups:
        group = x[index]
        zero = group.min().half().float()
        scale = ((group.max() - group.min()) / (2**bits - 1)).half().float()
        levels = torch.zeros_like(group) if scale == 0 else ((group - zero) / scale).round().clamp(0, 2**bits - 1)
        out[index] = levels * scale + zero
    return out


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-token"])
def test_group_quantizer_round_trips_within_its_bound(bits: int, per_channel: bool) -> None:
    blocks = key_like_blocks()
    codec = GroupQuantizer(BLOCK, KV_HEADS, HEAD_DIM, bits, per_channel)
    stored = codec.encode(blocks)
    assert stored["levels"].shape == (5, BLOCK, KV_HEADS, HEAD_DIM * bits // 8)
    decoded = codec.decode(stored)
    # Equal to the naive quantizer but where a value sits on a rounding tie (x / scale against x * (1 / scale)).
    differs = (decoded - naive_group_quantize(blocks, bits, per_channel)).abs() > 1e-4
    assert differs.float().mean() < 1e-3
    dim = 1 if per_channel else -1
    low, high = blocks.amin(dim, keepdim=True), blocks.amax(dim, keepdim=True)
    # Half a step, plus the fp16 rounding of the zero point and of the scale times the largest level.
    bound = (high - low) / (2**bits - 1) / 2 + 2**-11 * (low.abs() + (high - low)) + 1e-5
    assert torch.all((decoded - blocks).abs() <= bound)
    assert codec.bytes_per_block == BLOCK * KV_HEADS * HEAD_DIM * bits // 8 + 2 * 2 * KV_HEADS * (
        HEAD_DIM if per_channel else BLOCK
    )


def test_per_channel_keys_lose_less_than_per_token_keys() -> None:
    """KIVI's observation: outlier key channels stretch every per-token group, not the per-channel ones."""
    blocks = key_like_blocks()
    errors = {}
    for per_channel in (True, False):
        codec = GroupQuantizer(BLOCK, KV_HEADS, HEAD_DIM, 2, per_channel)
        errors[per_channel] = (codec.decode(codec.encode(blocks)) - blocks).norm()
    assert errors[True] < 0.5 * errors[False]


@pytest.mark.parametrize("bits", [2, 4])
def test_gear_keeps_outliers_exactly_and_its_low_rank_term_is_the_best_one(bits: int) -> None:
    blocks = key_like_blocks(seed=bits)
    base = GroupQuantizer(BLOCK, KV_HEADS, HEAD_DIM, bits, per_channel=True)
    gear = GearCodec(base, BLOCK, KV_HEADS, HEAD_DIM, rank=2, outlier_fraction=0.02, dtype=torch.float32)
    decoded = gear.decode(gear.encode(blocks))
    per_head = blocks.permute(0, 2, 1, 3).reshape(5, KV_HEADS, -1)
    got = decoded.permute(0, 2, 1, 3).reshape(5, KV_HEADS, -1)
    count = round(0.02 * BLOCK * HEAD_DIM)
    for b in range(5):
        for h in range(KV_HEADS):
            outliers = per_head[b, h].abs().argsort(descending=True)[:count]
            assert torch.equal(got[b, h, outliers], per_head[b, h, outliers])
            inliers = per_head[b, h].clone()
            inliers[outliers] = 0
            inliers = inliers.view(BLOCK, HEAD_DIM)
            plain = naive_group_quantize(inliers.view(1, BLOCK, 1, HEAD_DIM), bits, True).view(BLOCK, HEAD_DIM)
            error = inliers - plain
            # Eckart-Young: after the best rank-2 term, what remains is the other singular values.
            best = torch.linalg.svdvals(error)[2:].norm()
            remaining = inliers - got[b, h].view(BLOCK, HEAD_DIM)
            mask = torch.ones(BLOCK * HEAD_DIM, dtype=torch.bool)
            mask[outliers] = False
            remaining = remaining.flatten()[mask]
            assert remaining.norm() <= best * 1.02 + 1e-3
            assert remaining.norm() < error.flatten()[mask].norm()
    assert gear.bytes_per_block == base.bytes_per_block + KV_HEADS * (2 * (BLOCK * 2 + 2 * HEAD_DIM) + count * 6)


def test_think_keeps_the_channels_with_the_largest_query_key_interaction() -> None:
    blocks = key_like_blocks()
    generator = torch.Generator().manual_seed(7)
    queries = torch.randn(8, KV_HEADS * 3, HEAD_DIM, generator=generator)  # a window of 8 queries, 3 per KV head
    energy = queries.square().view(8, KV_HEADS, 3, HEAD_DIM).sum((0, 2))  # [KVH, D]
    pruner = ChannelPruner(PlainCodec(BLOCK, KV_HEADS, 32, torch.float32), KV_HEADS, HEAD_DIM, keep=32)
    decoded = pruner.decode(pruner.encode(blocks, energy.expand(5, -1, -1)))
    for b in range(5):
        for h in range(KV_HEADS):
            group_queries = queries[:, 3 * h : 3 * h + 3].reshape(-1, HEAD_DIM)
            score = [torch.outer(group_queries[:, i], blocks[b, :, h, i]).norm() for i in range(HEAD_DIM)]
            kept = sorted(sorted(range(HEAD_DIM), key=lambda i: -float(score[i]))[:32])
            pruned = sorted(set(range(HEAD_DIM)) - set(kept))
            assert torch.equal(decoded[b, :, h, kept], blocks[b, :, h, kept])
            assert torch.all(decoded[b, :, h, pruned] == 0)
            # Zeroed key channels are the queries masked to the kept ones.
            masked = torch.zeros(HEAD_DIM)
            masked[kept] = 1
            torch.testing.assert_close(decoded[b, :, h] @ group_queries.T, blocks[b, :, h] @ (group_queries * masked).T)


def test_bytes_per_block_of_the_configured_codecs() -> None:
    """By hand for the default model's shape (bf16): KIVI-2, and ThinK 0.5 over int4."""
    kivi_key, kivi_value = CodecSettings("kivi", 2).build(BLOCK, KV_HEADS, HEAD_DIM, torch.bfloat16)
    assert kivi_key.bytes_per_block == KV_HEADS * (BLOCK * HEAD_DIM // 4 + 4 * HEAD_DIM)
    assert kivi_value.bytes_per_block == KV_HEADS * BLOCK * (HEAD_DIM // 4 + 4)
    think_key, think_value = CodecSettings(key_channel_keep=0.5, token_bits=4).build(
        BLOCK, KV_HEADS, HEAD_DIM, torch.bfloat16
    )
    assert think_key.bytes_per_block == KV_HEADS * (32 + BLOCK * (16 + 4))
    assert think_value.bytes_per_block == KV_HEADS * BLOCK * (32 + 4)


# ---------------------------------------------------------------------------------------------------------------
# The codec cache through the CPU backends
# ---------------------------------------------------------------------------------------------------------------

SMALL_BLOCK, HEADS = 4, 6


def codec_caches(settings: CodecSettings, num_blocks: int, num_slots: int, dim: int):
    key_codec, value_codec = settings.build(SMALL_BLOCK, 2, dim, torch.float32)
    shape = (SMALL_BLOCK, 2, dim, torch.float32, CPU)
    return (
        CodecCache(key_codec, num_blocks, num_slots, *shape, tracks_queries=settings.prunes_keys),
        CodecCache(value_codec, num_blocks, num_slots, *shape, tracks_queries=False),
    )


@pytest.mark.parametrize(
    "settings",
    [
        CodecSettings("kivi", 2),
        CodecSettings("kivi", 8),
        CodecSettings("gear", 4),
        CodecSettings(key_channel_keep=0.5, token_bits=8),
    ],
    ids=["kivi-int2", "kivi-int8", "gear-int4", "think-0.5+int8"],
)
@pytest.mark.parametrize("backend_name", ["cpu", "torch", "triton"])
def test_codec_cache_attends_sealed_blocks_decoded_and_filling_blocks_exactly(
    settings: CodecSettings, backend_name: str
) -> None:
    """Three steps of two sequences (prefills that seal blocks and leave one filling, decodes that fill it, a chunk
    spanning blocks); each step's output equals the reference over what the cache should hold: every full block
    through the codec once, the filling rows exact. A step re-run (as after a failure) gives the same result.
    Triton's kernels read KIVI's blocks in place (in its interpreter here), the other codecs through a working set."""
    dim = 64
    backend = get_attention_backend(backend_name, CPU, dim, block_codec=settings, query_decay=0.9)
    assert isinstance(backend, DequantizingBackend) != (backend_name == "triton" and settings.read_in_kernels)
    key_cache, value_cache = codec_caches(settings, num_blocks=12, num_slots=2, dim=dim)
    residuals = ResidualBuffers(2, SMALL_BLOCK)
    tables = {"a": [5, 2, 9, 0], "b": [7, 1, 11]}
    rows: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {"a": [], "b": []}
    energy = {"a": torch.zeros(2, dim), "b": torch.zeros(2, dim)}
    sealed: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    generator = torch.Generator().manual_seed(1)
    # (sequence, new rows) per step; decodes first
    steps = [[("a", 6), ("b", 3)], [("a", 1), ("b", 1)], [("b", 1), ("a", 7)]]
    for step in steps:
        steps_rows = []
        for name, count in step:
            new_k = torch.randn(count, 2, dim, generator=generator)
            new_v = torch.randn(count, 2, dim, generator=generator)
            queries = torch.randn(count, HEADS, dim, generator=generator)
            steps_rows.append((name, count, new_k, new_v, queries))
        starts = {name: len(rows[name]) for name, _ in step}
        layout = BatchLayout(
            query_lens=[count for _, count in step],
            context_lens=[starts[name] + count for name, count in step],
            block_tables=[tables[name] for name, _ in step],
            slot_mapping=torch.tensor(
                [
                    tables[name][r // SMALL_BLOCK] * SMALL_BLOCK + r % SMALL_BLOCK
                    for name, count in step
                    for r in range(starts[name], starts[name] + count)
                ]
            ),
            block_size=SMALL_BLOCK,
            residual_buffers=[residuals.plan(name, starts[name], count) for name, count in step],
        )
        query = torch.cat([q for *_, q in steps_rows])
        key, value = torch.cat([k for _, _, k, _, _ in steps_rows]), torch.cat([v for _, _, _, v, _ in steps_rows])
        # The expected cache: each sequence's rows, full blocks through the codec with the energy at sealing.
        expected_k, expected_v = torch.zeros(12, SMALL_BLOCK, 2, dim), torch.zeros(12, SMALL_BLOCK, 2, dim)
        for name, count, new_k, new_v, queries in steps_rows:
            squared = queries.square().view(count, 2, 3, dim).sum(2)
            for i in range(count):
                energy[name] = energy[name] * 0.9 + squared[i]
            rows[name].extend(zip(new_k, new_v))
        for name, table in tables.items():
            for index in range(math.ceil(len(rows[name]) / SMALL_BLOCK)):
                block_rows = rows[name][index * SMALL_BLOCK : (index + 1) * SMALL_BLOCK]
                k = torch.stack([r[0] for r in block_rows])
                v = torch.stack([r[1] for r in block_rows])
                if len(block_rows) == SMALL_BLOCK:  # sealed in this step or before, with the energy of then
                    if (name, index) not in sealed:
                        sealed[name, index] = (
                            key_cache.codec.decode(key_cache.codec.encode(k[None], energy[name][None]))[0],
                            value_cache.codec.decode(value_cache.codec.encode(v[None]))[0],
                        )
                    k, v = sealed[name, index]
                expected_k[table[index], : len(block_rows)] = k
                expected_v[table[index], : len(block_rows)] = v
        expected = reference_attention(query, expected_k, expected_v, layout, 0.25)
        for _ in range(2):  # the second run is a retry of the same step
            metadata = backend.prepare(layout, torch.float32)
            out = backend.forward(query, key, value, key_cache, value_cache, metadata, 0.25)
            torch.testing.assert_close(out, expected, atol=2e-4, rtol=2e-4)
            if settings.prunes_keys:
                break  # the query energy decays again on a retry: ThinK's choice may move, as documented


def test_residual_buffers_alternate_when_a_block_seals_and_repeat_on_a_retry() -> None:
    residuals = ResidualBuffers(2, block_size=4)
    assert residuals.plan("a", 0, 6) == (0, 1)  # seals block 0; block 1 starts in the other buffer
    assert residuals.plan("a", 0, 6) == (0, 1)  # the same step again
    assert residuals.plan("a", 6, 1) == (1, 1)  # fills within block 1
    assert residuals.plan("b", 0, 2) == (2, 2)
    residuals.release(["a"])
    assert residuals.plan("c", 0, 1) == (0, 0)  # a's slot, free again
    with pytest.raises(RuntimeError, match="residual slots"):
        residuals.plan("d", 0, 1)


# ---------------------------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"kv_codec": "kivy"}, "kv_codec must be one of none, kivi, gear"),
        ({"kv_codec": "kivi", "kv_codec_bits": 3}, "kv_codec_bits must be one of"),
        ({"kv_codec": "gear", "kv_gear_outlier_fraction": 1.5}, "kv_gear_outlier_fraction"),
        ({"kv_key_channel_keep": 0}, "kv_key_channel_keep must be in"),
        ({"kv_codec": "kivi", "kv_cache_dtype": "int4"}, "leave kv_cache_dtype auto"),
        ({"kv_codec": "kivi", "kv_policy": "snapkv"}, "cannot be combined with block codecs"),
        ({"kv_key_channel_keep": 0.5, "kv_policy": "sink_window"}, "cannot be combined with block codecs"),
    ],
)
def test_bad_codec_settings_are_config_errors(overrides: dict, named: str) -> None:
    with pytest.raises(ConfigError, match=named):
        build_config(None, overrides)


def test_xformers_refuses_block_codecs(monkeypatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())  # as if xformers were installed
    with pytest.raises(ValueError, match="cannot read a block-compressed KV cache"):
        get_attention_backend("xformers", CPU, 64, block_codec=CodecSettings("kivi", 4))
