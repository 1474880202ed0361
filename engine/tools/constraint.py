"""The grammar that forces tool calls (``tool_choice`` "required" or a named function): the call format with each
function's name and its arguments held to the function's parameter schema, so that the arguments always parse."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from engine.structured.compiler import JSON_FORMAT
from engine.structured.spec import StructuredOutputs
from engine.tools.prompt import TOOL_CALL_END, TOOL_CALL_START

_ANY_ARGUMENTS: dict[str, Any] = {"type": "object"}


def forced_tool_calls(functions: Sequence[Mapping[str, Any]], single: bool) -> StructuredOutputs:
    """Calls to ``functions`` (OpenAI function definitions): exactly one call when ``single``, else one or more.

    A Lark grammar in which llguidance's ``%json`` embeds each parameter schema as its own root, so that the
    schema's ``$ref``s resolve as they would alone. The text is what ``prompt.format_tool_calls`` writes.
    """
    rules = []
    for index, function in enumerate(functions):
        parameters = {**(function.get("parameters") or _ANY_ARGUMENTS), "x-guidance": JSON_FORMAT}
        head = _literal(f'{{"name": {json.dumps(function["name"])}, "arguments": ')
        rules.append(f"call_{index}: {head} %json {json.dumps(parameters)} {_literal('}')}")
    calls = "call" if single else f"call ({_literal(', ')} call)*"
    alternatives = " | ".join(f"call_{index}" for index in range(len(functions)))
    lark = "\n".join(
        [
            f"start: {_literal(TOOL_CALL_START + '[')} {calls} {_literal(']' + TOOL_CALL_END)}",
            f"call: {alternatives}",
            *rules,
        ]
    )
    return StructuredOutputs("grammar", lark)


def _literal(text: str) -> str:
    """A Lark string literal (its escapes are JSON's)."""
    return json.dumps(text)
