"""Tool calling below the server: prompt rendering, the call parser (whole and streamed) and the forced-call grammar."""

from __future__ import annotations

import json

import jsonschema
import pytest

from engine.chat_template import render_chat_template
from engine.structured import GrammarCompiler
from engine.tokenizer import Tokenizer
from engine.tools.constraint import forced_tool_calls
from engine.tools.parser import ToolCall, ToolCallStream, parse_tool_calls
from engine.tools.prompt import conversation_with_tools, format_tool_calls, template_renders_tools

pytest_plugins = ["tests.grammar_fixtures"]

WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "unit": {"enum": ["c", "f"]}},
        "required": ["city"],
    },
}
TREE = {  # $refs resolve within the function's own schema
    "name": "plant",
    "parameters": {
        "$defs": {
            "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
        },
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "required": ["root"],
    },
}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Oslo?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "c1", "content": "-3 C"},
]


def test_calls_parse_from_text_and_the_rest_is_content() -> None:
    calls = [("get_weather", {"city": "Paris", "unit": "c"}), ("plant", {"root": {"kids": []}})]
    content, parsed = parse_tool_calls("Let me check. " + format_tool_calls(calls) + " Done.")
    assert content == "Let me check.  Done."
    assert [(c.name, json.loads(c.arguments)) for c in parsed] == calls
    # Hermes-style single objects with surrounding newlines; "parameters" for "arguments".
    content, parsed = parse_tool_calls('<tool_call>\n{"name": "f", "parameters": {"a": 1}}\n</tool_call>')
    assert (content, parsed) == ("", [ToolCall("f", '{"a": 1}')])
    for not_calls in (
        "<tool_call>not json</tool_call>",
        '<tool_call>[{"arguments": {}}]</tool_call>',
        "x <tool_call>[",
    ):
        assert parse_tool_calls(not_calls) == (not_calls, [])


def test_streaming_in_any_split_gives_the_whole_parse() -> None:
    text = (
        'Hi <tool <tool_call>[{"name": "a", "arguments": {"x": "</tool"}}]</tool_call> and <tool_call>bad</tool_call>!'
    )
    whole = parse_tool_calls(text)
    assert whole[1] == [ToolCall("a", '{"x": "</tool"}')]
    for pieces in ([text[:i], text[i:]] for i in range(len(text) + 1)):
        stream, content, calls = ToolCallStream(), "", []
        for piece in pieces:
            delta, new_calls = stream.feed(piece)
            content, calls = content + delta, calls + new_calls
        assert (content + stream.finish(), calls) == whole
    stream = ToolCallStream()
    assert [stream.feed(ch)[0] for ch in "ab<tool_"] == ["a", "b", "", "", "", "", "", ""]
    assert stream.finish() == "<tool_"


def test_prompt_for_a_template_without_tools(tokenizer: Tokenizer) -> None:
    assert not template_renders_tools(tokenizer.chat_template)
    tools = [{"type": "function", "function": WEATHER}]
    prompt = tokenizer.apply_chat_template(conversation_with_tools(HISTORY, tools, template_renders=False))
    system = prompt.split("<|im_end|>")[0]
    assert json.dumps(WEATHER) in system and system.rstrip().endswith("Be brief.")
    call = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    assert f"<|im_start|>assistant\n{call}<|im_end|>" in prompt
    assert "<|im_start|>user\n<tool_response>\n-3 C\n</tool_response><|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")


def test_prompt_for_a_template_that_renders_tools() -> None:
    template = (
        "{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
        "{% for m in messages %}{{ m.role }}:{{ m.content }}"
        "{% for c in m.tool_calls or [] %}call {{ c.function.name }} city={{ c.function.arguments.city }}{% endfor %};"
        "{% endfor %}"
    )
    assert template_renders_tools(template)
    tools = [{"type": "function", "function": WEATHER}]
    messages = conversation_with_tools(HISTORY, tools, template_renders=True)
    rendered = render_chat_template(template, messages, tools=tools)
    assert (
        rendered
        == "[get_weather]system:Be brief.;user:Weather in Oslo?;assistant:call get_weather city=Oslo;tool:-3 C;"
    )


@pytest.mark.parametrize("single", [True, False])
def test_forced_calls_grammar(tokenizer: Tokenizer, compiler: GrammarCompiler, single: bool) -> None:
    matcher = compiler.matcher(forced_tool_calls([WEATHER, TREE], single))
    one = format_tool_calls([("get_weather", {"city": "Oslo", "unit": "f"})])
    two = format_tool_calls([("get_weather", {"city": "Oslo"}), ("plant", {"root": {"kids": [{"kids": []}]}})])
    for text, valid in (
        (one, True),
        (two, not single),
        (format_tool_calls([("get_weather", {"unit": "f"})]), False),  # a required argument missing
        (format_tool_calls([("get_weather", {"city": "Oslo", "unit": "k"})]), False),
        (format_tool_calls([("unknown", {})]), False),
        (format_tool_calls([]), False),
    ):
        tokens = tokenizer.encode(text, add_special_tokens=False)
        assert (matcher.accepts(tokens) == len(tokens)) == valid, text
    for token in tokenizer.encode(one, add_special_tokens=False):
        assert matcher.advance(token)
    assert matcher.finished
    call = parse_tool_calls(one)[1][0]
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])


CUT = '<tool_call>[{"name": "get_weather", "arguments": {"city": "Pa'


@pytest.mark.parametrize(
    ("text", "names", "expected"),
    [
        # Forced: the output is nothing but calls, so a name cut off (or not begun) is the one name that fits.
        (CUT, ("get_weather", "plant"), ("", [ToolCall("get_weather", '{"city": "Pa')])),
        ('<tool_call>[{"name": "get_w', ("get_weather", "plant"), ("", [ToolCall("get_weather", "")])),
        ("<tool_call>[", ("get_weather",), ("", [ToolCall("get_weather", "")])),
        ("<tool_c", ("get_weather",), ("", [ToolCall("get_weather", "")])),
        ('<tool_call>[{"name": "get_', ("get_weather", "get_time"), ("", [])),
        # Earlier calls whole, the last one as far as it goes; a list cut in its end tag is whole.
        (
            '<tool_call>[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {',
            ("a", "b"),
            ("", [ToolCall("a", '{"x": 1}'), ToolCall("b", "{")]),
        ),
        ('<tool_call>[{"name": "a", "arguments": {}}, ', ("a",), ("", [ToolCall("a", "{}"), ToolCall("a", "")])),
        ('<tool_call>[{"name": "a", "arguments": {"x": "y"}}]</tool', ("a",), ("", [ToolCall("a", '{"x": "y"}')])),
        # Free ("auto"): a call is read once its name is written whole; an unnamed one is dropped with its markup.
        ("Let me check. " + CUT, (), ("Let me check. ", [ToolCall("get_weather", '{"city": "Pa')])),
        ('<tool_call>\n{"name": "f", "parameters": {"a": [1, ', (), ("", [ToolCall("f", '{"a": [1, ')])),
        ('<tool_call>{"arguments": {"a": 1}, "name": "f"', (), ("", [ToolCall("f", '{"a": 1}')])),
        ('x <tool_call>[{"name": "get_w', (), ("x ", [])),
        ("x <tool_call>", (), ("x ", [])),
        # Not the beginning of calls, or not a call tag yet: content, as in an output that was not cut off.
        ("x <tool_call>hello", (), ("x <tool_call>hello", [])),
        ('x <tool_call>[{"name": 3, ', (), ('x <tool_call>[{"name": 3, ', [])),
        ("x <tool_c", (), ("x <tool_c", [])),
    ],
)
def test_a_call_cut_off_is_read_as_far_as_it_goes(
    text: str, names: tuple[str, ...], expected: tuple[str, list[ToolCall]]
) -> None:
    assert parse_tool_calls(text, truncated=True, names=names) == expected
    for split in range(len(text) + 1):
        stream = ToolCallStream()
        content, calls = stream.feed(text[:split])
        more, new_calls = stream.feed(text[split:])
        rest, cut = stream.finish_truncated(names)
        assert (content + more + rest, calls + new_calls + cut) == expected
    # An output that ended by itself inside a call keeps it as text.
    assert parse_tool_calls(text) == (text, [])


def test_a_cut_off_name_escape_and_arguments_stay_as_written() -> None:
    text = '<tool_call>[{"name": "caf\\u00e9", "arguments": {"q": "\\n\\u00'
    assert parse_tool_calls(text, truncated=True) == ("", [ToolCall("café", '{"q": "\\n\\u00')])
    assert parse_tool_calls('<tool_call>[{"name": "caf\\u00', truncated=True, names=("café", "tea")) == (
        "",
        [ToolCall("café", "")],
    )
