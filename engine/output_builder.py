"""Turns each step's scheduler updates into ``RequestOutput``s: text deltas and stop strings, logprobs, timings, and
the token and finished-request counters."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

from engine.detokenizer import IncrementalDetokenizer
from engine.outputs import EngineCounters, RequestOutput, RequestTimes
from engine.sampler import SampledToken, SamplingRow
from engine.sampling_params import SamplingParams
from engine.tokenizer import Tokenizer
from scheduler.output import RequestUpdate, SchedulerOutput
from scheduler.request import FinishReason, Request
from scheduler.scheduler import Scheduler

logger = logging.getLogger("spindle.engine")


@dataclass
class RequestState:
    """Engine-side state of a live request, beside the scheduler's ``Request``."""

    request: Request
    params: SamplingParams
    row: SamplingRow
    detokenizer: IncrementalDetokenizer
    times: RequestTimes
    # Prompt logprobs recorded so far (when asked for); their count is where recording resumes after a preemption.
    prompt_logprobs: list[SampledToken] = field(default_factory=list)

    @property
    def failed_grammar_param(self) -> str | None:
        """The parameter of a request that its own grammar failed (the client's error); None for any other."""
        constraint = self.params.structured_outputs
        return constraint.param if constraint is not None and self.row.grammar_error is not None else None


class OutputBuilder:
    """Reports each request of a step; a request reported finished leaves ``states``."""

    def __init__(
        self, tokenizer: Tokenizer, scheduler: Scheduler, states: dict[str, RequestState], counters: EngineCounters
    ) -> None:
        self.tokenizer = tokenizer
        self.scheduler = scheduler
        self.states = states
        self.counters = counters

    def step_started(self, scheduled: SchedulerOutput) -> None:
        """Note when each request was first scheduled, and count the prompt tokens the step computes."""
        now = time.monotonic()
        for item in scheduled.scheduled:
            state = self.states[item.request_id]
            if state.times.first_scheduled is None:
                state.times.first_scheduled = now
            end = item.start_position + len(item.token_ids)
            self.counters.prompt_tokens += max(0, min(end, state.request.num_prompt_tokens) - item.start_position)

    def build(
        self, updates: list[RequestUpdate], sampled: Mapping[str, list[SampledToken]], failures: Mapping[str, str]
    ) -> list[RequestOutput]:
        """The step's outputs: the failed requests' last ones (``failures``: request id -> error), then one per
        update. A request whose output cannot be built fails alone."""
        now = time.monotonic()
        outputs = [self._error_output(rid, message) for rid, message in failures.items()]
        for update in updates:
            try:
                outputs.append(self._output(update, sampled.get(update.request_id, []), now))
            except Exception as exc:  # e.g. detokenising: this request fails, the others keep their tokens
                logger.exception("building the output of request %s failed", update.request_id)
                self.scheduler.finish_request(update.request_id, FinishReason.ERROR)
                outputs.append(self._error_output(update.request_id, f"output processing failed: {exc}"))
        return outputs

    def _output(self, update: RequestUpdate, tokens: list[SampledToken], now: float) -> RequestOutput:
        state = self.states[update.request_id]
        request, times = state.request, state.times
        new_ids = update.new_token_ids
        # The prompt is fully computed by the first output, which carries its logprobs.
        with_prompt_logprobs = state.params.prompt_logprobs is not None and bool(new_ids) and times.first_token is None
        if new_ids:
            self.counters.generation_tokens += len(new_ids)
            times.tokens.extend([now] * len(new_ids))
            if times.first_token is None:
                times.first_token = now
        finish_reason = update.finish_reason
        stop_reason: str | int | None = None
        if finish_reason is FinishReason.STOP and new_ids and not state.params.include_stop_str_in_output:
            # The EOS / stop token ends the request but is not part of its text.
            stop_reason = new_ids[-1] if new_ids[-1] not in self.tokenizer.eos_token_ids else None
            delta = state.detokenizer.update(new_ids[:-1])
        else:
            delta = state.detokenizer.update(new_ids)
        new_text = delta.text
        if finish_reason is not None and delta.stop_hit is None:
            new_text += state.detokenizer.flush()  # may itself complete a stop string
        if state.detokenizer.stop_hit is not None:
            if finish_reason is None:
                self.scheduler.finish_request(update.request_id, FinishReason.STOP)
            finish_reason, stop_reason = FinishReason.STOP, state.detokenizer.stop_hit
        output = RequestOutput(
            request_id=update.request_id,
            prompt_token_ids=request.prompt_token_ids,
            new_token_ids=list(new_ids),
            new_text=new_text,
            new_logprobs=tokens[: len(new_ids)] if state.params.logprobs is not None else [],
            prompt_logprobs=state.prompt_logprobs if with_prompt_logprobs else None,
            num_output_tokens=request.num_output_tokens,
            finished=finish_reason is not None,
            finish_reason=finish_reason.value if finish_reason is not None else None,
            stop_reason=stop_reason,
            num_cached_tokens=request.num_cached_prompt_tokens,
            times=times,
        )
        if output.finished:
            times.finished = now
            self.count_finished(output.finish_reason or "")
            del self.states[update.request_id]
        return output

    def _error_output(self, request_id: str, message: str) -> RequestOutput:
        """The last output of a request that failed; the scheduler has already finished it with ERROR."""
        state = self.states.pop(request_id)
        self.count_finished(FinishReason.ERROR.value)
        return RequestOutput(
            request_id=request_id,
            prompt_token_ids=state.request.prompt_token_ids,
            new_token_ids=[],
            new_text="",
            new_logprobs=[],
            num_output_tokens=state.request.num_output_tokens,
            finished=True,
            finish_reason=FinishReason.ERROR.value,
            error=message,
            error_param=state.failed_grammar_param,
            times=state.times,
        )

    def count_finished(self, reason: str) -> None:
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1
