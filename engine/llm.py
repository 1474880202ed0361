"""The offline API: ``LLM().generate(prompts, SamplingParams(...))`` runs requests to completion in-process."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from engine.config import EngineConfig, build_config
from engine.llm_engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams

Prompt = str | Sequence[int]


@dataclass
class CompletionOutput:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    prompt_logprobs: list[SampledToken] | None = None  # with SamplingParams.prompt_logprobs: prompt tokens 1..
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, output: RequestOutput) -> None:
        """Fold one step's output of the request into the accumulated completion."""
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs)
        if output.prompt_logprobs is not None:
            self.prompt_logprobs = output.prompt_logprobs
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


def fan_out(params: SamplingParams) -> list[SamplingParams]:
    """n samples of one prompt become n requests; seeded ones get distinct, reproducible seeds."""
    if params.n == 1:
        return [params]
    return [
        dataclasses.replace(params, n=1, seed=None if params.seed is None else params.seed + i) for i in range(params.n)
    ]


class LLM:
    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **overrides: Any) -> None:
        if config is None:
            config = build_config(overrides=overrides)
        if model is not None:
            config.model.model = model
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        use_tqdm: bool = False,
    ) -> list[GenerationResult]:
        """Generate for every prompt (text or token ids); results come back in prompt order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            sampling_params = [sampling_params or SamplingParams()] * len(prompts)
        results: list[GenerationResult] = []
        slots: dict[str, CompletionOutput] = {}
        for prompt, params in zip(prompts, sampling_params):
            token_ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            result = GenerationResult(token_ids, [])
            for index, child in enumerate(fan_out(params)):
                request_id = str(next(self._ids))
                self.engine.add_request(request_id, token_ids, child)
                slots[request_id] = CompletionOutput(index)
                result.outputs.append(slots[request_id])
            results.append(result)
        with tqdm(total=len(slots), desc="Generating", disable=not use_tqdm) as progress:
            while self.engine.has_unfinished_requests():
                for output in self.engine.step():
                    slots[output.request_id].add(output)
                    if output.finished:
                        progress.update(1)
        return results

    def close(self) -> None:
        """Stop the tensor-parallel workers now rather than at interpreter exit."""
        self.engine.close()

    def chat(self, messages: list[dict[str, Any]], sampling_params: SamplingParams | None = None) -> GenerationResult:
        token_ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        return self.generate([token_ids], sampling_params)[0]
