"""Read tool calls out of generated text, whole or as it streams: ``<tool_call>`` blocks become calls, the rest
stays content. A block that does not parse as calls stays content too, so nothing the model wrote is lost. An output
cut off by its token limit inside a block gives the block's calls as far as they were written, as vLLM does."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from engine.tools.prompt import TOOL_CALL_END, TOOL_CALL_START

_DECODER = json.JSONDecoder()
_LONGEST_ESCAPE = len("\\u0000")


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # a JSON object, as text (OpenAI's form); of a call cut off, its beginning


@dataclass(frozen=True)
class _Field:
    """A member of a call object as written: its value if whole, else the text it was cut off after."""

    value: Any
    raw: str
    whole: bool


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

    def finish_truncated(self, names: Sequence[str] = ()) -> tuple[str, list[ToolCall]]:
        """The end of an output cut off by its token limit: what is still held back as content, except a block it
        ended inside of, which gives its calls as far as they were written (see ``_cut_calls``).

        ``names`` are the functions a forced call may name; its grammar allows nothing but calls, so a start tag the
        output ended inside of begins a call too.
        """
        if names and not self._in_call and self._pending:
            self._in_call, self._pending = True, ""
        if not self._in_call:
            return self.finish(), []
        body, self._pending, self._in_call = self._pending, "", False
        calls = _cut_calls(body, names)
        return (TOOL_CALL_START + body, []) if calls is None else ("", calls)


def parse_tool_calls(text: str, truncated: bool = False, names: Sequence[str] = ()) -> tuple[str, list[ToolCall]]:
    """The content (the text outside parsed call blocks) and the calls of a whole output; ``truncated`` if it was
    cut off by its token limit (see ``ToolCallStream.finish_truncated`` for that and ``names``)."""
    stream = ToolCallStream()
    content, calls = stream.feed(text)
    rest, cut = stream.finish_truncated(names) if truncated else (stream.finish(), [])
    return content + rest, calls + cut


def _partial_tag_length(text: str, tag: str = TOOL_CALL_START) -> int:
    """The length of the longest end of ``text`` that begins ``tag``."""
    for length in range(min(len(text), len(tag) - 1), 0, -1):
        if tag.startswith(text[-length:]):
            return length
    return 0


def _parse_calls(body: str) -> list[ToolCall] | None:
    """A block's calls: one {"name", "arguments"} object or a list of them; None if it is not that."""
    try:
        value: Any = json.loads(body)
    except json.JSONDecodeError:
        return None
    calls = []
    for item in value if isinstance(value, list) else [value]:
        call = _call(item)
        if call is None:
            return None
        calls.append(call)
    return calls


def _call(item: Any) -> ToolCall | None:
    """The call of a {"name", "arguments"} object ("parameters" for "arguments" too); None if it is not one."""
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    arguments = item.get("arguments", item.get("parameters", {}))
    if not isinstance(arguments, dict):
        return None
    return ToolCall(item["name"], json.dumps(arguments))


def _cut_calls(body: str, names: Sequence[str]) -> list[ToolCall] | None:
    """The calls of a block the output was cut off in: those written whole, then the one it ended in. None if the
    block does not begin like calls (one object, or a list of them)."""
    whole = _parse_calls(body[: len(body) - _partial_tag_length(body, TOOL_CALL_END)])
    if whole is not None:
        return whole  # only the end tag was cut off
    position = _skip_space(body, 0)
    if body.startswith("[", position):
        position = _skip_space(body, position + 1)
    calls: list[ToolCall] = []
    while position < len(body):
        if body[position] != "{":
            return None
        read = _read_object(body, position + 1)
        if read is None:
            return None
        fields, end = read
        if end is None:
            cut = _cut_call(fields, names)
            return None if cut is None else calls + cut
        call = _call(json.loads(body[position:end]))
        if call is None:
            return None
        calls.append(call)
        position = _skip_space(body, end)
        if position == len(body):
            return calls
        if body[position] != ",":
            return None
        position = _skip_space(body, position + 1)
    return calls + _cut_call({}, names)  # cut off where a call begins: only ``names`` can tell which


def _read_object(body: str, position: int) -> tuple[dict[str, _Field], int | None] | None:
    """The members of the object whose ``{`` is just before ``position``, and where it ends (None if the body ends
    first); None if it is not JSON as far as it goes. A value cut off is kept as text, not checked."""
    fields: dict[str, _Field] = {}
    position = _skip_space(body, position)
    if body.startswith("}", position):
        return fields, position + 1
    while position < len(body):
        if body[position] != '"':
            return None
        try:
            key, position = _DECODER.raw_decode(body, position)
        except json.JSONDecodeError:
            return fields, None  # cut off in a key
        position = _skip_space(body, position)
        if position == len(body):
            break
        if body[position] != ":":
            return None
        position = _skip_space(body, position + 1)
        try:
            value, end = _DECODER.raw_decode(body, position)
        except json.JSONDecodeError:
            fields[key] = _Field(None, body[position:], whole=False)
            break
        fields[key] = _Field(value, body[position:end], whole=True)
        position = _skip_space(body, end)
        if body.startswith("}", position):
            return fields, position + 1
        if body.startswith(",", position):
            position = _skip_space(body, position + 1)
        elif position < len(body):
            return None
    return fields, None


def _cut_call(fields: dict[str, _Field], names: Sequence[str]) -> list[ToolCall] | None:
    """The call of an object cut off with ``fields``: none if its name is unknown (neither written whole nor the one
    of ``names`` that begins as written), its arguments as far as they were written; None if it is not a call."""
    name = fields.get("name")
    if name is not None and name.whole:
        if not isinstance(name.value, str):
            return None
        resolved = name.value
    else:
        prefix = "" if name is None else _string_prefix(name.raw)
        if prefix is None:
            return None
        fitting = [candidate for candidate in names if candidate.startswith(prefix)]
        if len(fitting) != 1:
            return []
        resolved = fitting[0]
    arguments = fields.get("arguments", fields.get("parameters"))
    if arguments is None:
        return [ToolCall(resolved, "")]
    if not arguments.whole:
        return [ToolCall(resolved, arguments.raw)]
    return [ToolCall(resolved, json.dumps(arguments.value))] if isinstance(arguments.value, dict) else None


def _string_prefix(raw: str) -> str | None:
    """What a JSON string cut off after ``raw`` says so far (an escape cut in half left out); None if ``raw`` does
    not begin a string."""
    if not raw:
        return ""
    if not raw.startswith('"'):
        return None
    for end in range(len(raw), max(len(raw) - _LONGEST_ESCAPE, 1) - 1, -1):
        try:
            return json.loads(raw[:end] + '"')
        except json.JSONDecodeError:
            continue
    return None


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\n\r":
        position += 1
    return position
