"""The interface every drafter implements: cheap guesses of each speculating request's next tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class DraftRequest:
    request_id: str
    token_ids: Sequence[int]  # prompt then output, up to the last sampled token
    max_draft_tokens: int  # propose at most this many (the rows the step reserved)
    # The request's block table, covering its last sampled token and max_draft_tokens rows after it: a drafter with
    # its own KV writes its rows there (engine/spec/model_drafter.py).
    block_table: Sequence[int] = field(default=())


class Drafter(Protocol):
    """Proposes linear drafts for a step's speculating requests at once (so a draft model can batch them).

    A drafter proposes a single most likely continuation (a point mass), which is what the verifier's acceptance
    rule assumes.
    """

    name: str
    # Whether the drafter stops a draft itself where its distribution says acceptance is unlikely; a drafter
    # without one (n-gram) is paused by the engine per request from its acceptance history instead.
    stops_on_entropy: bool

    def propose(self, requests: Sequence[DraftRequest]) -> dict[str, list[int]]:
        """Draft tokens per request id; a request may get none (or be left out)."""
        ...

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop what the drafter keeps of these requests (finished or preempted: their KV rows are gone)."""
        ...
