"""The synchronous engine: admits requests, runs scheduled steps, and turns sampled tokens into outputs."""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field

import torch

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.errors import ConfigError, WorkerGroupError
from engine.kv_cache import KVCacheLayout, allocate_kv_cache
from engine.kv_offload import DiskStoreCounters, SwapCounters, build_offload, check_swap_space
from engine.kv_policy import EvictionPolicy, KVCompactor, PageSelectionPolicy, QueryRecorder
from engine.loader import ModelSource, open_model
from engine.model_setup import build_runner, plan_kv_cache
from engine.model_spec import ModelSpec
from engine.outputs import RequestOutput, RequestTimes
from engine.parallel.launch import start_engine_rank
from engine.sampler import SampledToken, SamplingRow
from engine.sampling_params import InvalidParameter, SamplingParams
from engine.spec import DraftRequest
from engine.spec.draft_length import DraftLengthController
from engine.spec.draft_model import open_draft_model
from engine.spec.registry import build_drafter
from engine.structured.compiler import GrammarCompiler
from kernels.native import INT8_ACTIVATIONS
from kernels.page_selecting_backend import PageSelectingBackend
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import RequestUpdate, ScheduledRequest, SchedulerOutput, SchedulerStats
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.scheduler import Scheduler

logger = logging.getLogger("spindle.engine")

# A step is timed for the preemption policy's prefill rate when at least this many of its tokens are prefill.
_MIN_PREFILL_TOKENS_TIMED = 64
_WORKER_EXIT_GRACE_SECONDS = 2.0  # after a failed collective, how long a dying worker may take to exit


def _describe_int4(rows: int, activations: torch.dtype) -> str:
    if not rows:
        return "none"
    quantized = " with int8-quantized activations" if activations == INT8_ACTIVATIONS else ""
    return f"steps of up to {rows} tokens{quantized}"


@dataclass
class _RequestState:
    """Engine-side state of a live request, beside the scheduler's ``Request``."""

    request: Request
    params: SamplingParams
    row: SamplingRow
    detokenizer: IncrementalDetokenizer
    times: RequestTimes
    speculate: bool  # a drafter proposes tokens for it
    # Prompt logprobs recorded so far (when asked for); their count is where recording resumes after a preemption.
    prompt_logprobs: list[SampledToken] = field(default_factory=list)


@dataclass
class EngineCounters:
    """Cumulative token counts and finished requests by reason, for metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    finished: dict[str, int] = field(default_factory=dict)
    kv_compactions: int = 0  # times a KV policy compacted a request's cache
    kv_evicted_tokens: int = 0  # KV rows those compactions dropped or merged away
    page_selection_decodes: int = 0  # decode rows attended under page selection
    page_selection_blocks_read: int = 0  # KV blocks they read (per layer)
    page_selection_blocks_held: int = 0  # KV blocks their sequences held: what full attention would have read
    spec_drafts: int = 0  # request steps that verified drafts
    spec_draft_tokens: int = 0  # draft tokens verified
    spec_accepted_tokens: int = 0  # of those, accepted
    step_reruns: int = 0  # model runs over part of a failed step's batch, to find the requests that failed it
    swap: SwapCounters = field(default_factory=SwapCounters)  # bytes moved by swap preemption
    disk: DiskStoreCounters = field(default_factory=DiskStoreCounters)  # the prefix-cache disk tier


class LLMEngine:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None, progress: bool = True) -> None:
        self.config = config
        runtime = config.runtime
        self.source = source or open_model(config.model.model)
        self.tokenizer = self.source.tokenizer
        self.model_name = config.model.served_model_name or self.source.name
        spec = self.source.spec
        policy = config.cache.eviction_policy()
        if policy is not None and runtime.tensor_parallel_size > 1:
            # The compactor rewrites every KV head's rows on one rank, from that rank's queries.
            raise ConfigError("a kv_policy cannot be combined with tensor_parallel_size > 1")
        offload = config.cache.preemption_mode != "recompute" or config.cache.kv_disk_dir is not None
        if offload and (runtime.tensor_parallel_size > 1 or config.cache.codec_settings().active):
            # The offloader copies rank 0's blocks as stored; codec blocks keep state outside them (residuals).
            raise ConfigError(
                "preemption_mode swap/auto and kv_disk_dir need tensor_parallel_size 1 and no block codec"
            )
        method = config.speculative.speculative_method
        if method in ("layer_skip", "sparse_mlp", "draft_model") and runtime.tensor_parallel_size > 1:
            # The drafter runs on rank 0 alone, over the target's layers or a model of its own.
            raise ConfigError(f"speculative_method {method} needs tensor_parallel_size 1")
        if offload and method == "draft_model":
            raise ConfigError("preemption_mode swap/auto and kv_disk_dir cannot be combined with a draft model")
        if offload and config.cache.page_selection() is not None:
            raise ConfigError("preemption_mode swap/auto and kv_disk_dir cannot be combined with kv_policy quest")
        if config.cache.codec_settings().active and runtime.tensor_parallel_size > 1:
            raise ConfigError(
                "block codecs (kv_codec, kv_key_channel_keep) cannot be combined with tensor_parallel_size > 1"
            )
        self.ranks = start_engine_rank(config, spec)
        try:
            self._build(config, spec, policy, progress)
        except BaseException:
            self.close()
            raise

    def _build(self, config: EngineConfig, spec: ModelSpec, policy: EvictionPolicy | None, progress: bool) -> None:
        torch.set_num_threads(self.ranks.num_threads)
        self.device = self.ranks.device
        self.grammars = GrammarCompiler(self.tokenizer, spec.vocab_size)
        dtype = config.model.torch_dtype
        speculative = config.speculative
        draft_source = draft_layout = None
        if speculative.draft_model is not None:
            if config.cache.kv_cache_dtype != "auto":
                raise ConfigError("speculative_method draft_model needs kv_cache_dtype auto")
            draft_source = open_draft_model(speculative.draft_model, self.source)
            draft_layout = KVCacheLayout.for_model(draft_source.spec, config.cache.block_size, dtype)
        # A draft model's KV rows live in the same blocks as the target's: each block pays for both.
        draft_bytes = 0 if draft_layout is None else draft_layout.bytes_per_block
        kv_plan = plan_kv_cache(config, spec, self.ranks.tp.shard, draft_bytes)
        layout, num_blocks = kv_plan.layout, kv_plan.num_blocks
        codecs, num_slots = kv_plan.codecs, kv_plan.num_residual_slots
        check_swap_space(config.cache, layout)  # a configuration error before the slow model load
        page_selection = config.cache.page_selection()
        max_model_len = self._resolve_max_model_len(
            config.scheduler.max_model_len, num_blocks * layout.block_size if policy is None else None
        )
        self.scheduler_config = dataclasses.replace(config.scheduler, max_model_len=max_model_len)
        self.max_model_len = max_model_len
        self.kv_layout = layout
        self.num_kv_blocks = num_blocks
        recorder = None
        if policy is not None and policy.uses_queries:
            recorder = QueryRecorder(config.cache.kv_observation_window)
        started = time.monotonic()
        self.runner = build_runner(config, self.source, kv_plan, self.ranks.tp, self.device, progress, recorder)
        self.ranks.tp.barrier()  # the workers have loaded their shards too
        self.load_seconds = time.monotonic() - started
        kv_caches = self.runner.kv_caches
        backend = self.runner.backend
        self.page_selector = backend if isinstance(backend, PageSelectingBackend) else None
        prefix_caching = config.cache.enable_prefix_caching
        if codecs.prunes_keys and prefix_caching:
            logger.info("prefix caching off: ThinK picks each block's key channels by the request's own queries")
            prefix_caching = False
        self.compactor: KVCompactor | None = None
        if policy is not None:
            self.compactor = KVCompactor(policy, kv_caches, layout.block_size, dtype, spec.head_dim**-0.5, recorder)
            if prefix_caching:
                logger.info("prefix caching off: kv_policy %s rewrites each request's blocks in place", policy.name)
                prefix_caching = False
        if draft_source is not None and draft_source.spec.max_position_embeddings < max_model_len:
            raise ConfigError(
                f"draft_model {speculative.draft_model}: context of "
                f"{draft_source.spec.max_position_embeddings} tokens, "
                f"shorter than max_model_len {max_model_len}: lower max_model_len"
            )
        self.drafter = build_drafter(
            speculative,
            self.runner.model,
            backend,
            kv_caches,
            layout.block_size,
            self.device,
            draft_source,
            None if draft_layout is None else allocate_kv_cache(draft_layout, num_blocks, self.device),
        )
        self.draft_lengths = DraftLengthController(
            speculative.num_speculative_tokens,
            speculative.max_speculative_tokens,
            speculative.adaptive_draft_length,
            speculative.draft_min_acceptance,
            pause_on_low_acceptance=self.drafter is not None and not self.drafter.stops_on_entropy,
        )
        if self.drafter is not None and policy is not None:
            # A compaction moves KV rows that rejected drafts would then have to give back.
            raise ConfigError("speculative decoding cannot be combined with a kv_policy")
        if self.drafter is not None and codecs.active:
            # Drafts that fill a block seal it; rejecting them would need the block's rows back in full precision.
            raise ConfigError(f"speculative decoding cannot be combined with block codecs ({codecs.describe()})")
        if config.cache.kv_disk_dir is not None and not prefix_caching:
            logger.info("prefix-cache disk tier off: it needs prefix caching")
        int4_rows = config.model.int4_rows(self.source.linear_weights_are_q4_1, self.device)
        self.preemption, self.offloader = build_offload(
            config.cache, layout, kv_caches, self.source, prefix_caching, int4_rows, config.model.int4_activations
        )
        disk_store = self.offloader.disk_store if self.offloader is not None else None
        self.kv_manager = KVCacheManager(num_blocks, layout.block_size, prefix_caching, disk_store)
        self.scheduler = Scheduler(
            self.scheduler_config, self.kv_manager, None if policy is None else policy.budget, self.preemption
        )
        if self.scheduler.max_kv_tokens(max_model_len) > num_blocks * layout.block_size:  # only under a policy
            raise ConfigError(
                f"kv_budget {config.cache.kv_budget} plus one step's tokens does not fit the KV cache "
                f"({num_blocks * layout.block_size} tokens): raise kv_cache_memory, or lower kv_budget or "
                "max_num_batched_tokens"
            )
        self.counters = EngineCounters()
        if self.offloader is not None:
            self.counters.swap = self.offloader.counters
        if disk_store is not None:
            self.counters.disk = disk_store.counters
        self._states: dict[str, _RequestState] = {}
        logger.info(
            "model %s loaded in %.1fs (%s, %s, %d tensor-parallel rank(s); 4-bit weight copies: %s); KV cache (%s, "
            "codec %s): %d blocks of %d tokens = %d tokens, %.1f MiB per rank (%.1f bytes per token) + %.1f MiB of "
            "full-precision residual; attention backend: %s; kv policy: %s; speculative decoding: %s; "
            "preemption: %s; disk tier: %s",
            self.model_name,
            self.load_seconds,
            str(dtype).removeprefix("torch."),
            self.device,
            self.ranks.tp.world_size,
            _describe_int4(int4_rows, config.model.int4_activations),
            layout.kv_cache_dtype,
            codecs.describe(),
            num_blocks,
            layout.block_size,
            num_blocks * layout.block_size,
            num_blocks * layout.bytes_per_block / 2**20,
            layout.bytes_per_token,
            layout.residual_bytes(num_slots) / 2**20,
            backend.name,
            self._policy_description(policy, page_selection),
            "off" if self.drafter is None else f"{self.drafter.name}, k={speculative.num_speculative_tokens}",
            config.cache.preemption_mode,
            "off" if disk_store is None else f"{disk_store.directory} ({disk_store.num_blocks} blocks stored)",
        )

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

    @staticmethod
    def _policy_description(policy: EvictionPolicy | None, page_selection: PageSelectionPolicy | None) -> str:
        if policy is not None:
            return f"{policy.name} (budget {policy.budget} rows per sequence)"
        if page_selection is not None:
            return f"{page_selection.name} (decode reads {page_selection.budget_blocks} blocks per sequence)"
        return "none"

    def _resolve_max_model_len(self, asked: int | None, kv_tokens: int | None) -> int:
        """The context window: as asked, else the model's own, capped so that one sequence fits the KV cache
        (``kv_tokens``; None when an eviction policy bounds each sequence's KV instead)."""
        model_len = self.source.spec.max_position_embeddings
        if kv_tokens is None:
            kv_tokens = model_len
        if asked is not None:
            if asked > model_len:
                raise ConfigError(f"max_model_len {asked} exceeds the model's context length {model_len}")
            if asked > kv_tokens:
                raise ConfigError(
                    f"max_model_len {asked} does not fit the KV cache ({kv_tokens} tokens): "
                    "raise kv_cache_memory or lower max_model_len"
                )
            return asked
        if kv_tokens < model_len:
            logger.warning("max_model_len capped at %d tokens, what the KV cache holds", kv_tokens)
        return min(model_len, kv_tokens)

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
        speculate = self.drafter is not None and params.can_speculate
        self._states[request_id] = _RequestState(request, params, row, detokenizer, RequestTimes(arrival), speculate)

    def abort_request(self, request_id: str) -> None:
        """Stop a request at once and free its KV blocks; unknown or finished ids are ignored."""
        if self._states.pop(request_id, None) is not None:
            self.scheduler.finish_request(request_id, FinishReason.ABORT)
            self._count_finished(FinishReason.ABORT.value)

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
        self._reserve_draft_rows()
        scheduled = self._fill_drafts(self.scheduler.schedule())
        if self.offloader is not None:
            self.offloader.before_step(scheduled)
        if not scheduled.scheduled:
            self.scheduler.update(scheduled, {})
            self._offload_after_step()
            return []
        now = time.monotonic()
        for item in scheduled.scheduled:
            times = self._states[item.request_id].times
            if times.first_scheduled is None:
                times.first_scheduled = now
            num_prompt = self._states[item.request_id].request.num_prompt_tokens
            end = item.start_position + len(item.token_ids)
            self.counters.prompt_tokens += max(0, min(end, num_prompt) - item.start_position)
        prompt_logprobs_from = {
            rid: len(s.prompt_logprobs) for rid, s in self._states.items() if s.params.prompt_logprobs is not None
        }
        rows = {rid: s.row for rid, s in self._states.items()}
        started = time.perf_counter()
        sampled, prompt_logprobs, failures = self._execute_isolating(
            scheduled, scheduled.scheduled, rows, prompt_logprobs_from
        )
        self._observe_prefill(scheduled, time.perf_counter() - started)
        failures |= self._grammar_failures(sampled)
        for rid in failures:
            self.scheduler.finish_request(rid, FinishReason.ERROR)
        for rid, entries in prompt_logprobs.items():
            self._states[rid].prompt_logprobs.extend(entries)
        self._count_drafts(scheduled, sampled)
        updates = self.scheduler.update(scheduled, {rid: [t.token_id for t in toks] for rid, toks in sampled.items()})
        self._offload_after_step()
        if self.compactor is not None:
            self.compactor.run(self.scheduler, scheduled)
            self.counters.kv_compactions = self.compactor.num_compactions
            self.counters.kv_evicted_tokens = self.compactor.num_evicted_tokens
        if self.page_selector is not None:
            self.counters.page_selection_decodes = self.page_selector.num_decodes
            self.counters.page_selection_blocks_read = self.page_selector.num_blocks_read
            self.counters.page_selection_blocks_held = self.page_selector.num_blocks_held
        finished_at = time.monotonic()
        outputs = [self._error_output(rid, message) for rid, message in failures.items()]
        for update in updates:
            try:
                outputs.append(self._make_output(update, sampled.get(update.request_id, []), finished_at))
            except Exception as exc:  # e.g. detokenising: this request fails, the others keep their tokens
                logger.exception("building the output of request %s failed", update.request_id)
                self.scheduler.finish_request(update.request_id, FinishReason.ERROR)
                outputs.append(self._error_output(update.request_id, f"output processing failed: {exc}"))
        return outputs

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
            failures[rid] = f"invalid {_failed_grammar_param(state)}: {state.row.grammar_error}"
            del sampled[rid]
        return failures

    def _observe_prefill(self, scheduled: SchedulerOutput, seconds: float) -> None:
        """Feed the preemption policy's recompute estimate from steps that were mostly prefill."""
        prefill_tokens = sum(len(item.token_ids) for item in scheduled.scheduled if len(item.token_ids) > 1)
        if prefill_tokens >= _MIN_PREFILL_TOKENS_TIMED and prefill_tokens * 2 >= scheduled.num_batched_tokens:
            self.preemption.observe_prefill(scheduled.num_batched_tokens, seconds)

    def _offload_after_step(self) -> None:
        if self.offloader is not None:
            self.offloader.after_step(self.kv_manager.take_registered())

    def _reserve_draft_rows(self) -> None:
        """Ask the scheduler for draft rows for every speculating request that is decoding, unless the batch is
        large enough that verifying drafts costs more than it saves (speculative_max_batch_size)."""
        if self.drafter is None:
            return
        cutoff = self.config.speculative.speculative_max_batch_size
        if cutoff is not None and self.scheduler.num_running > cutoff:
            return
        for rid, state in self._states.items():
            request = state.request
            if (
                state.speculate
                and request.status is RequestStatus.RUNNING
                and request.num_computed_tokens == request.num_tokens - 1
            ):
                request.num_draft_slots = self.draft_lengths.length(rid)

    def _fill_drafts(self, scheduled: SchedulerOutput) -> SchedulerOutput:
        """Draft the tokens for the rows ``schedule()`` reserved, and put them in."""
        if self.drafter is None:
            return scheduled
        gone = [*scheduled.preempted_request_ids, *scheduled.finished_request_ids]
        self.drafter.forget(gone)
        for rid in gone:
            self.draft_lengths.forget(rid)
        wanted = [
            DraftRequest(
                item.request_id,
                self._states[item.request_id].request.all_token_ids,
                item.num_draft_slots,
                item.block_table,
            )
            for item in scheduled.scheduled
            if item.num_draft_slots
        ]
        if not wanted:
            return scheduled
        return self.scheduler.fill_drafts(scheduled, self.drafter.propose(wanted))

    def _count_drafts(self, scheduled: SchedulerOutput, sampled: dict[str, list[SampledToken]]) -> None:
        for item in scheduled.scheduled:
            if item.num_draft_tokens and item.request_id in sampled:
                accepted = len(sampled[item.request_id]) - 1
                self.counters.spec_drafts += 1
                self.counters.spec_draft_tokens += item.num_draft_tokens
                self.counters.spec_accepted_tokens += accepted
                self.draft_lengths.observe(item.request_id, item.num_draft_tokens, accepted)

    def _make_output(self, update: RequestUpdate, tokens: list[SampledToken], now: float) -> RequestOutput:
        state = self._states[update.request_id]
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
            self._count_finished(output.finish_reason or "")
            del self._states[update.request_id]
        return output

    def _error_output(self, request_id: str, message: str) -> RequestOutput:
        """The last output of a request that failed; the scheduler has already finished it with ERROR."""
        state = self._states.pop(request_id)
        self._count_finished(FinishReason.ERROR.value)
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
            error_param=_failed_grammar_param(state),
            times=state.times,
        )

    def _count_finished(self, reason: str) -> None:
        self.counters.finished[reason] = self.counters.finished.get(reason, 0) + 1


def _failed_grammar_param(state: _RequestState) -> str | None:
    """The parameter of a request that its own grammar failed (the client's error); None for any other request."""
    constraint = state.params.structured_outputs
    return constraint.param if constraint is not None and state.row.grammar_error is not None else None
