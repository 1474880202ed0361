"""Spindle's engine: model loading, the model runner, sampling and the engine loop.

``from engine import LLM, SamplingParams`` is the offline API. The names are resolved lazily so that importing a
small submodule (``engine.errors``, ``engine.config``) does not load the whole engine.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "engine.llm",
    "CompletionOutput": "engine.llm",
    "GenerationResult": "engine.llm",
    "SamplingParams": "engine.sampling_params",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'engine' has no attribute {name!r}")
