"""The completion and chat handlers: turn a validated request into engine requests and back into responses."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from engine.chat_template import ChatTemplateError
from engine.llm import fan_out
from engine.outputs import RequestOutput
from engine.sampler import SampledToken
from engine.sampling_params import InvalidParameter, SamplingParams
from engine.tokenizer import Tokenizer
from scheduler.errors import RequestRejected
from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatResponseMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
)

RETRY_AFTER_SECONDS = "1"


@dataclass
class Choice:
    """The accumulated state of one choice (one engine request) of a response."""

    index: int
    prompt_token_ids: list[int]
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def add(self, output: RequestOutput) -> None:
        self.text += output.new_text
        self.token_ids.extend(output.new_token_ids)
        self.logprobs.extend(output.new_logprobs)
        if output.finished:
            self.finish_reason, self.stop_reason = output.finish_reason, output.stop_reason


class Serving:
    def __init__(self, engine: AsyncEngine, model_name: str) -> None:
        self.engine = engine
        self.tokenizer: Tokenizer = engine.engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.engine.max_model_len

    # ------------------------------------------------------------------ shared steps
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
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but {prompt_len} prompt "
                f"tokens plus max_tokens {max_tokens} ask for {prompt_len + max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )

    async def start(
        self, base_id: str, prompts: list[list[int]], params: SamplingParams, priority: int
    ) -> list[tuple[Choice, RequestStream]]:
        """Add one engine request per prompt and sample (n); on any refusal abort those already added."""
        started: list[tuple[Choice, RequestStream]] = []
        try:
            for prompt_index, prompt in enumerate(prompts):
                for sample_index, child in enumerate(fan_out(params)):
                    index = prompt_index * params.n + sample_index
                    stream = await self.engine.add_request(f"{base_id}-{index}", prompt, child, priority)
                    started.append((Choice(index, prompt), stream))
        except BaseException as exc:
            for _, stream in started:
                stream.close()
            raise _as_api_error(exc) from exc
        return started

    @staticmethod
    async def merged(started: list[tuple[Choice, RequestStream]]) -> AsyncIterator[tuple[Choice, RequestOutput]]:
        """Interleave the outputs of several requests as they arrive; closing it aborts the unfinished ones."""
        queue: asyncio.Queue[tuple[Choice, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(choice: Choice, stream: RequestStream) -> None:
            try:
                async with stream:
                    async for output in stream:
                        await queue.put((choice, output))
            except Exception as exc:
                await queue.put(exc)
            finally:
                await queue.put(None)

        tasks = [asyncio.create_task(pump(choice, stream)) for choice, stream in started]
        try:
            remaining = len(tasks)
            while remaining:
                item = await queue.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise _as_api_error(item)
                else:
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for _, stream in started:
                stream.close()

    async def collect(
        self, started: list[tuple[Choice, RequestStream]], disconnected: Callable[[], Awaitable[bool]]
    ) -> list[Choice]:
        """Run every request to the end; abort them all if the client goes away meanwhile."""

        async def run() -> None:
            async for choice, output in self.merged(started):
                choice.add(output)
                if output.finish_reason == "error":
                    raise APIError(500, output.error or "generation failed", code="generation_error")

        task = asyncio.create_task(run())
        while not task.done():
            await asyncio.wait({task}, timeout=0.5)
            if not task.done() and await disconnected():
                task.cancel()
                raise APIError(400, "client disconnected")
        task.result()
        return [choice for choice, _ in started]

    # ------------------------------------------------------------------ completions
    def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        prompt = request.prompt
        if isinstance(prompt, str):
            return [self.tokenizer.encode(prompt)]
        if prompt and all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return [self.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in prompt]  # type: ignore[union-attr]

    async def create_completion(self, request: CompletionRequest, disconnected: Callable[[], Awaitable[bool]]):
        self.check_model(request.model)
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
        prompts = self.completion_prompts(request)
        params = _sampling_params(request, request.max_tokens, request.logprobs)
        for prompt in prompts:
            self.check_length(len(prompt), params.max_tokens)
        request_id = random_id("cmpl")
        started = await self.start(request_id, prompts, params, request.priority)
        if request.stream:
            return self.stream_completion(request, request_id, started, prompts)
        choices = await self.collect(started, disconnected)
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[self._completion_choice(request, c) for c in choices],
            usage=_usage(prompts, choices),
        )

    def _completion_choice(self, request: CompletionRequest, choice: Choice) -> CompletionChoice:
        prefix = self.tokenizer.decode(choice.prompt_token_ids) if request.echo else ""
        logprobs = self._completion_logprobs(choice.logprobs, len(prefix)) if request.logprobs is not None else None
        return CompletionChoice(
            index=choice.index,
            text=prefix + choice.text,
            logprobs=logprobs,
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
        )

    def _completion_logprobs(self, tokens: list[SampledToken], offset: int) -> CompletionLogprobs:
        result = CompletionLogprobs()
        for token in tokens:
            text = self.tokenizer.decode([token.token_id], skip_special_tokens=False)
            result.text_offset.append(offset)
            offset += len(text)
            result.tokens.append(text)
            result.token_logprobs.append(token.logprob)
            result.top_logprobs.append(
                {self.tokenizer.decode([tid], skip_special_tokens=False): lp for tid, lp in token.top_logprobs}
            )
        return result

    async def stream_completion(
        self,
        request: CompletionRequest,
        request_id: str,
        started: list[tuple[Choice, RequestStream]],
        prompts: list[list[int]],
    ) -> AsyncIterator[str]:
        offsets = {choice.index: 0 for choice, _ in started}
        try:
            if request.echo:
                for choice, _ in started:
                    text = self.tokenizer.decode(choice.prompt_token_ids)
                    offsets[choice.index] = len(text)
                    yield _sse(self._completion_chunk(request_id, CompletionChoice(index=choice.index, text=text)))
            async for choice, output in self.merged(started):
                choice.add(output)
                if not (output.new_text or output.finished):
                    continue
                logprobs = None
                if request.logprobs is not None:
                    logprobs = self._completion_logprobs(output.new_logprobs, offsets[choice.index])
                offsets[choice.index] += len(output.new_text)
                item = CompletionChoice(
                    index=choice.index,
                    text=output.new_text,
                    logprobs=logprobs,
                    finish_reason=output.finish_reason,
                    stop_reason=output.stop_reason,
                )
                yield _sse(self._completion_chunk(request_id, item))
            if request.stream_options and request.stream_options.include_usage:
                usage = _usage(prompts, [choice for choice, _ in started])
                chunk = CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=usage)
                yield _sse(chunk.model_dump(exclude_none=False))
        except APIError as exc:
            yield _sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}})
        yield "data: [DONE]\n\n"

    def _completion_chunk(self, request_id: str, choice: CompletionChoice) -> dict:
        return CompletionResponse(id=request_id, model=self.model_name, choices=[choice]).model_dump(exclude={"usage"})

    # ------------------------------------------------------------------ chat
    def chat_prompt(self, request: ChatCompletionRequest) -> list[int]:
        try:
            messages = [{"role": m.role, "content": m.text()} for m in request.messages]
            return self.tokenizer.encode_chat(
                messages,
                add_generation_prompt=request.add_generation_prompt,
                **(request.chat_template_kwargs or {}),
            )
        except (ChatTemplateError, ValueError) as exc:
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from exc

    async def create_chat_completion(self, request: ChatCompletionRequest, disconnected: Callable[[], Awaitable[bool]]):
        self.check_model(request.model)
        if request.tools or request.tool_choice not in (None, "none"):
            raise APIError(400, "tool calling is not supported by this server yet", param="tools")
        if request.response_format is not None and request.response_format.type != "text":
            raise APIError(400, "only response_format type 'text' is supported", param="response_format")
        prompt = self.chat_prompt(request)
        max_tokens = request.max_completion_tokens or request.max_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        if request.top_logprobs and not request.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        params = _sampling_params(request, max_tokens, logprobs)
        self.check_length(len(prompt), params.max_tokens)
        request_id = random_id("chatcmpl")
        started = await self.start(request_id, [prompt], params, request.priority)
        if request.stream:
            return self.stream_chat(request, request_id, started, [prompt])
        choices = await self.collect(started, disconnected)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[
                ChatChoice(
                    index=c.index,
                    message=ChatResponseMessage(content=c.text),
                    logprobs=self._chat_logprobs(c.logprobs) if request.logprobs else None,
                    finish_reason=c.finish_reason,
                    stop_reason=c.stop_reason,
                )
                for c in choices
            ],
            usage=_usage([prompt], choices),
        )

    def _chat_logprobs(self, tokens: list[SampledToken]) -> ChoiceLogprobs:
        def entry(token_id: int, logprob: float) -> TopLogprob:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = []
        for token in tokens:
            head = entry(token.token_id, token.logprob if token.logprob is not None else 0.0)
            top = [entry(tid, lp) for tid, lp in token.top_logprobs]
            content.append(TokenLogprob(**head.model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    async def stream_chat(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        started: list[tuple[Choice, RequestStream]],
        prompts: list[list[int]],
    ) -> AsyncIterator[str]:
        def chunk(choice: ChatStreamChoice) -> str:
            body = ChatCompletionChunk(id=request_id, model=self.model_name, choices=[choice])
            return _sse(body.model_dump(exclude={"usage"}))

        try:
            for choice, _ in started:
                yield chunk(ChatStreamChoice(index=choice.index, delta=DeltaMessage(role="assistant", content="")))
            async for choice, output in self.merged(started):
                choice.add(output)
                if not (output.new_text or output.finished):
                    continue
                yield chunk(
                    ChatStreamChoice(
                        index=choice.index,
                        delta=DeltaMessage(content=output.new_text),
                        logprobs=self._chat_logprobs(output.new_logprobs) if request.logprobs else None,
                        finish_reason=output.finish_reason,
                        stop_reason=output.stop_reason,
                    )
                )
            if request.stream_options and request.stream_options.include_usage:
                usage = _usage(prompts, [choice for choice, _ in started])
                body = ChatCompletionChunk(id=request_id, model=self.model_name, choices=[], usage=usage)
                yield _sse(body.model_dump())
        except APIError as exc:
            yield _sse({"error": {"message": exc.message, "type": "server_error", "param": None, "code": exc.code}})
        yield "data: [DONE]\n\n"


def _sampling_params(request: CompletionRequest | ChatCompletionRequest, max_tokens: int | None, logprobs: int | None):
    try:
        return request.to_sampling_params(max_tokens, logprobs)
    except InvalidParameter as exc:
        raise APIError(400, str(exc), param=exc.param) from exc


def _usage(prompts: list[list[int]], choices: list[Choice]) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _as_api_error(exc: BaseException) -> BaseException:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, QueueFullError):
        return APIError(
            503, f"the server is overloaded: {exc}", code="queue_full", headers={"Retry-After": RETRY_AFTER_SECONDS}
        )
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable", headers={"Retry-After": RETRY_AFTER_SECONDS})
    if isinstance(exc, InvalidParameter):
        return APIError(400, str(exc), param=exc.param)
    if isinstance(exc, (RequestRejected, ValueError)):
        return APIError(400, str(exc))
    return exc
