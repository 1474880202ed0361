"""KV offload tiers: a swap file for preempted requests' blocks, and a persistent prefix-cache store on disk.

The scheduler decides (swap slots and prefix-store hits are plain integers in its SchedulerOutput); this package
holds the bytes and moves them before each step's forward (``KVOffloader``).
"""

from __future__ import annotations

from pathlib import Path

import torch

from engine.config import CacheConfig
from engine.errors import ConfigError
from engine.kv_cache import KVCacheLayout
from engine.kv_offload.block_bytes import BlockBytes
from engine.kv_offload.disk_store import DiskPrefixStore, DiskStoreCounters, model_identity
from engine.kv_offload.offloader import KVOffloader, SwapCounters
from engine.kv_offload.swap_file import SwapFile
from engine.loader import ModelSource
from kernels.quantized_cache import PagedCache
from scheduler.preemption import PreemptionPolicy, SwapSpace

__all__ = [
    "BlockBytes",
    "DiskPrefixStore",
    "DiskStoreCounters",
    "KVOffloader",
    "SwapCounters",
    "SwapFile",
    "build_offload",
    "check_swap_space",
]


def build_offload(
    cache: CacheConfig,
    layout: KVCacheLayout,
    kv_caches: list[tuple[PagedCache, PagedCache]],
    source: ModelSource,
    prefix_caching: bool,
    int4_rows: int,
    int4_activations: torch.dtype,
) -> tuple[PreemptionPolicy, KVOffloader | None]:
    """The preemption policy for the scheduler, and the offloader when a tier is configured (else None).

    The disk tier needs prefix caching (its blocks are found by prefix hash): without it none is opened. Its
    identity covers what decides the stored K/V bits, including ``int4_rows`` (steps of up to that many tokens run
    on the 4-bit weight copies; 0: none) and what those are packed for (``int4_activations``: int8-quantized
    activations change the K/V too), since short prefill chunks then compute their K/V from other weights.
    """
    swap_file = None
    swap_space = None
    if cache.preemption_mode != "recompute":
        num_slots = check_swap_space(cache, layout)
        try:
            swap_file = SwapFile(cache.swap_dir, num_slots, layout.bytes_per_block)
        except OSError as exc:
            raise ConfigError(
                f"cannot create the swap file in {cache.swap_dir or 'the temporary directory'}: {exc}"
            ) from exc
        swap_space = SwapSpace(num_slots)
    policy = PreemptionPolicy(cache.preemption_mode, swap_space, layout.bytes_per_block)
    disk_store = None
    if cache.kv_disk_dir is not None and prefix_caching:
        try:
            Path(cache.kv_disk_dir).mkdir(parents=True, exist_ok=True)
            identity = model_identity(
                {
                    "spec": repr(source.spec),
                    "dtype": str(layout.dtype),
                    "kv_cache_dtype": layout.kv_cache_dtype,
                    "block_size": layout.block_size,
                    "int4_rows": int4_rows,
                    "int4_activations": str(int4_activations) if int4_rows else "none",
                },
                _model_files(source),
            )
            disk_store = DiskPrefixStore(
                cache.kv_disk_dir, cache.kv_disk_space_bytes(), identity, layout.bytes_per_block
            )
        except OSError as exc:
            raise ConfigError(f"cannot use kv_disk_dir {cache.kv_disk_dir}: {exc}") from exc
    if swap_file is None and disk_store is None:
        return policy, None
    blocks = BlockBytes(kv_caches)
    assert blocks.bytes_per_block == layout.bytes_per_block
    return policy, KVOffloader(blocks, policy, swap_file, disk_store)


def check_swap_space(cache: CacheConfig, layout: KVCacheLayout) -> int:
    """The swap file's slots (0 when preemption always recomputes); ConfigError if it cannot hold a block."""
    if cache.preemption_mode == "recompute":
        return 0
    num_slots = cache.swap_space_bytes() // layout.bytes_per_block
    if num_slots < 1:
        raise ConfigError(
            f"swap_space of {cache.swap_space_bytes()} bytes holds no block "
            f"(one block takes {layout.bytes_per_block} bytes)"
        )
    return num_slots


def _model_files(source: ModelSource) -> list[Path]:
    if source.path.is_dir():
        return sorted(p for p in source.path.iterdir() if p.suffix in (".safetensors", ".json"))
    return [source.path]
