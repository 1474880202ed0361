"""What the completion and chat handlers share: request checks, admission of engine requests, and the parameters
and token text every response needs. ``serving_completions`` and ``serving_chat`` build on it."""

from __future__ import annotations

import logging

from engine.async_engine import AsyncEngine
from engine.llm import fan_out
from engine.sampling_params import InvalidParameter, SamplingParams
from engine.structured.spec import StructuredOutputs
from server.errors import APIError
from server.limits import RequestLimits
from server.protocol import ChatCompletionRequest, CompletionRequest
from server.streaming import Choice, Started, api_error_for

logger = logging.getLogger("spindle.server")


class Serving:
    def __init__(self, engine: AsyncEngine, model_name: str, limits: RequestLimits, log_prompts: bool = False) -> None:
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.max_model_len
        self.grammars = engine.grammars
        self.limits = limits
        self.log_prompts = log_prompts

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise APIError(
                404,
                f"the model {model!r} does not exist (this server serves {self.model_name!r})",
                param="model",
                code="model_not_found",
            )

    def check_length(self, prompt_len: int, max_tokens: int | None) -> None:
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty", param="prompt")
        if prompt_len >= self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but the prompt has "
                f"{prompt_len} tokens (one more is needed for the completion)",
                param="prompt",
                code="context_length_exceeded",
            )
        self.limits.check_prompt_tokens(prompt_len)
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but {prompt_len} prompt "
                f"tokens plus max_tokens {max_tokens} ask for {prompt_len + max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )

    def check_request(
        self, request: CompletionRequest | ChatCompletionRequest, request_id: str, num_prompts: int
    ) -> None:
        """The checks every generation request passes before its prompt is tokenized."""
        if self.log_prompts:
            prompt = (
                request.prompt if isinstance(request, CompletionRequest) else [m.model_dump() for m in request.messages]
            )
            logger.info("%s: prompt %r", request_id, prompt)
        self.check_model(request.model)
        self.limits.check_choices(num_prompts, request.n)
        self.limits.check_stop(request.stop)

    async def start(
        self, base_id: str, prompts: list[list[int]], params: SamplingParams, priority: int, prompt_only: bool = False
    ) -> Started:
        """Add one engine request per prompt and sample (n); on any refusal abort those already added.

        ``prompt_only``: the choices report the prompt's outputs but none of the tokens sampled (echo alone).
        """
        started: Started = []
        try:
            for prompt_index, prompt in enumerate(prompts):
                for sample_index, child in enumerate(fan_out(params)):
                    index = prompt_index * params.n + sample_index
                    stream = await self.engine.add_request(f"{base_id}-{index}", prompt, child, priority)
                    started.append((Choice(index, prompt_token_ids=prompt, prompt_only=prompt_only), stream))
        except BaseException as exc:
            for _, stream in started:
                stream.close()
            api_error = api_error_for(exc)
            if api_error is None:
                raise
            raise api_error from exc
        return started

    def token_text(self, token_id: int, skip_special_tokens: bool = False) -> str:
        """One token as logprobs spell it."""
        return self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)


def sampling_params(
    request: CompletionRequest | ChatCompletionRequest,
    max_tokens: int | None,
    logprobs: int | None,
    prompt_logprobs: int | None = None,
    structured: StructuredOutputs | None = None,
) -> SamplingParams:
    try:
        return request.to_sampling_params(max_tokens, logprobs, prompt_logprobs, structured)
    except InvalidParameter as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


def include_usage(request: CompletionRequest | ChatCompletionRequest) -> bool:
    """Whether a stream ends with a usage event (``stream_options.include_usage``)."""
    return request.stream_options is not None and request.stream_options.include_usage
