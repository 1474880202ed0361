"""Step hooks: what a feature does around the engine's step loop, one module a feature.

``LLMEngine.step()`` is: ``schedule(draft_lengths())`` -> ``before_step`` -> the model run -> ``after_run`` ->
``Scheduler.update()`` -> ``after_update`` -> outputs. Each hook keeps its own fields of ``EngineCounters`` up to date.

- ``speculation.py``: draft lengths asked of the scheduler, drafts put into the rows it reserved, acceptance counted.
- ``offload.py``: swap and disk-tier copies before the forward, disk-tier write-through after the update.
- ``compaction.py``: a KV policy's compaction after the update.
- ``page_selection.py``: the page-selecting attention backend's counters.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from engine.sampler import SampledToken
from scheduler.output import SchedulerOutput


class StepHook:
    """One feature's part in the step loop; each method does nothing unless a hook overrides it."""

    def draft_lengths(self) -> Mapping[str, int]:
        """Before ``schedule()``: rows to reserve for draft tokens after each decoding request's token, by id."""
        return {}

    def before_step(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """After ``schedule()``, before the model runs; returns the step to run (drafts put in, say)."""
        return scheduled

    def after_run(self, scheduled: SchedulerOutput, sampled: Mapping[str, list[SampledToken]]) -> None:
        """The model ran; ``sampled`` holds the tokens of the requests that did not fail. Before ``update()``."""

    def after_update(self, scheduled: SchedulerOutput) -> None:
        """After ``Scheduler.update()`` applied the step."""


class StepHooks(StepHook):
    """The configured hooks as one, each called in order."""

    def __init__(self, hooks: Sequence[StepHook]) -> None:
        self.hooks = list(hooks)

    def draft_lengths(self) -> Mapping[str, int]:
        lengths: dict[str, int] = {}
        for hook in self.hooks:
            lengths.update(hook.draft_lengths())
        return lengths

    def before_step(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        for hook in self.hooks:
            scheduled = hook.before_step(scheduled)
        return scheduled

    def after_run(self, scheduled: SchedulerOutput, sampled: Mapping[str, list[SampledToken]]) -> None:
        for hook in self.hooks:
            hook.after_run(scheduled, sampled)

    def after_update(self, scheduled: SchedulerOutput) -> None:
        for hook in self.hooks:
            hook.after_update(scheduled)


__all__ = ["StepHook", "StepHooks"]
