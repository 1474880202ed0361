"""Compile ``StructuredOutputs`` into matchers for one tokenizer, with compiled grammars cached by spec."""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import llguidance
import numpy as np

from engine.structured.matcher import GrammarMatcher
from engine.structured.spec import GrammarError, StructuredOutputs, error_summary

if TYPE_CHECKING:
    from engine.tokenizer import Tokenizer

# Generated JSON is spaced as json.dumps writes it. Flexible whitespace would let a sampled model run on in blank
# space until max_tokens; a schema may still ask for it under "x-guidance" (llguidance's options).
JSON_FORMAT: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_ANY_OBJECT = '{"type": "object"}'


class GrammarCompiler:
    """Thread-safe: the server compiles (and so checks) a request's grammar off the engine thread, and the engine
    then finds it in the cache. Compiling is llguidance building its lexer and parser tables; a matcher for a
    request is a copy of the compiled one, in microseconds."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, cache_size: int = 256) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._cache_size = cache_size
        self._cache: OrderedDict[StructuredOutputs, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()
        self._ll_tokenizer: llguidance.LLTokenizer | None = None

    def compile(self, spec: StructuredOutputs) -> None:
        """Compile ``spec`` into the cache; raises GrammarError for a bad or unsupported grammar."""
        self._compiled(spec)

    def matcher(self, spec: StructuredOutputs) -> GrammarMatcher:
        """A fresh matcher at the start of ``spec``'s grammar; raises GrammarError for a bad or unsupported one."""
        return GrammarMatcher(self._compiled(spec).deep_copy(), self.vocab_size)

    def _compiled(self, spec: StructuredOutputs) -> llguidance.LLMatcher:
        with self._lock:
            compiled = self._cache.get(spec)
            if compiled is not None:
                self._cache.move_to_end(spec)
                return compiled
        compiled = llguidance.LLMatcher(self._llg_tokenizer(), _grammar(spec), log_level=0)
        if compiled.is_error():
            raise GrammarError(compiled.get_error())
        self._check_first_step(compiled.deep_copy())
        with self._lock:
            self._cache[spec] = compiled
            if len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return compiled

    def _check_first_step(self, matcher: llguidance.LLMatcher) -> None:
        """Raise GrammarError for a grammar that compiles but fails once decoding starts: llguidance finds some
        errors (a schema that only refers to itself, a parser limit passed) only when it computes a mask or consumes
        a token. Computes the first mask and consumes the lowest allowed token, on a copy of the compiled matcher."""
        bitmask = np.frombuffer(matcher.compute_bitmask(), dtype=np.uint8)
        if matcher.is_error():
            cause = error_summary(matcher.get_error())
            if cause == "NoExtensionBias":  # llguidance's word for: no byte can begin the output
                raise GrammarError(f"the grammar allows no output: no text matches it ({cause})")
            raise GrammarError(f"the grammar fails before its first token: {cause}")
        allowed = np.flatnonzero(np.unpackbits(bitmask, count=self.vocab_size, bitorder="little"))
        token = next((int(t) for t in allowed if int(t) not in self._tokenizer.eos_token_ids), None)
        if token is not None and not matcher.consume_token(token):
            raise GrammarError(f"the grammar fails at its first token: {error_summary(matcher.get_error())}")

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        # Built on first use (about 0.3 s for a 49k vocabulary), so that servers without structured output skip it.
        with self._lock:
            if self._ll_tokenizer is None:
                self._ll_tokenizer = llguidance.LLTokenizer(
                    self._tokenizer.backend_json(),
                    n_vocab=self.vocab_size,
                    eos_token=sorted(self._tokenizer.eos_token_ids),
                )
            return self._ll_tokenizer


def _grammar(spec: StructuredOutputs) -> str:
    """llguidance's grammar text for ``spec``; its conversions raise ValueError for input they cannot read."""
    try:
        if spec.kind == "json":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.value, defaults=JSON_FORMAT)
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema(_ANY_OBJECT, defaults=JSON_FORMAT)
        return llguidance.grammar_from(spec.kind, spec.value)  # regex, choice, grammar (EBNF/GBNF or Lark)
    except ValueError as exc:
        raise GrammarError(str(exc)) from exc
