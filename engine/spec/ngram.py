"""Prompt lookup: draft the tokens that followed the latest earlier occurrence of the request's last n tokens."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from engine.spec.drafter import DraftRequest

# Only the most recent tokens are searched, so drafting costs the same however long the sequence grows.
SEARCH_WINDOW = 4096


class NgramDrafter:
    name = "ngram"
    stops_on_entropy = False

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max

    def propose(self, requests: Sequence[DraftRequest]) -> dict[str, list[int]]:
        return {r.request_id: self.propose_one(r.token_ids, r.max_draft_tokens) for r in requests}

    def forget(self, request_ids: Iterable[str]) -> None:
        pass  # keeps nothing between steps

    def propose_one(self, token_ids: Sequence[int], max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens after the latest earlier match of the longest suffix n-gram (n from
        ``ngram_max`` down to ``ngram_min``); none if no suffix of ``ngram_min`` tokens occurred before."""
        tokens = np.asarray(token_ids[-SEARCH_WINDOW:])
        last = len(tokens) - 1
        if max_tokens < 1 or last < self.ngram_min:
            return []
        # Candidate match ends: earlier positions holding the last token. Grow every candidate's match leftwards
        # one token at a time; a candidate drops out at its first mismatch (or the start of the window).
        ends = np.flatnonzero(tokens[:last] == tokens[last])
        lengths = np.ones(len(ends), dtype=np.int64)
        alive = ends
        for n in range(1, self.ngram_max):
            alive = alive[alive >= n]
            alive = alive[tokens[alive - n] == tokens[last - n]]
            if not len(alive):
                break
            lengths[np.searchsorted(ends, alive)] += 1
        if not len(ends) or lengths.max() < self.ngram_min:
            return []
        # The latest among the longest matches: argmax finds the first maximum, so search the reversed arrays.
        end = ends[len(ends) - 1 - int(np.argmax(lengths[::-1]))]
        return tokens[end + 1 : end + 1 + max_tokens].tolist()
