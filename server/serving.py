"""The completion and chat handlers: turn a validated request into engine requests and back into responses."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError, RequestStream
from engine.chat_template import ChatTemplateError
from engine.llm import CompletionOutput, fan_out
from engine.outputs import RequestOutput
from engine.sampler import SampledToken
from engine.sampling_params import InvalidParameter, SamplingParams
from engine.structured.spec import StructuredOutputs
from engine.tokenizer import Tokenizer
from engine.tools.prompt import conversation_with_tools, template_renders_tools
from scheduler.errors import RequestRejected
from server.errors import RETRY_AFTER_SECONDS, APIError, error_body
from server.limits import RequestLimits
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
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
from server.structured import compiled, structured_outputs
from server.tool_calls import ToolCallDeltas, ToolUse, chat_message, tool_use

DISCONNECT_POLL_SECONDS = 0.5

logger = logging.getLogger("spindle.server")

Disconnected = Callable[[], Awaitable[bool]]


@dataclass
class Choice(CompletionOutput):
    """The accumulated state of one choice (one engine request) of a response."""

    prompt_token_ids: list[int] = field(default_factory=list)
    text_offset: int = 0  # where the next logprob token starts in the choice's text (completions' logprobs)
    prompt_only: bool = False  # echo without generation: outputs reach it without the token sampled
    num_cached_tokens: int = 0  # prompt tokens the prefix cache held (the Responses API reports them)

    def add(self, output: RequestOutput) -> None:
        super().add(output)
        self.num_cached_tokens = output.num_cached_tokens


Started = list[tuple[Choice, RequestStream]]


class EventStream(StreamingResponse):
    """A server-sent event stream that aborts its requests however the connection ends."""

    def __init__(self, events: AsyncGenerator[str, None], started: Started) -> None:
        super().__init__(events, media_type="text/event-stream")
        self._events = events
        self._started = started

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self._events.aclose()
            for _, stream in self._started:
                stream.close()


class Serving:
    def __init__(self, engine: AsyncEngine, model_name: str, limits: RequestLimits, log_prompts: bool = False) -> None:
        self.engine = engine
        self.tokenizer: Tokenizer = engine.engine.tokenizer
        self.model_name = model_name
        self.max_model_len = engine.engine.max_model_len
        self.grammars = engine.engine.grammars
        self.limits = limits
        self.log_prompts = log_prompts

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
        self.limits.check_prompt_tokens(prompt_len)
        if max_tokens is not None and prompt_len + max_tokens > self.max_model_len:
            raise APIError(
                400,
                f"this model's maximum context length is {self.max_model_len} tokens, but {prompt_len} prompt "
                f"tokens plus max_tokens {max_tokens} ask for {prompt_len + max_tokens}",
                param="max_tokens",
                code="context_length_exceeded",
            )

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
            api_error = _api_error_for(exc)
            if api_error is None:
                raise
            raise api_error from exc
        return started

    @staticmethod
    async def merged(started: Started) -> AsyncGenerator[tuple[Choice, RequestOutput], None]:
        """Interleave the outputs of several requests as they arrive; closing it aborts the unfinished ones."""
        queue: asyncio.Queue[tuple[Choice, RequestOutput] | BaseException | None] = asyncio.Queue()

        async def pump(choice: Choice, stream: RequestStream) -> None:
            try:
                async with stream:
                    async for output in stream:
                        await queue.put((choice, _without_generation(output) if choice.prompt_only else output))
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
                    raise _api_error_for(item) or item
                else:
                    if item[1].finish_reason == "error":
                        raise _generation_error(item[1])
                    yield item
        finally:
            for task in tasks:
                task.cancel()
            for _, stream in started:
                stream.close()

    async def collect(self, started: Started, disconnected: Disconnected) -> list[Choice]:
        """Run every request to the end; abort them all if the client goes away meanwhile."""

        async def run() -> None:
            async with aclosing(self.merged(started)) as outputs:
                async for choice, output in outputs:
                    choice.add(output)

        task = asyncio.create_task(run())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_SECONDS)
                if not task.done() and await disconnected():
                    raise APIError(400, "client disconnected")
            task.result()
        finally:
            task.cancel()
        return [choice for choice, _ in started]

    async def event_stream(
        self,
        started: Started,
        prompts: list[list[int]],
        opening: list[dict[str, Any]],
        event: Callable[[Choice, RequestOutput], dict[str, Any] | None],
        usage_event: Callable[[UsageInfo], dict[str, Any]] | None,
    ) -> AsyncGenerator[str, None]:
        """SSE lines: the ``opening`` events, one event per output that carries news (``event`` may still find
        none to send: None), usage, then ``[DONE]``.

        A failure after the response started can only be reported in-band, as an event in OpenAI's error shape.
        """
        try:
            for payload in opening:
                yield _sse(payload)
            async with aclosing(self.merged(started)) as outputs:
                async for choice, output in outputs:
                    choice.add(output)
                    if output.new_text or output.finished or output.new_logprobs or output.new_token_ids:
                        payload = event(choice, output)
                        if payload is not None:
                            yield _sse(payload)
            if usage_event is not None:
                yield _sse(usage_event(_usage(prompts, [choice for choice, _ in started])))
        except APIError as exc:
            yield _sse(error_body(exc.status, exc.message, exc.param, exc.code))
        yield "data: [DONE]\n\n"

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

    # ------------------------------------------------------------------ completions
    async def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        if not request.prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompts = []
        for item in _prompt_items(request):
            if isinstance(item, str):
                self.limits.check_text(item, "prompt")
                prompts.append(self.tokenizer.encode(item))
                await asyncio.sleep(0)  # tokenizing holds the GIL: let streams move between long prompts
            else:
                prompts.append(list(item))  # type: ignore[arg-type]
        return prompts

    async def create_completion(
        self, request: CompletionRequest, disconnected: Disconnected
    ) -> CompletionResponse | EventStream:
        request_id = random_id("cmpl")
        self.check_request(request, request_id, len(_prompt_items(request)))
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
        constraint = await structured_outputs(request, self.grammars)
        prompts = await self.completion_prompts(request)
        prompt_logprobs = request.logprobs if request.echo else None
        max_tokens = _completion_max_tokens(request)
        params = _sampling_params(request, max_tokens, request.logprobs, prompt_logprobs, constraint)
        for prompt in prompts:
            self.check_length(len(prompt), params.max_tokens)
        started = await self.start(request_id, prompts, params, request.priority, prompt_only=request.echo_only)
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
        prefix = self._prompt_text(choice, request.skip_special_tokens) if request.echo else ""
        return CompletionChoice(
            index=choice.index,
            text=prefix + choice.text,
            logprobs=(
                self._completion_logprobs(choice, choice.logprobs, choice.prompt_logprobs, request.skip_special_tokens)
                if request.logprobs is not None
                else None
            ),
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            token_ids=choice.token_ids if request.return_token_ids else None,
            prompt_token_ids=choice.prompt_token_ids if request.return_token_ids else None,
        )

    def _completion_logprobs(
        self,
        choice: Choice,
        tokens: list[SampledToken],
        prompt_logprobs: list[SampledToken] | None = None,
        skip_special_tokens: bool = True,
    ) -> CompletionLogprobs:
        """The legacy logprobs shape for ``tokens``, which continue ``choice``'s text (advancing its offset).

        With ``prompt_logprobs`` (echo), the echoed prompt's tokens come first, from offset 0.

        Each token is spelled as the text spells it, decoded with the request's ``skip_special_tokens`` like the
        echoed prompt and the generated text: a special token the text leaves out is "" (its logprob is still
        reported), so the tokens joined are the text and each sits at its text_offset. vLLM spells every token as
        itself, so there tokens and offsets disagree with a text without its special tokens. The top_logprobs keys
        stay the candidates' own strings: they are not part of the text, and "" would merge special candidates.
        """
        result = CompletionLogprobs()

        def add(token_id: int, logprob: float | None, top_logprobs: dict[str, float] | None) -> None:
            text = self._token_text(token_id, skip_special_tokens)
            result.text_offset.append(choice.text_offset)
            choice.text_offset += len(text)
            result.tokens.append(text)
            result.token_logprobs.append(logprob)
            result.top_logprobs.append(top_logprobs)

        def add_all(entries: list[SampledToken]) -> None:
            for token in entries:
                add(token.token_id, token.logprob, {self._token_text(tid): lp for tid, lp in token.top_logprobs})

        if prompt_logprobs is not None:
            # Nothing precedes the first prompt token to predict it from: OpenAI reports nulls for it.
            add(choice.prompt_token_ids[0], None, None)
            add_all(prompt_logprobs)
            # The completion follows the echoed text.
            choice.text_offset = len(self._prompt_text(choice, skip_special_tokens))
        add_all(tokens)
        return result

    def stream_completion(
        self, request: CompletionRequest, request_id: str, started: Started, prompts: list[list[int]]
    ) -> EventStream:
        def chunk(choice: CompletionChoice) -> dict[str, Any]:
            body = CompletionResponse(id=request_id, model=self.model_name, choices=[choice])
            return body.model_dump(exclude={"usage"})

        def event(choice: Choice, output: RequestOutput) -> dict[str, Any] | None:
            text, logprobs = output.new_text, None
            if output.prompt_logprobs is not None:
                # Echo with logprobs: the echoed prompt waits for its logprobs, which come with the first tokens.
                text = self._prompt_text(choice, request.skip_special_tokens) + text
            if request.logprobs is not None:
                logprobs = self._completion_logprobs(
                    choice, output.new_logprobs, output.prompt_logprobs, request.skip_special_tokens
                )
            elif not text and output.finish_reason is None and not request.return_token_ids:
                return None  # a token whose text is held back (part of a stop string, or of a character): no news
            return chunk(
                CompletionChoice(
                    index=choice.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=output.finish_reason,
                    stop_reason=output.stop_reason,
                    token_ids=output.new_token_ids if request.return_token_ids else None,
                )
            )

        def usage_event(usage: UsageInfo) -> dict[str, Any]:
            return CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=usage).model_dump()

        echoed = []
        if request.echo and request.logprobs is None:
            echoed = [
                chunk(CompletionChoice(index=c.index, text=self._prompt_text(c, request.skip_special_tokens)))
                for c, _ in started
            ]
        events = self.event_stream(started, prompts, echoed, event, usage_event if _include_usage(request) else None)
        return EventStream(events, started)

    # ------------------------------------------------------------------ chat
    def chat_prompt(
        self,
        messages: list[ChatMessage],
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        try:
            conversation = [
                # OpenAI's "developer" messages are what chat templates call "system".
                {"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                | m.model_dump(include={"tool_calls", "tool_call_id"}, exclude_none=True)
                for m in messages
            ]
            self.limits.check_text("".join(m["content"] for m in conversation), "messages")
            native = template_renders_tools(self.tokenizer.chat_template)
            return self.tokenizer.encode_chat(
                conversation_with_tools(conversation, tools, native),
                add_generation_prompt=add_generation_prompt,
                tools=tools if native else None,
                **(template_kwargs or {}),
            )
        except (ChatTemplateError, ValueError, TypeError) as exc:
            # TypeError: chat_template_kwargs naming one of the template's own arguments.
            raise APIError(400, f"could not apply the chat template: {exc}", param="messages") from exc

    async def create_chat_completion(
        self, request: ChatCompletionRequest, disconnected: Disconnected
    ) -> ChatCompletionResponse | EventStream:
        request_id = random_id("chatcmpl")
        self.check_request(request, request_id, 1)
        prompt, params, tools = await self.prepare_chat(request)
        started = await self.start(request_id, [prompt], params, request.priority)
        if request.stream:
            return self.stream_chat(request, request_id, started, [prompt], tools)
        choices = await self.collect(started, disconnected)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[self._chat_choice(request, c, tools) for c in choices],
            usage=_usage([prompt], choices),
        )

    async def prepare_chat(self, request: ChatCompletionRequest) -> tuple[list[int], SamplingParams, ToolUse | None]:
        """A checked chat request's prompt, sampling parameters and tool use (None without tools)."""
        if request.top_logprobs and not request.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        tools = tool_use(request)
        constraint = await self.chat_constraint(request, tools)
        prompt = self.chat_prompt(
            request.messages,
            request.add_generation_prompt,
            request.chat_template_kwargs,
            None if tools is None else tools.tools,
        )
        # 0 is a value, not "unset": it is refused like max_tokens 0.
        max_tokens = request.max_tokens if request.max_completion_tokens is None else request.max_completion_tokens
        logprobs = (request.top_logprobs or 0) if request.logprobs else None
        params = _sampling_params(request, max_tokens, logprobs, None, constraint)
        self.check_length(len(prompt), params.max_tokens)
        return prompt, params, tools

    async def chat_constraint(self, request: ChatCompletionRequest, tools: ToolUse | None) -> StructuredOutputs | None:
        """The grammar of a chat's output: the forced calls of its tool_choice, or its structured-output fields."""
        constraint = await structured_outputs(request, self.grammars)
        if tools is not None and constraint is not None:
            raise APIError(
                400, "structured output cannot be combined with tools (unless tool_choice is 'none')", param="tools"
            )
        if tools is not None and tools.forced is not None:
            return await compiled(tools.forced, "tools", self.grammars)
        return constraint

    def _chat_choice(self, request: ChatCompletionRequest, choice: Choice, tools: ToolUse | None) -> ChatChoice:
        message, finish_reason = ChatResponseMessage(content=choice.text), choice.finish_reason
        if tools is not None:
            message, finish_reason = chat_message(choice.text, finish_reason, tools.names)
        return ChatChoice(
            index=choice.index,
            message=message,
            logprobs=self._chat_logprobs(choice.logprobs) if request.logprobs else None,
            finish_reason=finish_reason,
            stop_reason=choice.stop_reason,
            token_ids=choice.token_ids if request.return_token_ids else None,
            prompt_token_ids=choice.prompt_token_ids if request.return_token_ids else None,
        )

    def _chat_logprobs(self, tokens: list[SampledToken]) -> ChoiceLogprobs:
        def entry(token_id: int, logprob: float) -> TopLogprob:
            text = self._token_text(token_id)
            return TopLogprob(token=text, logprob=logprob, bytes=list(text.encode()))

        content = []
        for token in tokens:
            head = entry(token.token_id, token.logprob if token.logprob is not None else 0.0)
            top = [entry(tid, lp) for tid, lp in token.top_logprobs]
            content.append(TokenLogprob(**head.model_dump(), top_logprobs=top))
        return ChoiceLogprobs(content=content)

    def stream_chat(
        self,
        request: ChatCompletionRequest,
        request_id: str,
        started: Started,
        prompts: list[list[int]],
        tools: ToolUse | None,
    ) -> EventStream:
        tool_deltas = {choice.index: ToolCallDeltas(tools.names) for choice, _ in started} if tools is not None else {}

        def chunk(choice: ChatStreamChoice) -> dict[str, Any]:
            body = ChatCompletionChunk(id=request_id, model=self.model_name, choices=[choice])
            return body.model_dump(exclude={"usage"})

        def event(choice: Choice, output: RequestOutput) -> dict[str, Any]:
            delta, finish_reason = DeltaMessage(content=output.new_text), output.finish_reason
            if tools is not None:
                delta, finish_reason = tool_deltas[choice.index].delta(output.new_text, finish_reason)
            return chunk(
                ChatStreamChoice(
                    index=choice.index,
                    delta=delta,
                    logprobs=self._chat_logprobs(output.new_logprobs) if request.logprobs else None,
                    finish_reason=finish_reason,
                    stop_reason=output.stop_reason,
                    token_ids=output.new_token_ids if request.return_token_ids else None,
                )
            )

        def usage_event(usage: UsageInfo) -> dict[str, Any]:
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=[], usage=usage).model_dump()

        roles = [
            chunk(ChatStreamChoice(index=choice.index, delta=DeltaMessage(role="assistant", content="")))
            for choice, _ in started
        ]
        events = self.event_stream(started, prompts, roles, event, usage_event if _include_usage(request) else None)
        return EventStream(events, started)

    def _prompt_text(self, choice: Choice, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(choice.prompt_token_ids, skip_special_tokens=skip_special_tokens)

    def _token_text(self, token_id: int, skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=skip_special_tokens)


def _prompt_items(request: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: one string or token-id list each."""
    prompt = request.prompt
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _include_usage(request: CompletionRequest | ChatCompletionRequest) -> bool:
    return request.stream_options is not None and request.stream_options.include_usage


def _completion_max_tokens(request: CompletionRequest) -> int | None:
    """The engine's max_tokens. Echo alone still runs the prompt, for its logprobs; as in vLLM it samples one token,
    which the response drops (an engine request generates at least one)."""
    if not request.echo_only:
        return request.max_tokens
    if request.min_tokens:
        raise APIError(400, f"min_tokens ({request.min_tokens}) must not exceed max_tokens (0)", param="min_tokens")
    return 1


def _without_generation(output: RequestOutput) -> RequestOutput:
    """An echo-only choice's view of an output: the prompt's logprobs, not the token sampled with them, and the
    end that max_tokens 0 means ("length"); an abort or error stays as it is."""
    ended = output.finish_reason in ("stop", "length")
    return replace(
        output,
        new_token_ids=[],
        new_text="",
        new_logprobs=[],
        num_output_tokens=0,
        finish_reason="length" if ended else output.finish_reason,
        stop_reason=None,
    )


def _sampling_params(
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


def _usage(prompts: list[list[int]], choices: list[Choice]) -> UsageInfo:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(c.token_ids) for c in choices)
    return UsageInfo(
        prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens
    )


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


def _generation_error(output: RequestOutput) -> APIError:
    """The HTTP error for a request that failed while running: a 400 when its own input failed it."""
    if output.error_param is not None:
        return APIError(400, output.error or "invalid request", param=output.error_param)
    return APIError(500, output.error or "generation failed", code="generation_error")


def _api_error_for(exc: BaseException) -> APIError | None:
    """The HTTP error for an exception raised while adding or running requests; None for unexpected ones."""
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
    return None
