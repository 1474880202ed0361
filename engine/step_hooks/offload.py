"""KV offload around a step: the swap-outs, swap-ins and disk-tier loads a step's SchedulerOutput lists before the
forward, and the blocks newly cached in memory written through to the disk tier after the update
(engine/kv_offload/)."""

from __future__ import annotations

from engine.kv_offload import KVOffloader
from engine.outputs import EngineCounters
from engine.step_hooks import StepHook
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import SchedulerOutput


class OffloadHook(StepHook):
    def __init__(self, offloader: KVOffloader, kv_manager: KVCacheManager, counters: EngineCounters) -> None:
        self.offloader = offloader
        self.kv_manager = kv_manager
        counters.swap = offloader.counters  # the offloader and its disk store count as they go
        if offloader.disk_store is not None:
            counters.disk = offloader.disk_store.counters

    def before_step(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        self.offloader.before_step(scheduled)
        return scheduled

    def after_update(self, scheduled: SchedulerOutput) -> None:
        self.offloader.after_step(self.kv_manager.take_registered())
