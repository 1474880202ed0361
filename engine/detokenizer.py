"""Streaming detokenization: turning generated token ids into text deltas, with stop strings.

Byte-level and byte-fallback vocabularies split multi-byte characters across tokens, and SentencePiece decoders
change how a token renders depending on what precedes it. Each step therefore decodes a short window of ids twice
(with and without the new tokens) and emits the difference, holding it back while it ends in an incomplete
character. Stop strings can also span tokens, so text that may be the start of one is held until resolved.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from engine.tokenizer import Tokenizer

__all__ = ["DetokenizerDelta", "IncrementalDetokenizer", "StopStringMatcher"]

# Prompt tokens decoded as context for the first generated ones, so that e.g. a SentencePiece word-start token
# renders its leading space as it does after the prompt.
_PROMPT_CONTEXT_TOKENS = 6

_REPLACEMENT_CHAR = "\ufffd"


@dataclass(frozen=True, slots=True)
class DetokenizerDelta:
    """New text ready to stream, and the stop string that ended generation (if one did in this step)."""

    text: str
    stop_hit: str | None = None


class StopStringMatcher:
    """Filters streamed text so that it stops right before (or after) the first completed stop string.

    Text that could still become a stop string is held back, so no part of a stop string is ever emitted unless
    `include_stop_str_in_output` is set. The hit reported is the stop string completed first in the stream, so the
    result does not depend on how the text was chunked.
    """

    def __init__(self, stop: Iterable[str] = (), include_stop_str_in_output: bool = False) -> None:
        self._stop = tuple(dict.fromkeys(stop))
        if "" in self._stop:
            raise ValueError("stop strings must not be empty")
        self._longest = max(map(len, self._stop), default=0)
        self._include_stop = include_stop_str_in_output
        self._pending = ""
        self._stop_hit: str | None = None

    @property
    def stop_hit(self) -> str | None:
        """The stop string that was matched; once set, all further text is discarded."""
        return self._stop_hit

    def feed(self, text: str) -> str:
        """Take newly decoded text and return the part that is safe to emit now."""
        if self._stop_hit is not None:
            return ""
        pending = self._pending + text
        # Every match starts within `pending`: emitted text never ends with a possible stop-string prefix.
        matches = [(start + len(stop), start, stop) for stop in self._stop if (start := pending.find(stop)) >= 0]
        if matches:
            end, start, self._stop_hit = min(matches)
            self._pending = ""
            return pending[: end if self._include_stop else start]
        held = self._stop_prefix_length(pending)
        self._pending = pending[len(pending) - held :]
        return pending[: len(pending) - held]

    def flush(self) -> str:
        """Release held-back text when the stream ends for another reason (EOS, length limit, abort)."""
        text, self._pending = self._pending, ""
        return text

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop string."""
        for size in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-size:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return size
        return 0


class IncrementalDetokenizer:
    """Text deltas for one request's generated tokens, in O(1) work per token.

    Only a short window of ids is kept: `ids[:read_offset]` is context whose text was already emitted (the prefix)
    and `ids[read_offset:]` are tokens whose text has not been emitted yet (e.g. the first bytes of a character).
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_token_ids: Sequence[int],
        skip_special_tokens: bool = True,
        stop: Iterable[str] = (),
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids = list(prompt_token_ids[-_PROMPT_CONTEXT_TOKENS:])
        self._read_offset = len(self._ids)
        self._matcher = StopStringMatcher(stop, include_stop_str_in_output)
        self._output: list[str] = []
        self._finished = False

    @property
    def output_text(self) -> str:
        """All text emitted so far (without held-back text, truncated at a stop string)."""
        return "".join(self._output)

    @property
    def stop_hit(self) -> str | None:
        """The stop string that ended the output, whether found by `update()` or by `flush()`."""
        return self._matcher.stop_hit

    @property
    def finished(self) -> bool:
        """True after a stop string was hit or `flush()` was called."""
        return self._finished

    def update(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Add generated tokens; the delta's `stop_hit` is set when they complete a stop string."""
        if self._finished:
            raise RuntimeError("update() called on a finished detokenizer")
        self._ids.extend(new_token_ids)
        text = self._emit(self._matcher.feed(self._decode_unread(final=False)))
        self._finished = self._matcher.stop_hit is not None
        return DetokenizerDelta(text, self._matcher.stop_hit)

    def flush(self) -> str:
        """Finish the stream: return all text still held back (incomplete characters included, as `decode` would)."""
        if self._finished:
            return ""
        self._finished = True
        text = self._matcher.feed(self._decode_unread(final=True))
        if self._matcher.stop_hit is None:
            text += self._matcher.flush()
        return self._emit(text)

    def _emit(self, text: str) -> str:
        if text:
            self._output.append(text)
        return text

    def _decode_unread(self, final: bool) -> str:
        decode = self._tokenizer.decode
        prefix_text = decode(self._ids[: self._read_offset], skip_special_tokens=self._skip_special_tokens)
        full_text = decode(self._ids, skip_special_tokens=self._skip_special_tokens)
        if len(full_text) <= len(prefix_text) or (not final and full_text.endswith(_REPLACEMENT_CHAR)):
            # Nothing new yet (a skipped special token) or the last character is still incomplete.
            return ""
        # The emitted tokens become the next window's context; older ones are no longer needed.
        del self._ids[: self._read_offset]
        self._read_offset = len(self._ids)
        return full_text[len(prefix_text) :]
