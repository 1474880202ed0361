"""The synchronous engine: admits requests and runs the step loop.

A step: the scheduler picks the batch, the step hooks of the features configured act before the model runs
(engine/step_hooks/), the model runs (a failing request failed alone), the scheduler applies the sampled tokens, the
hooks act after, and each request that got tokens or finished is reported (engine/output_builder.py). The parts are
built in engine/engine_builder.py.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.engine_builder import build_engine, check_combinations
from engine.errors import WorkerGroupError
from engine.loader import ModelSource, open_model
from engine.output_builder import OutputBuilder, RequestState
from engine.outputs import EngineCounters, RequestOutput, RequestTimes
from engine.parallel.launch import start_engine_rank
from engine.sampler import SampledToken, SamplingRow
from engine.sampling_params import InvalidParameter, SamplingParams
from engine.structured.compiler import GrammarCompiler
from engine.worker_rank import run_worker
from scheduler.output import ScheduledRequest, SchedulerOutput, SchedulerStats
from scheduler.request import FinishReason, Request

logger = logging.getLogger("spindle.engine")

# A step is timed for the preemption policy's prefill rate when at least this many of its tokens are prefill.
_MIN_PREFILL_TOKENS_TIMED = 64
_WORKER_EXIT_GRACE_SECONDS = 2.0  # after a failed collective, how long a dying worker may take to exit


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None, progress: bool = True) -> None:
        self.config = config
        self.source = source or open_model(config.model.model)
        self.tokenizer = self.source.tokenizer
        self.model_name = config.model.served_model_name or self.source.name
        self.counters = EngineCounters()
        self._states: dict[str, RequestState] = {}  # the live requests
        check_combinations(config)
        self.ranks = start_engine_rank(config, self.source.spec, run_worker)
        try:
            parts = build_engine(
                config, self.source, self.ranks, self.model_name, self._states, self.counters, progress
            )
        except BaseException:
            self.close()
            raise
        self.device = self.ranks.device
        self.grammars = GrammarCompiler(self.tokenizer, self.source.spec.vocab_size)
        self.scheduler_config, self.max_model_len = parts.scheduler_config, parts.max_model_len
        self.kv_layout, self.num_kv_blocks = parts.kv_layout, parts.num_kv_blocks
        self.load_seconds = parts.load_seconds
        self.runner = parts.runner
        self.preemption, self.offloader = parts.preemption, parts.offloader
        self.kv_manager, self.scheduler = parts.kv_manager, parts.scheduler
        self.hooks = parts.hooks
        self.output_builder = OutputBuilder(self.tokenizer, self.scheduler, self._states, self.counters)

    def check_health(self, wait: float = 0.0) -> None:
        """Raise WorkerGroupError if a tensor-parallel worker has died (checked between steps, and while idle), after
        up to ``wait`` seconds for one to exit."""
        self.ranks.check(wait)

    def close(self) -> None:
        """Finish writing the prefix-cache disk tier and stop the tensor-parallel workers, if any; the engine runs no
        more steps."""
        if getattr(self, "offloader", None) is not None:  # None too when start-up failed before it was built
            self.offloader.close()
        self.ranks.close()

    # ------------------------------------------------------------------ requests
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        priority: int = 0,
    ) -> None:
        """Queue a request. Raises InvalidParameter or RequestRejected (both ValueError) for bad input."""
        if request_id in self._states:
            raise InvalidParameter("request_id", f"request id {request_id!r} is already in use")
        params.validate(self.source.spec.vocab_size)
        if any(not 0 <= t < self.source.spec.vocab_size for t in prompt_token_ids):
            raise InvalidParameter("prompt", "prompt contains token ids outside the vocabulary")
        max_tokens = params.max_tokens or max(self.max_model_len - len(prompt_token_ids), 1)
        arrival = time.monotonic() if arrival_time is None else arrival_time
        request = Request(
            request_id=request_id,
            prompt_token_ids=list(prompt_token_ids),
            max_tokens=max_tokens,
            eos_token_ids=frozenset() if params.ignore_eos else self.tokenizer.eos_token_ids,
            stop_token_ids=frozenset(params.stop_token_ids),
            min_tokens=params.min_tokens,
            arrival_time=arrival,
            priority=priority,
            skip_prefix_cache=params.prompt_logprobs is not None,
        )
        # Everything that can fail comes before the scheduler takes the request, so a refusal leaves no trace.
        generator = None
        if params.seed is not None and not params.greedy:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        constraint = params.structured_outputs
        row = SamplingRow(
            params,
            generator,
            request.prompt_token_ids,
            request.output_token_ids,
            self.tokenizer.eos_token_ids,
            None if constraint is None else self.grammars.matcher(constraint),
        )
        detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            request.prompt_token_ids,
            skip_special_tokens=params.skip_special_tokens,
            stop=params.stop,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )
        self.scheduler.add_request(request)
        self._states[request_id] = RequestState(request, params, row, detokenizer, RequestTimes(arrival))

    def abort_request(self, request_id: str) -> None:
        """Stop a request at once and free its KV blocks; unknown or finished ids are ignored."""
        if self._states.pop(request_id, None) is not None:
            self.scheduler.finish_request(request_id, FinishReason.ABORT)
            self.output_builder.count_finished(FinishReason.ABORT.value)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def is_queue_full(self) -> bool:
        """Whether as many requests wait as ``max_waiting_requests`` allows (never, without that bound)."""
        return self.scheduler.is_queue_full()

    def stats(self) -> SchedulerStats:
        return self.scheduler.stats()

    # ------------------------------------------------------------------ stepping
    def step(self) -> list[RequestOutput]:
        """Run one model step over the scheduled batch; report every request that got tokens or finished."""
        self.check_health()
        scheduled = self.scheduler.schedule(self.hooks.draft_lengths())
        scheduled = self.hooks.before_step(scheduled)
        self.output_builder.step_started(scheduled)
        sampled, failures = self._run(scheduled)
        self.hooks.after_run(scheduled, sampled)
        updates = self.scheduler.update(scheduled, {rid: [t.token_id for t in toks] for rid, toks in sampled.items()})
        self.hooks.after_update(scheduled)
        return self.output_builder.build(updates, sampled, failures)

    def _run(self, scheduled: SchedulerOutput) -> tuple[dict[str, list[SampledToken]], dict[str, str]]:
        """The model over the step's batch: the tokens sampled per request, and the requests that failed (request
        id -> error message), which the scheduler has finished with ERROR."""
        if not scheduled.scheduled:
            return {}, {}
        states = self._states
        prompt_logprobs_from = {
            rid: len(s.prompt_logprobs) for rid, s in states.items() if s.params.prompt_logprobs is not None
        }
        rows = {rid: s.row for rid, s in states.items()}
        started = time.perf_counter()
        sampled, prompt_logprobs, failures = self._execute_isolating(
            scheduled, scheduled.scheduled, rows, prompt_logprobs_from
        )
        self._observe_prefill(scheduled, time.perf_counter() - started)
        failures |= self._grammar_failures(sampled)
        for rid in failures:
            self.scheduler.finish_request(rid, FinishReason.ERROR)
        for rid, entries in prompt_logprobs.items():
            states[rid].prompt_logprobs.extend(entries)
        return sampled, failures

    def _execute_isolating(
        self,
        scheduled: SchedulerOutput,
        items: list[ScheduledRequest],
        rows: dict[str, SamplingRow],
        prompt_logprobs_from: dict[str, int],
    ) -> tuple[dict[str, list[SampledToken]], dict[str, list[SampledToken]], dict[str, str]]:
        """Run ``items`` as one batch; if that raises, bisect the batch so only the requests that fail on their own
        are failed (third result: request id -> error message) and the others get their tokens.

        Re-running is safe: K/V rows are rewritten with the same values at the same slots, and sampling (which
        advances seeded generators and grammar matchers) comes last, so a raising run has not consumed them. (An
        attention-scored KV policy may record a retried chunk's queries twice: its scores then weigh them double.)
        """
        if len(items) < len(scheduled.scheduled):
            self.counters.step_reruns += 1
        try:
            sampled, prompt_logprobs = self.runner.execute(
                dataclasses.replace(scheduled, scheduled=items), rows, prompt_logprobs_from
            )
            return sampled, prompt_logprobs, {}
        except WorkerGroupError:
            # A worker's exit explains the failure better than the collective's error does. A killed worker's
            # connections close a moment before the process can be reaped, so give it that moment.
            self.check_health(wait=_WORKER_EXIT_GRACE_SECONDS)
            raise  # the ranks are out of step: no request can run any more
        except Exception as exc:
            if len(items) == 1:
                logger.exception("model step failed for request %s", items[0].request_id)
                return {}, {}, {items[0].request_id: f"model step failed: {exc}"}
            logger.warning("a model step of %d requests failed (%s); isolating the failing requests", len(items), exc)
        half = len(items) // 2
        first = self._execute_isolating(scheduled, items[:half], rows, prompt_logprobs_from)
        second = self._execute_isolating(scheduled, items[half:], rows, prompt_logprobs_from)
        return first[0] | second[0], first[1] | second[1], first[2] | second[2]

    def _grammar_failures(self, sampled: dict[str, list[SampledToken]]) -> dict[str, str]:
        """The requests whose grammar failed while sampling (the sampler marks their rows rather than failing the
        step): request id -> error naming the constraint's parameter. Their tokens are dropped from ``sampled``."""
        failures = {}
        for rid in [rid for rid in sampled if self._states[rid].row.grammar_error is not None]:
            state = self._states[rid]
            failures[rid] = f"invalid {state.failed_grammar_param}: {state.row.grammar_error}"
            del sampled[rid]
        return failures

    def _observe_prefill(self, scheduled: SchedulerOutput, seconds: float) -> None:
        """Feed the preemption policy's recompute estimate from steps that were mostly prefill."""
        prefill_tokens = sum(len(item.token_ids) for item in scheduled.scheduled if len(item.token_ids) > 1)
        if prefill_tokens >= _MIN_PREFILL_TOKENS_TIMED and prefill_tokens * 2 >= scheduled.num_batched_tokens:
            self.preemption.observe_prefill(scheduled.num_batched_tokens, seconds)
