"""Per-request state shared by the scheduler and the KV-cache manager."""

import enum
import time
from collections.abc import Sequence
from dataclasses import dataclass, field


class RequestStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    PREEMPTED = enum.auto()
    FINISHED = enum.auto()


class FinishReason(str, enum.Enum):
    STOP = "stop"
    LENGTH = "length"
    ABORT = "abort"
    ERROR = "error"


@dataclass(eq=False)  # identity equality: two requests with equal fields are still different requests
class Request:
    """A generation request and its progress.

    The KV cache must hold every token of ``all_token_ids`` except the last sampled one, which is computed in the next
    step together with the token it produces.
    """

    request_id: str
    prompt_token_ids: list[int]
    max_tokens: int
    eos_token_ids: frozenset[int] = frozenset()
    stop_token_ids: frozenset[int] = frozenset()
    min_tokens: int = 0
    arrival_time: float = field(default_factory=time.monotonic)
    priority: int = 0
    # Compute every prompt position even if cached (for prompt logprobs); its blocks are still registered for others.
    skip_prefix_cache: bool = False
    output_token_ids: list[int] = field(default_factory=list, init=False)
    num_computed_tokens: int = field(default=0, init=False)
    # Computed tokens whose KV a KV policy dropped or merged away: the cache holds num_kv_tokens rows, and positions
    # still count every token.
    num_evicted_tokens: int = field(default=0, init=False)
    status: RequestStatus = field(default=RequestStatus.WAITING, init=False)
    finish_reason: FinishReason | None = field(default=None, init=False)
    num_cached_prompt_tokens: int = field(default=0, init=False)
    num_preemptions: int = field(default=0, init=False)
    # Swap slots holding the KV of a request preempted by swapping, block by block; empty otherwise.
    swap_slots: list[int] = field(default_factory=list, init=False, repr=False)
    # Chained hashes of the full blocks of all_token_ids, extended by the KV-cache manager as tokens arrive.
    block_hashes: list[int] = field(default_factory=list, init=False, repr=False)
    _all_token_ids: list[int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._all_token_ids = list(self.prompt_token_ids)

    @property
    def all_token_ids(self) -> Sequence[int]:
        """Prompt followed by outputs; a read-only view kept up to date without re-concatenating."""
        return self._all_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self._all_token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Rows the request's KV cache holds."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output_tokens(self, tokens: list[int]) -> None:
        self.output_token_ids.extend(tokens)
        self._all_token_ids.extend(tokens)
