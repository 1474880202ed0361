"""Read tool calls out of generated text, whole or as it streams: ``<tool_call>`` blocks become calls, the rest
stays content. A block that does not parse as calls stays content too, so nothing the model wrote is lost."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from engine.tools.prompt import TOOL_CALL_END, TOOL_CALL_START


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form)


class ToolCallStream:
    """Feed text deltas; each ``feed`` returns the content that is certainly not part of a call and the calls that
    completed. Text that may still turn into a ``<tool_call>`` tag is held back until it is decided."""

    def __init__(self) -> None:
        self._pending = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._pending += text
        content, calls = "", []
        while True:
            if self._in_call:
                end = self._pending.find(TOOL_CALL_END)
                if end < 0:
                    return content, calls
                body, self._pending = self._pending[:end], self._pending[end + len(TOOL_CALL_END) :]
                self._in_call = False
                parsed = _parse_calls(body)
                if parsed is None:
                    content += TOOL_CALL_START + body + TOOL_CALL_END
                else:
                    calls.extend(parsed)
            else:
                start = self._pending.find(TOOL_CALL_START)
                if start < 0:
                    held = _partial_tag_length(self._pending)
                    content += self._pending[: len(self._pending) - held]
                    self._pending = self._pending[len(self._pending) - held :]
                    return content, calls
                content += self._pending[:start]
                self._pending = self._pending[start + len(TOOL_CALL_START) :]
                self._in_call = True

    def finish(self) -> str:
        """What is still held back, as content: a partial tag, or a call the output ended inside of."""
        rest = (TOOL_CALL_START if self._in_call else "") + self._pending
        self._pending, self._in_call = "", False
        return rest


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The content (the text outside parsed call blocks) and the calls of a whole output."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    return content + stream.finish(), calls


def _partial_tag_length(text: str) -> int:
    """The length of the longest end of ``text`` that begins the start tag."""
    for length in range(min(len(text), len(TOOL_CALL_START) - 1), 0, -1):
        if TOOL_CALL_START.startswith(text[-length:]):
            return length
    return 0


def _parse_calls(body: str) -> list[ToolCall] | None:
    """A block's calls: one {"name", "arguments"} object or a list of them; None if it is not that."""
    try:
        value: Any = json.loads(body)
    except json.JSONDecodeError:
        return None
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(item["name"], json.dumps(arguments)))
    return calls
