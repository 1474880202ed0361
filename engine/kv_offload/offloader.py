"""Moves KV blocks between the paged cache and the offload tiers, as each SchedulerOutput lists them."""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from engine.kv_offload.block_bytes import BlockBytes
from engine.kv_offload.disk_store import DiskPrefixStore
from engine.kv_offload.swap_file import SwapFile
from scheduler.output import SchedulerOutput
from scheduler.preemption import PreemptionPolicy


@dataclass
class SwapCounters:
    swapped_out_bytes: int = 0
    swapped_in_bytes: int = 0


class KVOffloader:
    """Runs before a step's forward (``before_step``: swap-outs, then swap-ins, then prefix-store loads, so a block a
    swapped-out request left can be refilled in the same step) and after its update (``after_step``: blocks newly
    cached in memory are copied and queued for the disk store). Swap copies are timed for the preemption policy."""

    def __init__(
        self,
        blocks: BlockBytes,
        preemption: PreemptionPolicy,
        swap_file: SwapFile | None,
        disk_store: DiskPrefixStore | None,
    ) -> None:
        self.blocks = blocks
        self.preemption = preemption
        self.swap_file = swap_file
        self.disk_store = disk_store
        self.counters = SwapCounters()

    def before_step(self, output: SchedulerOutput) -> None:
        if output.swap_out or output.swap_in:
            assert self.swap_file is not None
            started = time.perf_counter()
            if output.swap_out:
                block_ids, slots = zip(*output.swap_out)
                self.swap_file.write(list(slots), self.blocks.gather(list(block_ids)))
            if output.swap_in:
                slots, block_ids = zip(*output.swap_in)
                self.blocks.scatter(list(block_ids), self.swap_file.read(list(slots)))
            out_bytes = len(output.swap_out) * self.blocks.bytes_per_block
            in_bytes = len(output.swap_in) * self.blocks.bytes_per_block
            self.counters.swapped_out_bytes += out_bytes
            self.counters.swapped_in_bytes += in_bytes
            self.preemption.observe_swap(out_bytes + in_bytes, time.perf_counter() - started)
        if output.load_blocks:
            assert self.disk_store is not None
            store = self.disk_store
            rows = torch.stack([store.payload(block_hash) for block_hash, _ in output.load_blocks])
            self.blocks.scatter([block_id for _, block_id in output.load_blocks], rows)

    def after_step(self, registered: list[tuple[int, int]]) -> None:
        """Queue the blocks newly cached in memory for the disk store (write-through: once a block's KV is complete,
        so it survives eviction and restarts alike); copied now, before a later step can reuse the blocks."""
        store = self.disk_store
        if store is None:
            return
        store.end_step()
        if not store.online:  # it would not store them: skip the copies
            return
        new = [(block_id, block_hash) for block_id, block_hash in registered if block_hash not in store]
        if new:
            rows = self.blocks.gather([block_id for block_id, _ in new])
            for row, (_, block_hash) in zip(rows, new):
                store.put(block_hash, row)

    def close(self) -> None:
        if self.disk_store is not None:
            self.disk_store.close()
