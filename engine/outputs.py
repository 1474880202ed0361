"""What the engine reports: about a request after each step and at its end, and cumulative counters for metrics."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.kv_offload import DiskStoreCounters, SwapCounters
from engine.sampler import SampledToken


@dataclass
class RequestTimes:
    """Wall-clock (time.monotonic) timestamps of one request's life."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    tokens: list[float] = field(default_factory=list)
    finished: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[SampledToken]
    num_output_tokens: int
    # With SamplingParams.prompt_logprobs, on the first output only: entries for prompt tokens 1.. (the first has none).
    prompt_logprobs: list[SampledToken] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None
    # With error: the request parameter whose value failed it (the client's error, e.g. a grammar that fails once
    # decoding); None when the engine failed.
    error_param: str | None = None
    num_cached_tokens: int = 0
    times: RequestTimes | None = None


@dataclass
class EngineCounters:
    """Cumulative token counts and finished requests by reason, for metrics; each step hook (engine/step_hooks/)
    keeps its feature's fields up to date."""

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
