"""`spindle generate` on the command line prints what the offline engine generates."""

from __future__ import annotations

import subprocess
import sys

from engine import LLM, SamplingParams
from engine.config import build_config

PROMPT = "The capital of France is"


def test_generate_prints_the_greedy_completion() -> None:
    command = [sys.executable, "-m", "server.cli", "generate", PROMPT, "--max-tokens", "12", "--dtype", "float32"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=True)
    expected = LLM(config=build_config("fp32")).generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12))
    assert result.stdout == expected[0].outputs[0].text + "\n"
    assert len(expected[0].outputs[0].token_ids) > 0
