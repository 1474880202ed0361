"""Tool definitions and tool turns in a conversation, for chat templates that render tools and those that do not."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import jinja2
import jinja2.meta

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

_TOOLS_PROMPT = """You can call functions to answer the user. The functions you have are listed inside <tools></tools>:
<tools>
{tools}
</tools>
To call functions, answer with nothing but the calls, as a JSON list inside <tool_call></tool_call>, like this:
<tool_call>[{{"name": "function_name", "arguments": {{"argument": "value"}}}}]</tool_call>
The arguments must follow the function's parameters. If no function helps, answer the user directly."""


def template_renders_tools(template: str | None) -> bool:
    """Whether a chat template reads the ``tools`` variable (HF templates receive the definitions as ``tools``).

    The template's syntax tree is asked, not its text: the word "tools" in a template's prose does not count.
    """
    if template is None:
        return False
    try:
        return "tools" in jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(template))
    except jinja2.TemplateSyntaxError:
        return False  # rendering will report it


def format_tool_calls(calls: Sequence[tuple[str, Any]]) -> str:
    """The text of (name, arguments) calls, exactly as the model is asked to write them."""
    body = json.dumps([{"name": name, "arguments": arguments} for name, arguments in calls])
    return f"{TOOL_CALL_START}{body}{TOOL_CALL_END}"


def conversation_with_tools(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]] | None, template_renders: bool
) -> list[dict[str, Any]]:
    """OpenAI-shaped messages made ready for a chat template.

    Assistant ``tool_calls`` carry their arguments as JSON text; they are given to the template as objects, the
    form HF templates expect. For a template that does not render tools, the definitions go at the head of the
    system prompt, an assistant's calls into its content in the format above, and each ``tool`` result into a
    user turn wrapped in ``<tool_response>`` tags.
    """
    rendered = []
    for message in messages:
        message = dict(message)
        calls = [_call(call) for call in message.pop("tool_calls", None) or []]
        if template_renders:
            if calls:
                message["tool_calls"] = [{"type": "function", "function": call} for call in calls]
        elif calls:
            text = format_tool_calls([(call["name"], call["arguments"]) for call in calls])
            message["content"] = f"{message.get('content') or ''}{text}"
        elif message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"}
        rendered.append(message)
    if tools and not template_renders:
        definitions = "\n".join(json.dumps(tool["function"]) for tool in tools)
        prompt = _TOOLS_PROMPT.format(tools=definitions)
        if rendered and rendered[0]["role"] in ("system", "developer"):
            first = rendered.pop(0)
            prompt = f"{prompt}\n\n{first.get('content') or ''}"
        rendered.insert(0, {"role": "system", "content": prompt})
    return rendered


def _call(call: Mapping[str, Any]) -> dict[str, Any]:
    """{"name", "arguments": object} from an OpenAI tool call; arguments that are not a JSON object stay text."""
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            parsed = json.loads(arguments)
        except json.JSONDecodeError:
            parsed = None
        arguments = parsed if isinstance(parsed, dict) else arguments
    return {"name": function.get("name", ""), "arguments": arguments}
