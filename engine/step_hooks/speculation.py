"""Speculative decoding around a step: the draft rows asked of the scheduler, the drafter's tokens put into the rows
it reserved, and what verification accepted (engine/spec/)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from engine.output_builder import RequestState
from engine.outputs import EngineCounters
from engine.sampler import SampledToken
from engine.spec import Drafter, DraftRequest
from engine.spec.draft_length import DraftLengthController
from engine.step_hooks import StepHook
from scheduler.output import SchedulerOutput
from scheduler.request import RequestStatus
from scheduler.scheduler import Scheduler


@dataclass
class SpeculationHook(StepHook):
    drafter: Drafter
    lengths: DraftLengthController
    # No drafts while more requests than this run (speculative_max_batch_size): verifying them costs more than it saves.
    max_batch_size: int | None
    scheduler: Scheduler
    states: Mapping[str, RequestState]  # the engine's live requests
    counters: EngineCounters

    def draft_lengths(self) -> Mapping[str, int]:
        """Each speculating request that is decoding asks for its current draft length."""
        if self.max_batch_size is not None and self.scheduler.num_running > self.max_batch_size:
            return {}
        wanted = {}
        for rid, state in self.states.items():
            request = state.request
            if (
                state.params.can_speculate
                and request.status is RequestStatus.RUNNING
                and request.num_computed_tokens == request.num_tokens - 1
            ):
                wanted[rid] = self.lengths.length(rid)
        return wanted

    def before_step(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """Draft the tokens for the rows ``schedule()`` reserved, and put them in (the scheduler gives back the rows
        left empty)."""
        gone = [*scheduled.preempted_request_ids, *scheduled.finished_request_ids]
        self.drafter.forget(gone)
        for rid in gone:
            self.lengths.forget(rid)
        wanted = [
            DraftRequest(
                item.request_id,
                self.states[item.request_id].request.all_token_ids,
                item.num_draft_slots,
                item.block_table,
            )
            for item in scheduled.scheduled
            if item.num_draft_slots
        ]
        if not wanted:
            return scheduled
        return self.scheduler.fill_drafts(scheduled, self.drafter.propose(wanted))

    def after_run(self, scheduled: SchedulerOutput, sampled: Mapping[str, list[SampledToken]]) -> None:
        """Count the verified drafts, and let each request's acceptance set its next draft length."""
        for item in scheduled.scheduled:
            if item.num_draft_tokens and item.request_id in sampled:
                accepted = len(sampled[item.request_id]) - 1
                self.counters.spec_drafts += 1
                self.counters.spec_draft_tokens += item.num_draft_tokens
                self.counters.spec_accepted_tokens += accepted
                self.lengths.observe(item.request_id, item.num_draft_tokens, accepted)
