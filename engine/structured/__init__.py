"""Structured output: constrain decoding to a JSON Schema, any JSON object, a regex, a choice or a grammar.

``StructuredOutputs`` (plain data, on ``SamplingParams``) says what the output must match; ``GrammarCompiler``
turns it into a ``GrammarMatcher`` per request (compiled grammars cached by spec); ``GrammarMasks`` computes the
allowed-token masks of a batch's constrained rows while the model runs and applies them to the logits. Names are
resolved lazily so that ``SamplingParams`` does not load the grammar engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "StructuredOutputs": "engine.structured.spec",
    "GrammarError": "engine.structured.spec",
    "GrammarCompiler": "engine.structured.compiler",
    "GrammarMatcher": "engine.structured.matcher",
    "GrammarMasks": "engine.structured.masks",
    "PendingMasks": "engine.structured.masks",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine.structured' has no attribute {name!r}")
