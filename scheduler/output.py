"""Plain data exchanged between the scheduler, the model runner and the engine."""

from dataclasses import dataclass, field

from scheduler.request import FinishReason


@dataclass(frozen=True)
class ScheduledRequest:
    request_id: str
    # Tokens whose KV is computed this step: a prefill chunk, or the one decode token followed by draft tokens.
    token_ids: list[int]
    start_position: int  # position of token_ids[0] (the request's num_computed_tokens before this step)
    cache_position: int  # the KV-cache row token_ids[0] is written to (start_position less evicted tokens)
    block_table: list[int]  # the request's whole block table after allocation (a copy)
    sample: bool  # the chunk reaches the end of the known tokens, so the runner samples the next token
    num_draft_tokens: int = 0  # the last ones of token_ids are drafts: the runner verifies them
    # Rows reserved after token_ids (schedule()'s draft_lengths) for drafts not yet filled in (Scheduler.fill_drafts).
    num_draft_slots: int = 0


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    num_batched_tokens: int
    preempted_request_ids: list[str]
    finished_request_ids: list[str]  # finished or aborted since the previous schedule(): drop their runner state
    # KV moves the runner makes before the step's forward, in this order (the blocks of a swapped-out request may be
    # reallocated in the same step): (block id, swap slot) to copy out, (swap slot, block id) to copy back in,
    # (block hash, block id) to fill from the prefix store.
    swap_out: list[tuple[int, int]] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    load_blocks: list[tuple[int, int]] = field(default_factory=list)


@dataclass(frozen=True)
class RequestUpdate:
    """What one step did to a request: the tokens it received and, if it ended, why."""

    request_id: str
    new_token_ids: list[int]
    finish_reason: FinishReason | None


@dataclass(frozen=True)
class SchedulerStats:
    """A snapshot for metrics; counters are cumulative."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    prefix_cache_queries: int
    prefix_cache_hits: int
    num_preemptions: int
    num_free_blocks: int
    num_blocks: int
    num_swap_preemptions: int = 0  # of num_preemptions, those swapped out rather than recomputed
    num_swap_slots: int = 0
    num_free_swap_slots: int = 0
