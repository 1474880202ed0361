"""Fixtures for grammar tests: the default model's tokenizer (read from its GGUF, no engine) and a grammar compiler.

Test modules load this with ``pytest_plugins = ["tests.grammar_fixtures"]``.
"""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest

from engine.structured import GrammarCompiler
from engine.tokenizer import Tokenizer


@pytest.fixture(scope="session")
def tokenizer(model_path: Path) -> Tokenizer:
    return Tokenizer.from_gguf(gguf.GGUFReader(model_path))


@pytest.fixture(scope="session")
def compiler(tokenizer: Tokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, tokenizer.vocab_size)
