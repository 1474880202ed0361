"""POST /v1/chat/completions: messages through the chat template (with tools and structured output) in, assistant
messages (with tool calls) out. The Responses API runs on it too (``prepare_chat``)."""

from __future__ import annotations

from typing import Any

from engine.chat_template import ChatTemplateError
from engine.outputs import RequestOutput
from engine.sampler import SampledToken
from engine.sampling_params import SamplingParams
from engine.structured.spec import StructuredOutputs
from engine.tools.prompt import conversation_with_tools, template_renders_tools
from server.errors import APIError
from server.protocol import (
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    ChatResponseMessage,
    ChatStreamChoice,
    ChoiceLogprobs,
    DeltaMessage,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
    random_id,
)
from server.serving import Serving, include_usage, sampling_params
from server.streaming import Choice, Disconnected, EventStream, Started, collect, event_stream, total_usage
from server.structured import compiled, structured_outputs
from server.tool_calls import ToolCallDeltas, ToolUse, chat_message, tool_use


class ChatServing(Serving):
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
        choices = await collect(started, disconnected)
        return ChatCompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[self._chat_choice(request, c, tools) for c in choices],
            usage=total_usage([prompt], choices),
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
        params = sampling_params(request, max_tokens, logprobs, None, constraint)
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
            text = self.token_text(token_id)
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
        events = event_stream(started, prompts, roles, event, usage_event if include_usage(request) else None)
        return EventStream(events, started)
