"""One request's position in its grammar: the interface decoding and speculative decoding drive it through."""

from __future__ import annotations

from collections.abc import Sequence

import llguidance

from engine.structured.spec import GrammarError


class GrammarMatcher:
    """Wraps an ``llguidance.LLMatcher``: ``accepts`` checks tokens without moving, ``advance`` commits one,
    ``rollback`` undoes the last ones (a speculative step rejects draft tokens past the first refused one)."""

    def __init__(self, ll_matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self.ll_matcher = ll_matcher  # GrammarMasks computes the masks of many matchers at once through it
        self.vocab_size = vocab_size

    def accepts(self, token_ids: Sequence[int]) -> int:
        """How many of ``token_ids``, from the first, the grammar accepts from here; the state does not change."""
        return self.ll_matcher.validate_tokens(list(token_ids))

    def advance(self, token_id: int) -> bool:
        """Commit one token; False if the grammar refused it (the matcher is then in its error state)."""
        return self.ll_matcher.consume_token(token_id)

    def rollback(self, num_tokens: int) -> None:
        """Undo the last ``num_tokens`` committed tokens."""
        if not self.ll_matcher.rollback(num_tokens):
            raise GrammarError(f"cannot roll back {num_tokens} tokens: {self.ll_matcher.get_error()}")

    @property
    def finished(self) -> bool:
        """Whether the output so far is complete: the end-of-sequence token is allowed now."""
        return self.ll_matcher.is_accepting()

    @property
    def terminated(self) -> bool:
        """Whether nothing but the end of sequence can follow (also true in the error state)."""
        return self.ll_matcher.is_stopped()

    @property
    def error(self) -> str | None:
        return self.ll_matcher.get_error() or None
