"""Page selection's counters after a step: what the page-selecting attention backend read of the decodes' KV blocks,
beside what full attention would have read (kernels/page_selecting_backend.py)."""

from __future__ import annotations

from dataclasses import dataclass

from engine.outputs import EngineCounters
from engine.step_hooks import StepHook
from kernels.page_selecting_backend import PageSelectingBackend
from scheduler.output import SchedulerOutput


@dataclass
class PageSelectionCounters(StepHook):
    backend: PageSelectingBackend
    counters: EngineCounters

    def after_update(self, scheduled: SchedulerOutput) -> None:
        self.counters.page_selection_decodes = self.backend.num_decodes
        self.counters.page_selection_blocks_read = self.backend.num_blocks_read
        self.counters.page_selection_blocks_held = self.backend.num_blocks_held
