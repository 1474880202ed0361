"""The interface every drafter implements: cheap guesses of each speculating request's next tokens."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class DraftRequest:
    request_id: str
    token_ids: Sequence[int]  # prompt then output, up to the last sampled token
    max_draft_tokens: int  # propose at most this many


class Drafter(Protocol):
    """Proposes linear drafts for a step's speculating requests at once (so a draft model can batch them).

    A drafter proposes a single most likely continuation (a point mass), which is what the verifier's acceptance
    rule assumes.
    """

    name: str

    def propose(self, requests: Sequence[DraftRequest]) -> dict[str, list[int]]:
        """Draft tokens per request id; a request may get none (or be left out)."""
        ...
