"""KV offload tiers end to end on the default model in fp32.

Swap: requests preempted by swapping (a tiny KV pool forces it) produce exactly the tokens the same engine config
produces without offload and without pressure. Disk tier: blocks come back byte-identical, from another engine
instance over the same directory (a restart) too, and damaged files are rejected with a warning and recomputed.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch

from engine import model_setup
from engine.config import build_config
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout
from engine.kv_offload import BlockBytes, DiskPrefixStore, DiskStoreCounters, SwapCounters, disk_store
from engine.llm_engine import LLMEngine
from engine.loader import ModelSource, open_model
from engine.models import build_model
from engine.outputs import EngineCounters
from engine.sampling_params import SamplingParams
from scheduler import Request, SchedulerStats
from scheduler.block_hash import extend_block_hashes
from server.metrics import EngineMetrics
from tests.conftest import long_text

NEW_TOKENS = 16
BLOCK_SIZE = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def source() -> ModelSource:
    return open_model()


@pytest.fixture(scope="module", autouse=True)
def shared_model() -> Iterator[None]:
    """Every engine of this module gets the one fp32 model: its weights are read-only, and each engine keeps its own
    KV cache and offload tiers, which is all a restart here has to lose."""
    models: dict[torch.dtype, torch.nn.Module] = {}

    def build_once(source, dtype, device, *args, **kwargs):
        if dtype not in models:
            models[dtype] = build_model(source, dtype, device, *args, **kwargs)
        return models[dtype]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_setup, "build_model", build_once)
        yield


@pytest.fixture(scope="module")
def prompts(source: ModelSource) -> list[list[int]]:
    """Four long prompts that share nothing."""
    text = long_text(6000)
    return [source.tokenizer.encode(text[i * 1400 : i * 1400 + 700]) for i in range(4)]


def make_engine(source: ModelSource, num_blocks: int | None = None, **overrides) -> LLMEngine:
    config = build_config("fp32", {"block_size": BLOCK_SIZE, "max_model_len": 192, **overrides})
    if num_blocks is not None:
        layout = KVCacheLayout.for_model(source.spec, BLOCK_SIZE, config.model.torch_dtype, config.cache.kv_cache_dtype)
        config.cache = dataclasses.replace(config.cache, kv_cache_memory=str(num_blocks * layout.bytes_per_block))
    return LLMEngine(config, source=source, progress=False)


def run(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    tokens: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    for i, prompt in enumerate(prompts):
        engine.add_request(str(i), prompt, GREEDY)
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            assert output.error is None
            tokens[output.request_id].extend(output.new_token_ids)
        steps += 1
        assert steps < 10_000, "the engine stopped making progress"
    assert engine.kv_manager.num_free_blocks == engine.num_kv_blocks, "KV blocks leaked"
    return [tokens[str(i)] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def uninterrupted(source, prompts) -> list[list[int]]:
    """The same engine config without offload and with room for every request at once."""
    engine = make_engine(source, 64, enable_prefix_caching=False)
    tokens = run(engine, prompts)
    assert engine.stats().num_preemptions == 0
    return tokens


def tight_blocks(prompts: list[list[int]]) -> int:
    """Room for two prompts and one more block: two requests are admitted, and the second one is preempted once
    both need to grow."""
    return 2 * -(-max(len(p) for p in prompts) // BLOCK_SIZE) + 1


def test_swapped_and_resumed_requests_match_uninterrupted_decoding(source, prompts, uninterrupted) -> None:
    engine = make_engine(
        source, tight_blocks(prompts), enable_prefix_caching=False, preemption_mode="swap", swap_space="64MiB"
    )
    assert run(engine, prompts) == uninterrupted
    stats = engine.stats()
    assert stats.num_swap_preemptions > 0
    assert stats.num_free_swap_slots == stats.num_swap_slots
    counters = engine.offloader.counters
    assert counters.swapped_out_bytes == counters.swapped_in_bytes > 0
    # Resumed requests did not recompute their prompts: each prompt token was computed once.
    assert engine.counters.prompt_tokens == sum(len(p) for p in prompts)


def test_quantized_blocks_come_back_from_swap_byte_for_byte(source, prompts) -> None:
    """With int8 KV (levels, scales and zero points in each block) a swapped-in block holds exactly the bytes its
    request's block held when it was swapped out. (The outputs are not compared with uninterrupted decoding: int8
    KV rounds a value that a different batch computed a hair differently to another level, so a run with other
    batches, recompute preemption or none, may flip a near-tie; fp32 KV does not, and the test above holds there.)"""
    engine = make_engine(
        source,
        tight_blocks(prompts),
        enable_prefix_caching=False,
        preemption_mode="swap",
        swap_space="64MiB",
        kv_cache_dtype="int8",
    )
    offloader = engine.offloader
    blocks = offloader.blocks
    swapped_out: dict[int, torch.Tensor] = {}  # swap slot -> the block's bytes when it left
    checked = 0
    before_step = offloader.before_step

    def recording_before_step(output) -> None:
        nonlocal checked
        for block_id, slot in output.swap_out:
            swapped_out[slot] = blocks.gather([block_id])[0].clone()
        before_step(output)
        for slot, block_id in output.swap_in:
            assert torch.equal(blocks.gather([block_id])[0], swapped_out[slot])
            checked += 1

    offloader.before_step = recording_before_step
    run(engine, prompts)
    assert engine.stats().num_swap_preemptions > 0 and checked > 0
    assert engine.counters.prompt_tokens == sum(len(p) for p in prompts)


def test_swap_space_too_small_for_a_request_falls_back_to_recompute(source, prompts, uninterrupted) -> None:
    layout = KVCacheLayout.for_model(source.spec, BLOCK_SIZE, torch.float32)
    engine = make_engine(
        source,
        tight_blocks(prompts),
        enable_prefix_caching=False,
        preemption_mode="swap",
        swap_space=str(2 * layout.bytes_per_block),
    )
    assert run(engine, prompts) == uninterrupted
    stats = engine.stats()
    assert stats.num_preemptions > 0 and stats.num_swap_preemptions == 0


def prompt_block_hashes(prompt: list[int]) -> list[int]:
    """Hashes of the prompt's blocks that a prefix lookup may use (never the block of its last token)."""
    hashes: list[int] = []
    extend_block_hashes(hashes, prompt, BLOCK_SIZE)
    return hashes[: (len(prompt) - 1) // BLOCK_SIZE]


def stored_blocks(engine: LLMEngine, block_hashes: list[int]) -> torch.Tensor:
    """The bytes of the blocks the engine's prefix cache holds under these hashes (in memory)."""
    pool = engine.kv_manager.pool
    block_ids = [pool.get_cached_block(h) for h in block_hashes]
    assert None not in block_ids
    return BlockBytes(engine.runner.kv_caches).gather(block_ids)


def test_disk_tier_survives_a_restart_byte_for_byte(source, prompts, tmp_path) -> None:
    prompt = prompts[0]
    first = make_engine(source, 64, kv_disk_dir=str(tmp_path))
    expected = run(first, [prompt])
    hashes = prompt_block_hashes(prompt)
    num_prompt_blocks = len(hashes)
    original = stored_blocks(first, hashes)
    first.close()

    second = make_engine(source, 64, kv_disk_dir=str(tmp_path))  # a new process's view: nothing in memory
    store = second.offloader.disk_store
    assert all(h in store for h in hashes)
    assert run(second, [prompt]) == [expected[0]]
    assert store.counters.hits == num_prompt_blocks and store.counters.corrupt_files == 0
    assert second.counters.prompt_tokens == len(prompt) - num_prompt_blocks * BLOCK_SIZE
    assert torch.equal(stored_blocks(second, hashes), original)
    second.close()

    # Another KV codec, or dense weights computing the short chunks where the 4-bit copies did (fp32 serves a Q4_1
    # file's small steps from them), over the same directory: a subdirectory of their own, never reading these blocks.
    directories = {store.directory}
    for overrides in ({"kv_cache_dtype": "int8"}, {"weight_quantization": "none"}):
        other = make_engine(source, 64, kv_disk_dir=str(tmp_path), **overrides)
        run(other, [prompt])
        assert other.offloader.disk_store.counters.hits == 0
        directories.add(other.offloader.disk_store.directory)
        other.close()
    assert len(directories) == 3


def test_blocks_evicted_from_memory_come_back_from_disk(source, prompts, tmp_path) -> None:
    # Room for one request: the second one evicts (nearly) all the cached blocks of the first.
    engine = make_engine(source, 192 // BLOCK_SIZE, kv_disk_dir=str(tmp_path))
    expected = run(engine, [prompts[0]])
    run(engine, [prompts[1]])
    engine.offloader.disk_store.flush()
    num_blocks = len(prompt_block_hashes(prompts[0]))
    _, in_memory = engine.kv_manager.get_computed_blocks(Request("probe", prompts[0], max_tokens=1))
    assert in_memory < num_blocks * BLOCK_SIZE // 2
    assert run(engine, [prompts[0]]) == expected
    assert engine.offloader.disk_store.counters.hits * BLOCK_SIZE == num_blocks * BLOCK_SIZE - in_memory
    engine.close()


def test_corrupt_and_truncated_files_are_rejected_and_recomputed(source, prompts, tmp_path, caplog) -> None:
    prompt = prompts[2]
    first = make_engine(source, 64, kv_disk_dir=str(tmp_path))
    expected = run(first, [prompt])
    first.close()
    directory = first.offloader.disk_store.directory
    hashes = prompt_block_hashes(prompt)
    flipped, truncated = (directory / f"{hashes[i]:016x}.kvb" for i in (3, 1))
    data = bytearray(flipped.read_bytes())
    data[len(data) // 2] ^= 0x40
    flipped.write_bytes(data)
    truncated.write_bytes(truncated.read_bytes()[:1000])

    second = make_engine(source, 64, kv_disk_dir=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        assert run(second, [prompt]) == expected
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    # The truncated block 1 ends the prefix found on disk: only block 0 is loaded, the rest recomputed.
    assert len(warnings) == 1 and str(truncated) in warnings[0]
    store = second.offloader.disk_store
    assert (store.counters.hits, store.counters.corrupt_files) == (1, 1)
    assert second.counters.prompt_tokens == len(prompt) - BLOCK_SIZE
    second.close()

    third = make_engine(source, 64, kv_disk_dir=str(tmp_path))  # block 1 was rewritten; now block 3 is reached
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        assert run(third, [prompt]) == expected
    warnings = [r.getMessage() for r in caplog.records if "corrupt" in r.getMessage()]
    assert len(warnings) == 1 and str(flipped) in warnings[0] and "checksum" in warnings[0]
    assert third.offloader.disk_store.counters.hits == 3
    third.close()


def test_store_is_bounded_least_recently_used_first(tmp_path: Path) -> None:
    # Files of 144 bytes (a 44-byte header and the block): three fit the bound, a fourth does not.
    store = DiskPrefixStore(tmp_path, max_bytes=450, identity=bytes(16), bytes_per_block=100)
    blocks = {h: torch.full((100,), h, dtype=torch.uint8) for h in range(1, 5)}
    for h in (1, 2, 3):
        store.put(h, blocks[h])
    store.flush()
    assert store.lookup(1)  # 1 is now used more recently than 2
    store.end_step()
    store.put(4, blocks[4])
    store.flush()
    assert [h in store for h in (1, 2, 3, 4)] == [True, False, True, True]
    assert not (store.directory / f"{2:016x}.kvb").exists()
    store.close()
    reopened = DiskPrefixStore(tmp_path, max_bytes=450, identity=bytes(16), bytes_per_block=100)
    assert reopened.lookup(4) and torch.equal(reopened.payload(4), blocks[4])
    reopened.close()


def filled_store(directory: Path, **kwargs) -> DiskPrefixStore:
    """A store holding blocks 1 to 4 of 100 bytes, each filled with its hash."""
    store = DiskPrefixStore(directory, max_bytes=10_000, identity=bytes(16), bytes_per_block=100, **kwargs)
    for h in range(1, 5):
        store.put(h, torch.full((100,), h, dtype=torch.uint8))
    store.flush()
    assert store.num_blocks == 4
    return store


def failing_open(code: int, mode_letter: str, calls: list[str] | None = None) -> Callable[..., object]:
    """``open`` for the store's module, raising ``code`` for files opened with ``mode_letter`` ("r" or "w")."""

    def fake_open(path, mode="r", *args, **kwargs):
        if mode_letter in mode:
            if calls is not None:
                calls.append(str(path))
            raise OSError(code, os.strerror(code), str(path))
        return open(path, mode, *args, **kwargs)

    return fake_open


def store_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "spindle.kv_offload" and r.levelno >= logging.WARNING]


def test_a_block_path_that_is_a_directory_is_a_miss(tmp_path, caplog) -> None:
    store = filled_store(tmp_path)
    path = store.directory / f"{1:016x}.kvb"
    path.unlink()
    path.mkdir()
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        assert not store.lookup(1)
        assert not store.lookup(1)  # forgotten: a plain miss, without reading the path again
        assert store.lookup(2) and torch.equal(store.payload(2), torch.full((100,), 2, dtype=torch.uint8))
    assert (store.counters.misses, store.counters.io_errors, store.counters.hits) == (2, 1, 1)
    (warning,) = store_warnings(caplog)
    assert "Is a directory" in warning
    assert store.online
    store.close()


def test_a_read_only_store_is_a_miss_logged_once(tmp_path, caplog, monkeypatch) -> None:
    store = filled_store(tmp_path)

    def read_only(*args, **kwargs) -> None:
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr(disk_store.os, "utime", read_only)
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        assert not store.lookup(1)
        assert not store.lookup(2)
    assert (store.counters.misses, store.counters.io_errors, store.counters.hits) == (2, 2, 0)
    (warning,) = store_warnings(caplog)  # once per cause, not once per block
    assert "Read-only file system" in warning
    store.close()


def test_read_errors_are_misses_logged_once_per_cause(tmp_path, caplog, monkeypatch) -> None:
    store = filled_store(tmp_path, max_consecutive_errors=10)
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        monkeypatch.setattr(disk_store, "open", failing_open(errno.EIO, "r"), raising=False)
        assert not any(store.lookup(h) for h in (1, 2))
        monkeypatch.setattr(disk_store, "open", failing_open(errno.EACCES, "r"), raising=False)
        assert not any(store.lookup(h) for h in (3, 4))
    assert (store.counters.misses, store.counters.io_errors) == (4, 4)
    warnings = store_warnings(caplog)
    assert len(warnings) == 2
    assert "Input/output error" in warnings[0] and "Permission denied" in warnings[1]
    assert store.online
    store.close()


def test_write_errors_skip_the_block_and_are_logged_once(tmp_path, caplog, monkeypatch) -> None:
    store = DiskPrefixStore(tmp_path, max_bytes=10_000, identity=bytes(16), bytes_per_block=100)
    monkeypatch.setattr(disk_store, "open", failing_open(errno.ENOSPC, "w"), raising=False)
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        for h in (1, 2, 3):
            store.put(h, torch.full((100,), h, dtype=torch.uint8))
        store.flush()
    assert store.num_blocks == 0 and store.counters.written_blocks == 0 and store.counters.io_errors == 3
    (warning,) = store_warnings(caplog)
    assert "No space left on device" in warning
    assert not list(store.directory.iterdir()), "no file, not even a temporary one, is left"
    store.close()


def test_repeated_io_errors_take_the_store_offline(tmp_path, caplog, monkeypatch) -> None:
    store = filled_store(tmp_path, max_consecutive_errors=3)
    calls: list[str] = []
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        monkeypatch.setattr(disk_store, "open", failing_open(errno.EIO, "", calls), raising=False)
        assert not store.lookup(1) and not store.lookup(2)
        monkeypatch.undo()
        assert store.lookup(3), "a success in between: errors in a row start again from zero"
        store.end_step()
        monkeypatch.setattr(disk_store, "open", failing_open(errno.EIO, "", calls), raising=False)
        assert not store.lookup(4)
        assert store.online
        for h in (5, 6):
            store.put(h, torch.full((100,), h, dtype=torch.uint8))
        store.flush()
        assert not store.online
        monkeypatch.undo()  # the disk works again; the store no longer touches it
        calls.clear()
        assert not store.lookup(3) and not store.lookup(4)
        store.put(7, torch.full((100,), 7, dtype=torch.uint8))
        store.flush()
    assert calls == [] and not (store.directory / f"{7:016x}.kvb").exists()
    assert store.counters.io_errors == 5
    warnings = store_warnings(caplog)  # the first lookup error, the first write error, going offline
    assert len(warnings) == 3
    assert warnings[0].startswith("prefix store: lookup failed")
    assert warnings[1].startswith("prefix store: write failed")
    assert "3 I/O errors in a row" in warnings[2] and "offline" in warnings[2]
    store.close()


def test_the_engine_serves_on_when_the_disk_tier_breaks(
    source, prompts, uninterrupted, tmp_path, monkeypatch, caplog
) -> None:
    first = make_engine(source, 64, kv_disk_dir=str(tmp_path))
    run(first, [prompts[0]])  # its blocks are on disk now
    first.close()

    engine = make_engine(source, 64, kv_disk_dir=str(tmp_path))
    store = engine.offloader.disk_store
    assert all(h in store for h in prompt_block_hashes(prompts[0]))
    # The disk fails every read and write from now on (a dead or unmounted device).
    monkeypatch.setattr(disk_store, "open", failing_open(errno.EIO, ""), raising=False)
    with caplog.at_level(logging.WARNING, logger="spindle.kv_offload"):
        assert run(engine, prompts) == uninterrupted
        store.flush()
        assert not store.online and store.counters.hits == 0
        assert store.counters.io_errors == disk_store.MAX_CONSECUTIVE_IO_ERRORS
        # Prefix lookups fall through to the offline tier now: plain misses, the prompts are computed again.
        engine.kv_manager.pool.reset_prefix_cache()
        assert run(engine, prompts) == uninterrupted
    # One line per failing operation and one for going offline, however many blocks failed.
    warnings = sorted(w.split(" failed")[0] if " failed" in w else "offline" for w in store_warnings(caplog))
    assert warnings == ["offline", "prefix store: lookup", "prefix store: write"]
    engine.close()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"preemption_mode": "sometimes"}, "preemption_mode must be one of"),
        ({"swap_space": "lots"}, "swap_space: cannot read"),
        ({"kv_disk_space": "-1GiB"}, "kv_disk_space: cannot read"),
    ],
)
def test_bad_offload_config_is_a_clear_startup_error(overrides, message) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config("fp32", overrides)


def test_swap_space_smaller_than_a_block_is_refused(source) -> None:
    with pytest.raises(ConfigError, match="swap_space of 1000 bytes holds no block"):
        make_engine(source, 40, preemption_mode="swap", swap_space="1000")


def test_offload_metrics_are_exported() -> None:
    metrics = EngineMetrics("m")
    stats = SchedulerStats(0, 0, 0.0, 0, 0, 5, 1, 1, num_swap_preemptions=3, num_swap_slots=10, num_free_swap_slots=4)
    disk = DiskStoreCounters(
        hits=2, misses=1, read_bytes=8, written_bytes=9, corrupt_files=1, io_errors=4, stored_bytes=9
    )
    metrics.observe([], stats, EngineCounters(swap=SwapCounters(100, 60), disk=disk))
    value = lambda name: metrics.registry.get_sample_value(f"spindle:{name}", {"model_name": "m"})  # noqa: E731
    assert (value("kv_swap_preemptions_total"), value("kv_recompute_preemptions_total")) == (3, 2)
    assert (value("kv_swapped_out_bytes_total"), value("kv_swapped_in_bytes_total")) == (100, 60)
    assert value("kv_swap_usage_perc") == pytest.approx(0.6)
    assert (value("kv_disk_hits_total"), value("kv_disk_misses_total"), value("kv_disk_corrupt_files_total")) == (
        2,
        1,
        1,
    )
    assert (value("kv_disk_read_bytes_total"), value("kv_disk_written_bytes_total")) == (8, 9)
    assert value("kv_disk_stored_bytes") == 9
    assert value("kv_disk_io_errors_total") == 4
