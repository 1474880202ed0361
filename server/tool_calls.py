"""Tools in chat completions: what a request offers and whether it forces a call, and generated text read back
into OpenAI's ``tool_calls`` (whole, or as stream deltas)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.structured.spec import StructuredOutputs
from engine.tools.constraint import forced_tool_calls
from engine.tools.parser import ToolCall as ParsedCall
from engine.tools.parser import ToolCallStream, parse_tool_calls
from server.errors import APIError
from server.protocol import (
    ChatCompletionRequest,
    ChatResponseMessage,
    DeltaMessage,
    DeltaToolCall,
    NamedToolChoice,
    ToolCall,
    ToolCallFunction,
)


@dataclass(frozen=True)
class ToolUse:
    tools: list[dict[str, Any]]  # OpenAI tool definitions, for the prompt
    forced: StructuredOutputs | None  # the grammar of the calls "required" or a named tool_choice demands
    names: tuple[str, ...] = ()  # the functions that grammar lets a call name (none when the model is free)


def tool_use(request: ChatCompletionRequest) -> ToolUse | None:
    """How the request uses tools; None when it offers none or ``tool_choice`` is "none" (then the prompt does
    not mention them and the output is not read for calls)."""
    choice = request.tool_choice
    if not request.tools:
        if choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice requires tools", param="tool_choice")
        return None
    if choice == "none":
        return None
    functions = {tool.function.name: tool.function.model_dump(exclude_none=True) for tool in request.tools}
    if len(functions) < len(request.tools):
        raise APIError(400, "tools must have distinct function names", param="tools")
    forced: StructuredOutputs | None = None
    names: tuple[str, ...] = ()
    if choice == "required":
        forced = forced_tool_calls(list(functions.values()), single=not request.parallel_tool_calls)
        names = tuple(functions)
    elif isinstance(choice, NamedToolChoice):
        if choice.function.name not in functions:
            raise APIError(
                400, f"tool_choice names {choice.function.name!r}, which is not in tools", param="tool_choice"
            )
        forced = forced_tool_calls([functions[choice.function.name]], single=True)
        names = (choice.function.name,)
    return ToolUse([tool.model_dump(exclude_none=True) for tool in request.tools], forced, names)


def chat_message(
    text: str, finish_reason: str | None, names: Sequence[str] = ()
) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message of a whole output, with its calls, and the finish reason ("tool_calls" if it called).

    An output cut off ("length") inside a call gives the call as far as it was written; ``names`` are those of
    ``ToolUse``, which name a forced call cut off before its name was whole.
    """
    content, calls = parse_tool_calls(text, truncated=finish_reason == "length", names=names)
    if not calls:
        return ChatResponseMessage(content=content), finish_reason
    message = ChatResponseMessage(content=content.strip() or None, tool_calls=[_tool_call(c) for c in calls])
    return message, _finished(finish_reason)


class ToolCallDeltas:
    """One streamed choice: each text delta becomes a content delta plus the calls that completed in it (a call the
    output was cut off in comes with the last delta, as ``chat_message`` reads it)."""

    def __init__(self, names: Sequence[str] = ()) -> None:
        self._stream = ToolCallStream()
        self._num_calls = 0
        self._names = names

    def delta(self, text: str, finish_reason: str | None) -> tuple[DeltaMessage, str | None]:
        content, calls = self._stream.feed(text)
        if finish_reason == "length":
            rest, cut = self._stream.finish_truncated(self._names)
            content, calls = content + rest, calls + cut
        elif finish_reason is not None:
            content += self._stream.finish()
        deltas = [
            DeltaToolCall(index=self._num_calls + offset, **_tool_call(call).model_dump())
            for offset, call in enumerate(calls)
        ]
        self._num_calls += len(calls)
        reason = _finished(finish_reason) if self._num_calls else finish_reason
        return DeltaMessage(content=content, tool_calls=deltas or None), reason


def _tool_call(call: ParsedCall) -> ToolCall:
    return ToolCall(function=ToolCallFunction(name=call.name, arguments=call.arguments))


def _finished(finish_reason: str | None) -> str | None:
    """A response that called tools and ended by itself finishes with "tool_calls"; "length" stays."""
    return "tool_calls" if finish_reason == "stop" else finish_reason
