"""Throughput of the engine in-process, without HTTP: every request queued at once, steps run until all finish."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams


@dataclass
class OfflineRun:
    duration: float
    prompt_tokens: int
    output_tokens: int
    num_requests: int
    step_seconds: list[float] = field(default_factory=list)

    def report(self) -> str:
        steps = sorted(self.step_seconds)
        median_step = steps[len(steps) // 2] * 1000 if steps else 0.0
        return (
            f"Throughput: {self.num_requests / self.duration:.2f} requests/s, "
            f"{(self.prompt_tokens + self.output_tokens) / self.duration:.1f} total tokens/s, "
            f"{self.output_tokens / self.duration:.1f} output tokens/s "
            f"({self.num_requests} requests in {self.duration:.1f} s, {len(steps)} steps, "
            f"median step {median_step:.1f} ms)"
        )


def run_offline(
    engine: LLMEngine, prompts: Sequence[list[int]], output_lens: Sequence[int], ignore_eos: bool = True
) -> OfflineRun:
    """Greedy-decode ``prompts`` (token ids) with the given output lengths and time it."""
    for index, (prompt, output_len) in enumerate(zip(prompts, output_lens, strict=True)):
        params = SamplingParams(temperature=0.0, max_tokens=output_len, ignore_eos=ignore_eos)
        engine.add_request(f"offline-{index}", list(prompt), params)
    output_tokens = 0
    step_seconds = []
    started = time.perf_counter()
    while engine.has_unfinished_requests():
        step_started = time.perf_counter()
        outputs = engine.step()
        step_seconds.append(time.perf_counter() - step_started)
        output_tokens += sum(len(output.new_token_ids) for output in outputs)
    duration = time.perf_counter() - started
    return OfflineRun(duration, sum(len(p) for p in prompts), output_tokens, len(prompts), step_seconds)
