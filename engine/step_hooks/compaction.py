"""KV compaction after a step: a KV policy rewrites each request that reached its trigger and the scheduler frees the
blocks emptied (engine/kv_policy/)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.kv_policy import KVCompactor
from engine.outputs import EngineCounters
from engine.step_hooks import StepHook
from scheduler.output import SchedulerOutput
from scheduler.scheduler import Scheduler


@dataclass
class CompactionHook(StepHook):
    compactor: KVCompactor
    scheduler: Scheduler
    counters: EngineCounters

    def after_update(self, scheduled: SchedulerOutput) -> None:
        self.compactor.run(self.scheduler, scheduled)
        self.counters.kv_compactions = self.compactor.num_compactions
        self.counters.kv_evicted_tokens = self.compactor.num_evicted_tokens
