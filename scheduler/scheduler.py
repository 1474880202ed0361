"""Continuous batching: decides each step which tokens of which requests the model computes."""

import dataclasses
from collections.abc import Mapping

from scheduler.config import SchedulerConfig
from scheduler.errors import RequestRejected
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.output import RequestUpdate, ScheduledRequest, SchedulerOutput, SchedulerStats
from scheduler.preemption import PreemptionPolicy
from scheduler.request import FinishReason, Request, RequestStatus
from scheduler.waiting_queue import WaitingQueue


class Scheduler:
    """Running requests first (decodes and unfinished chunked prefills), then new admissions, under a token budget.

    ``schedule()`` advances ``num_computed_tokens`` for everything it schedules: the runner is committed to compute
    those tokens before the matching ``update()``, which only appends sampled tokens and registers full blocks.
    Each ``schedule()`` must be followed by ``update()`` with its output before the next one.
    """

    def __init__(
        self,
        config: SchedulerConfig,
        kv_cache_manager: KVCacheManager,
        kv_token_budget: int | None = None,
        preemption: PreemptionPolicy | None = None,
    ) -> None:
        """``kv_token_budget``: with a KV policy that evicts, the rows it keeps per request after each compaction.
        ``preemption``: whether preempted requests are swapped out or recomputed (None: always recomputed)."""
        if config.max_model_len is None:
            raise ValueError("SchedulerConfig.max_model_len must be resolved (to the model's context) before use")
        self.config = config
        self.max_model_len: int = config.max_model_len
        self.kv_cache_manager = kv_cache_manager
        self.kv_token_budget = kv_token_budget
        self.preemption = preemption
        self.waiting = WaitingQueue()
        self.running: list[Request] = []  # admission order; the last one is preempted first
        self._requests: dict[str, Request] = {}  # waiting and running
        self._finished_ids: list[str] = []  # since the previous schedule()
        self._num_preemptions = 0
        self._num_swap_preemptions = 0
        self._swap_out: list[tuple[int, int]] = []  # (block, slot) pairs of this schedule()'s swapped-out requests
        self._swap_in: list[tuple[int, int]] = []  # (slot, block) pairs of its swapped-in ones

    def add_request(self, request: Request) -> None:
        """Queue a request, or raise RequestRejected if it could never be served."""
        self._validate(request)
        self._requests[request.request_id] = request
        self.waiting.push(request)

    def schedule(self, draft_lengths: Mapping[str, int] | None = None) -> SchedulerOutput:
        """The next step's batch. ``draft_lengths``: rows to reserve for draft tokens after a decoding request's token,
        by request id (speculative decoding); ``fill_drafts()`` puts the drafts in before the step runs."""
        budget = self.config.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[str] = []

        # Running requests in admission order; make room by preempting the most recently admitted.
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            num_new = min(self._cap(request.num_tokens - request.num_computed_tokens), budget)
            while self.kv_cache_manager.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is request:
                    break
            else:
                scheduled.append(self._commit(request, num_new))
                budget -= num_new
                i += 1

        # Blocks are short after a preemption: then no rows are reserved for drafts.
        budget -= self._reserve_draft_slots(scheduled, 0 if preempted else budget, draft_lengths or {})

        # Admit waiting requests in queue order; never preempt for them, and skip admission after a preemption.
        # (So a step never swaps in a slot that a swap-out of the same step could take.)
        while not preempted and self.waiting and len(self.running) < self.config.max_num_seqs and budget > 0:
            request = self.waiting.peek()
            computed_blocks, stored_hashes, num_cached = self._lookup_prefix(request)
            num_new = self._cap(request.num_tokens - num_cached)
            if num_new > budget and not self.config.enable_chunked_prefill:
                break
            num_new = min(num_new, budget)
            if self.kv_cache_manager.allocate_slots(request, num_new, computed_blocks, stored_hashes) is None:
                break
            self.waiting.pop()
            request.status = RequestStatus.RUNNING
            if request.swap_slots:
                table = self.kv_cache_manager.block_table(request.request_id)
                self._swap_in.extend(zip(request.swap_slots, table))
                request.swap_slots = []  # the slots are freed in update(), once the runner has read them
            else:
                request.num_computed_tokens = request.num_cached_prompt_tokens = num_cached
            self.running.append(request)
            scheduled.append(self._commit(request, num_new))
            budget -= num_new

        finished, self._finished_ids = self._finished_ids, []
        swap_out, self._swap_out = self._swap_out, []
        swap_in, self._swap_in = self._swap_in, []
        return SchedulerOutput(
            scheduled,
            self.config.max_num_batched_tokens - budget,
            preempted,
            finished,
            swap_out=swap_out,
            swap_in=swap_in,
            load_blocks=self.kv_cache_manager.take_loads(),
        )

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[str, list[int]]) -> list[RequestUpdate]:
        """Apply a computed step: sampled tokens for requests with ``sample``, stop checks, prefix-cache registration.

        ``sampled_token_ids`` maps every scheduled request with ``sample`` to its new tokens (several under speculative
        decoding: the accepted drafts, then the target's own token). Requests finished since ``schedule()`` are
        skipped, so a runner failing one request reports it with ``finish_request(..., FinishReason.ERROR)`` first.
        """
        if output.swap_in:
            assert self.preemption is not None and self.preemption.swap_space is not None
            self.preemption.swap_space.free([slot for slot, _ in output.swap_in])
        updates = []
        for item in output.scheduled:
            request = self._requests.get(item.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue  # finished from outside after schedule()
            assert not item.num_draft_slots, "fill_drafts() must fill the reserved draft rows before the step runs"
            # Drafts' KV rows count only once accepted: drop them all here, and keep the accepted ones below.
            request.num_computed_tokens -= item.num_draft_tokens
            self.kv_cache_manager.cache_full_blocks(request)
            if not item.sample:
                continue
            new_token_ids: list[int] = []
            reason = None
            for token in sampled_token_ids[item.request_id]:
                request.append_output_tokens([token])
                new_token_ids.append(token)
                reason = self._stop_reason(request, token)
                if reason is not None:
                    self._finish(request, reason)
                    break
            if item.num_draft_tokens and reason is None:
                self._keep_accepted_drafts(request, item, new_token_ids)
            updates.append(RequestUpdate(request.request_id, new_token_ids, reason))
        return updates

    def finish_request(self, request_id: str, reason: FinishReason) -> None:
        """End a waiting or running request from outside (abort, stop string, error); unknown ids are ignored."""
        request = self._requests.get(request_id)
        if request is not None:
            self._finish(request, reason)

    def evict_kv(self, request_id: str, num_kv_tokens: int) -> None:
        """Record that a KV policy compacted the running request's cache to its first ``num_kv_tokens`` rows, and
        free the blocks past them. Call between ``update()`` and the next ``schedule()``."""
        request = self._requests[request_id]
        assert request.status is RequestStatus.RUNNING and 0 < num_kv_tokens <= request.num_kv_tokens
        request.num_evicted_tokens += request.num_kv_tokens - num_kv_tokens
        self.kv_cache_manager.trim(request, num_kv_tokens)

    def max_kv_tokens(self, num_tokens: int) -> int:
        """The most cache rows a request of ``num_tokens`` tokens (prompt plus output) ever holds at once."""
        if self.kv_token_budget is None:
            return num_tokens
        # Compaction runs after a step, once a block's worth of rows is over the budget: up to a block less one row
        # can wait over it, and the next step adds at most a full token budget (a prefill chunk) on top.
        slack = self.kv_cache_manager.block_size - 1
        return min(num_tokens, self.kv_token_budget + slack + self.config.max_num_batched_tokens)

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def is_queue_full(self) -> bool:
        limit = self.config.max_waiting_requests
        return limit is not None and len(self.waiting) >= limit

    def get_request(self, request_id: str) -> Request | None:
        """The waiting or running request with this id; None once finished."""
        return self._requests.get(request_id)

    def stats(self) -> SchedulerStats:
        kv = self.kv_cache_manager
        swap = self.preemption.swap_space if self.preemption is not None else None
        return SchedulerStats(
            num_running=len(self.running),
            num_waiting=len(self.waiting),
            kv_cache_usage=kv.usage,
            prefix_cache_queries=kv.prefix_cache_stats.queries,
            prefix_cache_hits=kv.prefix_cache_stats.hits,
            num_preemptions=self._num_preemptions,
            num_free_blocks=kv.num_free_blocks,
            num_blocks=kv.num_blocks,
            num_swap_preemptions=self._num_swap_preemptions,
            num_swap_slots=swap.num_slots if swap is not None else 0,
            num_free_swap_slots=swap.num_free_slots if swap is not None else 0,
        )

    def _validate(self, request: Request) -> None:
        rid, prompt_len, max_tokens = request.request_id, request.num_prompt_tokens, request.max_tokens
        max_model_len = self.max_model_len
        if rid in self._requests:
            raise RequestRejected(f"request {rid!r}: id already in use")
        if prompt_len == 0:
            raise RequestRejected(f"request {rid!r}: prompt is empty")
        if max_tokens < 1:
            raise RequestRejected(f"request {rid!r}: max_tokens must be >= 1, got {max_tokens}")
        if not 0 <= request.min_tokens <= max_tokens:
            raise RequestRejected(f"request {rid!r}: min_tokens ({request.min_tokens}) must be in [0, {max_tokens}]")
        if prompt_len > max_model_len - 1:
            raise RequestRejected(
                f"request {rid!r}: prompt has {prompt_len} tokens, more than max_model_len - 1 = {max_model_len - 1}"
            )
        if prompt_len + max_tokens > max_model_len:
            raise RequestRejected(
                f"request {rid!r}: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) = "
                f"{prompt_len + max_tokens} exceeds max_model_len ({max_model_len})"
            )
        kv = self.kv_cache_manager
        num_blocks = kv.num_blocks_needed(self.max_kv_tokens(prompt_len + max_tokens))
        if num_blocks > kv.num_blocks:
            raise RequestRejected(
                f"request {rid!r}: prompt ({prompt_len} tokens) + max_tokens ({max_tokens}) needs {num_blocks} "
                f"KV-cache blocks of {kv.block_size} tokens, but the pool has only {kv.num_blocks}"
            )

    def _cap(self, num_tokens: int) -> int:
        """Limit one request's tokens per step so a long prefill cannot take the whole budget."""
        threshold = self.config.long_prefill_token_threshold
        return min(num_tokens, threshold) if threshold else num_tokens

    def _commit(self, request: Request, num_new: int) -> ScheduledRequest:
        start = request.num_computed_tokens
        request.num_computed_tokens += num_new
        return ScheduledRequest(
            request_id=request.request_id,
            token_ids=list(request.all_token_ids[start : start + num_new]),
            start_position=start,
            cache_position=start - request.num_evicted_tokens,
            block_table=self.kv_cache_manager.block_table(request.request_id),
            sample=request.num_computed_tokens == request.num_tokens,
        )

    def _reserve_draft_slots(
        self, scheduled: list[ScheduledRequest], budget: int, draft_lengths: Mapping[str, int]
    ) -> int:
        """Reserve rows for the scheduled decodes' draft tokens (up to ``draft_lengths`` of each), within ``budget``
        tokens and only from free blocks (so speculation never preempts a request). Returns the rows reserved."""
        added = 0
        for index, item in enumerate(scheduled):
            wanted = draft_lengths.get(item.request_id, 0)
            if not (wanted and item.sample and len(item.token_ids) == 1 and added < budget):
                continue
            request = self._requests[item.request_id]
            # Drafts past max_tokens less one could never be kept (the target adds a token after the accepted
            # ones); the cut also keeps every position inside the context and the blocks _validate accounted for.
            room = min(self._cap(budget - added + 1), request.max_tokens - request.num_output_tokens) - 1
            slots = min(wanted, room)
            if slots < 1 or self.kv_cache_manager.allocate_slots(request, slots) is None:
                continue
            request.num_computed_tokens += slots
            added += slots
            scheduled[index] = dataclasses.replace(
                item, block_table=self.kv_cache_manager.block_table(request.request_id), num_draft_slots=slots
            )
        return added

    def fill_drafts(self, output: SchedulerOutput, drafts: dict[str, list[int]]) -> SchedulerOutput:
        """Put the drafter's tokens into the rows ``schedule()`` reserved (at most that many per request; none for
        a request left out) and give back the rows and blocks left unused. Call before running the step."""
        scheduled, num_unused = [], 0
        for item in output.scheduled:
            if not item.num_draft_slots:
                scheduled.append(item)
                continue
            request = self._requests[item.request_id]
            draft = list(drafts.get(item.request_id, ()))[: item.num_draft_slots]
            unused = item.num_draft_slots - len(draft)
            num_unused += unused
            if unused:
                request.num_computed_tokens -= unused
                self.kv_cache_manager.free_unused(request)
            scheduled.append(
                dataclasses.replace(
                    item,
                    token_ids=item.token_ids + draft,
                    block_table=self.kv_cache_manager.block_table(request.request_id),
                    num_draft_tokens=len(draft),
                    num_draft_slots=0,
                )
            )
        return dataclasses.replace(
            output, scheduled=scheduled, num_batched_tokens=output.num_batched_tokens - num_unused
        )

    def _keep_accepted_drafts(self, request: Request, item: ScheduledRequest, new_token_ids: list[int]) -> None:
        """Count the accepted drafts' KV rows as computed again and free the blocks only rejected ones used."""
        accepted = len(new_token_ids) - 1
        drafts = item.token_ids[len(item.token_ids) - item.num_draft_tokens :]
        assert new_token_ids[:accepted] == drafts[:accepted], "only a prefix of the drafts can be accepted"
        request.num_computed_tokens += accepted
        self.kv_cache_manager.free_unused(request)
        self.kv_cache_manager.cache_full_blocks(request)

    def _lookup_prefix(self, request: Request) -> tuple[list[int] | None, list[int], int]:
        """What a waiting request already has: cached blocks in memory, hashes of the blocks after them found in the
        prefix store, and the tokens both cover. A swapped-out request has its own blocks to swap back in instead."""
        kv = self.kv_cache_manager
        if request.swap_slots:
            return None, [], request.num_computed_tokens
        if request.skip_prefix_cache:
            return [], [], 0
        computed_blocks, num_cached = kv.get_computed_blocks(request)
        stored_hashes = kv.get_stored_blocks(request, len(computed_blocks))
        return computed_blocks, stored_hashes, num_cached + len(stored_hashes) * kv.block_size

    def _preempt(self, request: Request) -> None:
        """Take the request's blocks and requeue it. Swapped out, it resumes where it stopped once its blocks are
        swapped back in; otherwise it recomputes all its tokens on readmission, minus prefix hits."""
        kv = self.kv_cache_manager
        num_blocks = kv.num_blocks_needed(request.num_kv_tokens)
        slots = None
        if self.preemption is not None:
            slots = self.preemption.swap_slots(request.num_computed_tokens, num_blocks)
        if slots is not None:
            self._swap_out.extend(zip(kv.block_table(request.request_id), slots))
            request.swap_slots = slots
            self._num_swap_preemptions += 1
        else:
            request.num_computed_tokens = request.num_evicted_tokens = 0
        kv.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.push_front(request)

    def _stop_reason(self, request: Request, token: int) -> FinishReason | None:
        """Check a just-appended token: stop/EOS tokens (once min_tokens are out), then the length limits."""
        if request.num_output_tokens >= request.min_tokens and (
            token in request.stop_token_ids or token in request.eos_token_ids
        ):
            return FinishReason.STOP
        if request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            return FinishReason.LENGTH
        return None

    def _finish(self, request: Request, reason: FinishReason) -> None:
        """Take the request out of its queue and free its blocks at once; the next schedule() reports it."""
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)
        else:
            self.waiting.remove(request)
        request.status = RequestStatus.FINISHED
        request.finish_reason = reason
        self.kv_cache_manager.free(request)
        if request.swap_slots:
            assert self.preemption is not None and self.preemption.swap_space is not None
            self.preemption.swap_space.free(request.swap_slots)
            request.swap_slots = []
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)
