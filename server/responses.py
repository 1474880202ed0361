"""OpenAI's Responses API on the chat machinery: a request becomes a chat request (its instructions, the stored
conversation it continues and its input items the messages, its function tools chat's tools, ``text.format`` chat's
``response_format``), runs as one, and its output is read back into Responses output items."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from contextlib import aclosing, contextmanager
from typing import Any

from pydantic import ValidationError
from starlette.requests import HTTPConnection, Request

from engine.sampling_params import SamplingParams
from server.errors import APIError
from server.middleware import bearer_token
from server.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    ChatResponseMessage,
    ChatTool,
    FunctionDefinition,
    FunctionName,
    NamedToolChoice,
    ResponseFormat,
)
from server.response_store import ConversationItem, ResponseStore, StoredResponse
from server.responses_protocol import (
    ItemStatus,
    OutputItem,
    ResponseDeleted,
    ResponseFunctionCall,
    ResponseIncompleteDetails,
    ResponseInputMessage,
    ResponseInputTokensDetails,
    ResponseObject,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponsesRequest,
    ResponseUsage,
    ToolChoice,
    item_id,
)
from server.responses_stream import OutputEvents
from server.serving_chat import ChatServing
from server.streaming import Choice, EventStream, Started, collect, merged
from server.tool_calls import ToolUse, chat_message

# The chat fields errors name, and the Responses fields they come from.
_RESPONSES_PARAMS = {
    "messages": "input",
    "prompt": "input",
    "response_format": "text.format",
    "max_tokens": "max_output_tokens",
    "max_completion_tokens": "max_output_tokens",
}


class ResponsesServing:
    def __init__(self, chat_serving: ChatServing, store: ResponseStore, keyed: bool) -> None:
        self.chat_serving = chat_serving
        self.store = store
        self.keyed = keyed  # API keys are configured: each key has its own stored responses

    def owner(self, connection: HTTPConnection) -> bytes:
        """Whose stored responses a request sees: its API key's, or (without keys) everyone's."""
        return bearer_token(connection.scope) if self.keyed else b""

    async def create(self, request: ResponsesRequest, http: Request) -> ResponseObject | EventStream:
        response_id = item_id("resp")
        unsupported = request.unsupported_field()
        if unsupported is not None:
            raise APIError(400, f"{unsupported} is not supported by this server", param=unsupported)
        owner = self.owner(http)
        items = [*self._conversation(owner, request.previous_response_id), *_input_items(request)]
        with _responses_params():
            chat = _chat_request(request, items)
            self.chat_serving.check_request(chat, response_id, 1)
            prompt, params, tools = await self.chat_serving.prepare_chat(chat)
            started = await self.chat_serving.start(response_id, [prompt], params, chat.priority)
        pending = self._pending(request, response_id, params)

        def finished(choice: Choice, output: list[OutputItem]) -> ResponseObject:
            status, details = _status(choice.finish_reason)
            usage = ResponseUsage(
                input_tokens=len(prompt),
                input_tokens_details=ResponseInputTokensDetails(cached_tokens=choice.num_cached_tokens),
                output_tokens=len(choice.token_ids),
                total_tokens=len(prompt) + len(choice.token_ids),
            )
            update = {"status": status, "incomplete_details": details, "output": output, "usage": usage}
            response = pending.model_copy(update=update)
            if response.store:
                self.store.put(owner, StoredResponse(response, (*items, *output)))
            return response

        if request.stream:
            return EventStream(self._events(started, pending, tools, finished), started)
        [choice] = await collect(started, http.is_disconnected)
        return finished(choice, _output_items(choice, tools))

    def retrieve(self, response_id: str, http: HTTPConnection) -> ResponseObject:
        stored = self.store.get(self.owner(http), response_id)
        if stored is None:
            raise _not_found(response_id)
        return stored.response

    def delete(self, response_id: str, http: HTTPConnection) -> ResponseDeleted:
        if not self.store.delete(self.owner(http), response_id):
            raise _not_found(response_id)
        return ResponseDeleted(id=response_id)

    def _conversation(self, owner: bytes, previous_response_id: str | None) -> Sequence[ConversationItem]:
        if previous_response_id is None:
            return ()
        stored = self.store.get(owner, previous_response_id)
        if stored is None:
            raise APIError(
                404,
                f"no stored response with id {previous_response_id!r}",
                param="previous_response_id",
                code="previous_response_not_found",
            )
        return stored.conversation

    def _pending(self, request: ResponsesRequest, response_id: str, params: SamplingParams) -> ResponseObject:
        """The response before its output: what the request asked for, with the defaults it got."""
        text = request.text.model_dump(by_alias=True, exclude_none=True) if request.text is not None else {}
        return ResponseObject(
            id=response_id,
            status="in_progress",
            instructions=request.instructions,
            max_output_tokens=request.max_output_tokens,
            model=self.chat_serving.model_name,
            parallel_tool_calls=request.parallel_tool_calls is not False,
            previous_response_id=request.previous_response_id,
            store=request.store is not False,
            temperature=params.temperature,
            top_p=params.top_p,
            text={"format": {"type": "text"}} | text,
            tool_choice=request.tool_choice or "auto",
            tools=request.tools or [],
            user=request.user,
            metadata=request.metadata or {},
        )

    async def _events(
        self,
        started: Started,
        pending: ResponseObject,
        tools: ToolUse | None,
        finished: Callable[[Choice, list[OutputItem]], ResponseObject],
    ) -> AsyncGenerator[str, None]:
        """The stream: created and in_progress, the output's events, then completed or incomplete (and the response
        is stored). A failure after the start can only be reported in-band: an ``error`` event ends the stream."""
        events = OutputEvents(tools)
        try:
            yield events.lifecycle("response.created", pending)
            yield events.lifecycle("response.in_progress", pending)
            async with aclosing(merged(started)) as outputs:
                async for choice, output in outputs:
                    choice.add(output)
                    for event in events.feed(output.new_text, output.finish_reason):
                        yield event
            [(choice, _)] = started
            status, _ = _status(choice.finish_reason)
            for event in events.finish(status):
                yield event
            response = finished(choice, events.items)
            yield events.lifecycle(f"response.{response.status}", response)
        except APIError as exc:
            yield events.error(exc)


def _input_items(request: ResponsesRequest) -> list[ConversationItem]:
    if isinstance(request.input, str):
        return [ResponseInputMessage(role="user", content=request.input)]
    return list(request.input)


def _chat_request(request: ResponsesRequest, items: Sequence[ConversationItem]) -> ChatCompletionRequest:
    messages = _chat_messages(items)
    if request.instructions is not None:
        messages.insert(0, ChatMessage(role="system", content=request.instructions))
    if not messages:
        raise APIError(400, "the input is empty", param="input")
    text_format = request.text.format if request.text is not None else None
    fields = request.chat_extras() | {
        "model": request.model,
        "messages": messages,
        "max_completion_tokens": request.max_output_tokens,
        "temperature": request.temperature,
        "top_p": request.top_p,
        "tools": [
            ChatTool(function=FunctionDefinition(**tool.model_dump(exclude={"type"}, exclude_none=True)))
            for tool in request.tools or []
        ]
        or None,
        "tool_choice": _chat_tool_choice(request.tool_choice),
        "parallel_tool_calls": request.parallel_tool_calls is not False,
        "response_format": None
        if text_format is None
        else ResponseFormat(
            type=text_format.type, json_schema=text_format if text_format.type == "json_schema" else None
        ),
    }
    try:
        return ChatCompletionRequest(**fields)
    except ValidationError as exc:  # a sampling field passed on as sent
        first = exc.errors()[0]
        param = ".".join(str(part) for part in first["loc"]) or None
        raise APIError(400, f"{param}: {first['msg']}" if param else first["msg"], param=param) from None


def _chat_messages(items: Sequence[ConversationItem]) -> list[ChatMessage]:
    """Conversation items as chat messages: a function_call joins the assistant message just before it (the text
    and calls of one turn), a function_call_output is the tool's message."""
    messages: list[ChatMessage] = []
    for item in items:
        if item.type == "message":
            messages.append(ChatMessage(role=item.role, content=_text(item.content)))
        elif item.type == "function_call":
            function = {"name": item.name, "arguments": item.arguments}
            call = {"id": item.call_id, "type": "function", "function": function}
            if messages and messages[-1].role == "assistant":
                last = messages[-1]
                messages[-1] = last.model_copy(update={"tool_calls": [*(last.tool_calls or []), call]})
            else:
                messages.append(ChatMessage(role="assistant", tool_calls=[call]))
        else:
            messages.append(ChatMessage(role="tool", tool_call_id=item.call_id, content=_text(item.output)))
    return messages


def _text(content: str | Sequence[Any]) -> str:
    return content if isinstance(content, str) else "".join(part.text for part in content)


def _chat_tool_choice(choice: ToolChoice | None) -> str | NamedToolChoice | None:
    if choice is None or isinstance(choice, str):
        return choice
    return NamedToolChoice(function=FunctionName(name=choice.name))


def _output_items(choice: Choice, tools: ToolUse | None) -> list[OutputItem]:
    """A whole output's items: its message (none if it only called tools), then its function calls. The last is
    "incomplete" when the output was cut off by its token limit: it is the one being written then."""
    message = ChatResponseMessage(content=choice.text)
    if tools is not None:
        message, _ = chat_message(choice.text, choice.finish_reason, tools.names)
    items: list[OutputItem] = []
    if message.content is not None:
        items.append(ResponseOutputMessage(status="completed", content=[ResponseOutputText(text=message.content)]))
    for call in message.tool_calls or []:
        name, arguments = call.function.name, call.function.arguments
        items.append(ResponseFunctionCall(call_id=call.id, name=name, arguments=arguments, status="completed"))
    status, _ = _status(choice.finish_reason)
    if items and status == "incomplete":
        items[-1] = items[-1].model_copy(update={"status": "incomplete"})
    return items


def _status(finish_reason: str | None) -> tuple[ItemStatus, ResponseIncompleteDetails | None]:
    if finish_reason == "length":
        return "incomplete", ResponseIncompleteDetails(reason="max_output_tokens")
    if finish_reason == "abort":
        return "incomplete", ResponseIncompleteDetails()
    return "completed", None


@contextmanager
def _responses_params() -> Iterator[None]:
    """The chat machinery's errors name chat's fields: name the Responses fields they come from instead."""
    try:
        yield
    except APIError as exc:
        head = (exc.param or "").split(".")[0]
        if head in _RESPONSES_PARAMS:
            exc.param = _RESPONSES_PARAMS[head]
        raise


def _not_found(response_id: str) -> APIError:
    return APIError(404, f"no stored response with id {response_id!r}", param="response_id")
