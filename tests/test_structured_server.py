"""Structured output and tool calling through a real server, driven by the official openai client.

Every constrained output is checked with independent validators (``jsonschema``, Python's ``re``), and greedy
outputs against the offline engine given the same prompt.
"""

from __future__ import annotations

import asyncio
import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import openai
import pytest

from engine.sampling_params import SamplingParams
from engine.tools.parser import parse_tool_calls
from engine.tools.prompt import conversation_with_tools
from tests.test_structured import late_failing_grammar

if TYPE_CHECKING:
    from engine.llm import LLM
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

RECORD = {  # nested objects, arrays, enums, bounded numbers, required and optional fields, string patterns; short
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}[0-9]$"},
        "level": {"enum": ["low", "high", 3]},
        "score": {"type": "number", "minimum": -5, "maximum": 5},
        "tags": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {"k": {"enum": ["a", "b"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
                "required": ["k"],
                "additionalProperties": False,
            },
        },
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["id", "level", "score"],
    "additionalProperties": False,
}
ORDER = {  # the same features at a larger scale
    "type": "object",
    "properties": {
        "id": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"},
        "status": {"enum": ["open", "paid", "shipped"]},
        "total": {"type": "number", "minimum": 0, "maximum": 1000},
        "items": {
            "type": "array",
            "minItems": 1,
            "maxItems": 3,
            "items": {
                "type": "object",
                "properties": {
                    "sku": {"type": "string", "maxLength": 8},
                    "qty": {"type": "integer", "minimum": 1, "maximum": 9},
                },
                "required": ["sku", "qty"],
                "additionalProperties": False,
            },
        },
        "customer": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 16}, "vip": {"type": "boolean"}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "note": {"type": "string", "maxLength": 20},
    },
    "required": ["id", "status", "total", "items", "customer"],
    "additionalProperties": False,
}
SCHEMAS = {
    "order": ORDER,
    "enums_and_bounds": {
        "type": "object",
        "properties": {
            "level": {"enum": ["low", "mid", "high", 3, None]},
            "score": {"type": "integer", "minimum": -5, "maximum": 5},
            "ratio": {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
        },
        "required": ["level", "score", "ratio"],
        "additionalProperties": False,
    },
    "array_of_records": {
        "type": "array",
        "minItems": 2,
        "maxItems": 4,
        "items": {
            "type": "object",
            "properties": {"code": {"type": "string", "pattern": "^[a-z]{3}[0-9]$"}, "ok": {"type": "boolean"}},
            "required": ["code"],
            "additionalProperties": False,
        },
    },
    "optional_fields": {
        "type": "object",
        "properties": {
            "title": {"type": "string", "minLength": 1, "maxLength": 24},
            "year": {"type": "integer", "minimum": 1900, "maximum": 2100},
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
        },
        "required": ["title"],
        "additionalProperties": False,
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 99},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
}
WEATHER = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 24}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"],
        "additionalProperties": False,
    },
}
TIME = {
    "name": "get_time",
    "description": "Get the local time in a timezone",
    "parameters": {
        "type": "object",
        "properties": {"timezone": {"type": "string", "pattern": "^[A-Z][a-z]+/[A-Z][a-z]+$"}},
        "required": ["timezone"],
        "additionalProperties": False,
    },
}
TOOLS = [{"type": "function", "function": WEATHER}, {"type": "function", "function": TIME}]
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]
PROMPT = "The capital of France is Paris. The capital of Germany is"


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


async def sample_schema(server: ServerProcess, schema: dict[str, Any], count: int, n: int) -> list[Any]:
    """``count`` chat choices at temperature 1 under ``schema``, as concurrent requests of ``n`` (distinct seeds)."""
    client = server.async_client()
    messages = [{"role": "user", "content": "Make up an example record as JSON."}]

    async def one(seed: int) -> list[Any]:
        response = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct",
            messages=messages,
            temperature=1.0,
            max_tokens=400,
            n=n,
            seed=seed,
            response_format=json_schema_format(schema),  # type: ignore[arg-type]
        )
        return response.choices

    batches = await asyncio.gather(*(one(seed) for seed in range(0, count, n)))
    return [choice for batch in batches for choice in batch]


def assert_all_valid(choices: list[Any], schema: dict[str, Any]) -> None:
    for choice in choices:
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), schema)


def assert_json_object_or_length(text: str, finish_reason: str) -> None:
    """A JSON object when the output finished by itself; otherwise it ran out of tokens (and does not claim to be
    complete)."""
    if finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert finish_reason == "length"


# ---------------------------------------------------------------- response_format and the other constraints
def test_fifty_sampled_outputs_validate(server: ServerProcess) -> None:
    choices = asyncio.run(sample_schema(server, RECORD, 50, n=25))
    assert len(choices) == 50
    assert_all_valid(choices, RECORD)
    assert len({c.message.content for c in choices}) > 25  # sampled, not one answer repeated


@pytest.mark.slow
@pytest.mark.parametrize("name", list(SCHEMAS))
def test_fifty_sampled_outputs_validate_per_schema(server: ServerProcess, name: str) -> None:
    assert_all_valid(asyncio.run(sample_schema(server, SCHEMAS[name], 50, n=10)), SCHEMAS[name])


def test_completions_endpoint_constraints(client: openai.OpenAI, model: str) -> None:
    regex = r"(yes|no), because [a-z ]{3,30}\."
    for extra in ({"guided_regex": regex}, {"structured_outputs": {"regex": regex}}):
        response = client.completions.create(
            model=model, prompt="Is Paris in France?", max_tokens=40, seed=0, extra_body=extra
        )
        for choice in response.choices:
            assert choice.finish_reason == "stop" and re.fullmatch(regex, choice.text), choice.text
    colours = ["red", "green", "light blue"]
    response = client.completions.create(
        model=model, prompt="A colour:", max_tokens=8, n=4, seed=1, extra_body={"guided_choice": colours}
    )
    assert all(c.text in colours and c.finish_reason == "stop" for c in response.choices)
    response = client.completions.create(
        model=model,
        prompt="A JSON object:",
        max_tokens=60,
        n=2,
        seed=2,
        extra_body={"response_format": {"type": "json_object"}},
    )
    for choice in response.choices:
        assert_json_object_or_length(choice.text, choice.finish_reason)
    grammar = 'root ::= "The answer is " ("yes" | "no") "."'
    response = client.completions.create(
        model=model, prompt="Q:", max_tokens=10, extra_body={"guided_grammar": grammar}
    )
    assert response.choices[0].text in ("The answer is yes.", "The answer is no.")


def test_grammar_that_cannot_finish_ends_with_length(client: openai.OpenAI, model: str) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "minItems": 40}
    for stream in (False, True):
        kwargs = {"model": model, "messages": ASK, "max_tokens": 20, "response_format": json_schema_format(schema)}
        if stream:
            chunks = list(client.chat.completions.create(stream=True, **kwargs))
            text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        else:
            response = client.chat.completions.create(**kwargs)
            text, finish = response.choices[0].message.content, [response.choices[0].finish_reason]
        assert finish == ["length"]
        assert text.startswith("[")
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


def test_structured_rows_leave_batch_neighbours_unchanged(client: openai.OpenAI, model: str, offline_llm: LLM) -> None:
    """A greedy request that shares its batches with constrained ones decodes exactly as it does alone."""
    offline = offline_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12))[0].outputs[0]
    with ThreadPoolExecutor(1) as pool:
        constrained = pool.submit(
            client.chat.completions.create,
            model=model,
            messages=ASK,
            max_tokens=24,
            n=4,
            seed=0,
            response_format={"type": "json_object"},
        )
        free = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0.0)
        for choice in constrained.result().choices:
            assert_json_object_or_length(choice.message.content, choice.finish_reason)
    assert free.choices[0].text == offline.text


@pytest.mark.parametrize(
    ("body", "param", "problem"),
    [
        (
            {"response_format": json_schema_format({"type": "array", "uniqueItems": True})},
            "response_format",
            "uniqueItems",
        ),
        (
            {"response_format": json_schema_format({"type": "integer", "minimum": 3, "maximum": 1})},
            "response_format",
            "minimum",
        ),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
        ({"response_format": {"type": "yaml"}}, "response_format.type", "json_schema"),
        ({"guided_regex": "([a-z"}, "guided_regex", "unclosed"),
        ({"guided_grammar": "root ::= nowhere"}, "guided_grammar", "nowhere"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "only one"),
        ({"structured_outputs": {"structural_tag": "x"}}, "structured_outputs", "structural_tag"),
        ({"guided_json": {"type": "object"}, "min_tokens": 2}, "min_tokens", "min_tokens"),
        ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", "nope"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        ({"tools": TOOLS, "response_format": {"type": "json_object"}}, "tools", "tool_choice"),
        ({"tools": [*TOOLS, TOOLS[0]]}, "tools", "distinct"),
        (
            {
                "tools": [{"type": "function", "function": {**WEATHER, "parameters": {"not": {}}}}],
                "tool_choice": "required",
            },
            "tools",
            "not",
        ),
    ],
)
def test_bad_constraints_are_400_naming_the_problem(
    http: httpx.Client, model: str, body: dict[str, Any], param: str, problem: str
) -> None:
    response = http.post("/v1/chat/completions", json={"model": model, "messages": ASK, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert problem in error["message"]


# ---------------------------------------------------------------- grammars that compile but fail once running
# The shared server takes 64 KiB bodies: 5,000 short options are over the limit on choices but under that one (the
# 50,000 of the in-process test are not).
MANY_CHOICES = [str(i) for i in range(5000)]


@pytest.mark.parametrize(
    ("path", "body", "param", "problem"),
    [
        ("/v1/chat/completions", {"guided_json": {"$ref": "#"}}, "guided_json", "allows no output"),
        ("/v1/completions", {"guided_json": {"$ref": "#"}}, "guided_json", "allows no output"),
        (
            "/v1/chat/completions",
            {"response_format": json_schema_format({"$ref": "#"})},
            "response_format",
            "allows no output",
        ),
        ("/v1/completions", {"guided_grammar": 'start: "x" start'}, "guided_grammar", "Too many items"),
        (
            "/v1/chat/completions",
            {"structured_outputs": {"grammar": 'start: "x" start'}},
            "structured_outputs.grammar",
            "Too many items",
        ),
        ("/v1/completions", {"guided_choice": MANY_CHOICES}, "guided_choice", "at most 1999 options, got 5000"),
    ],
    ids=["ref_chat", "ref_completions", "ref_response_format", "recursion", "recursion_structured", "choices"],
)
def test_grammars_failing_on_their_first_step_are_400_at_admission(
    http: httpx.Client, model: str, path: str, body: dict[str, Any], param: str, problem: str
) -> None:
    prompt = {"messages": ASK} if path.endswith("chat/completions") else {"prompt": PROMPT}
    response = http.post(path, json={"model": model, "max_tokens": 4, **prompt, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", param)
    assert problem in error["message"] and "<state>" not in error["message"]


def test_a_grammar_failing_mid_output_is_400_and_its_batch_mates_finish(
    server: ServerProcess, http: httpx.Client, model: str, offline_llm: LLM
) -> None:
    """A grammar that passes admission but fails on the token its request samples (forced by logit_bias) fails that
    request alone, as a 400 naming the parameter; a request decoding beside it is unchanged, and no step is re-run."""
    offline = offline_llm.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=24))[0].outputs[0]
    b = offline_llm.engine.tokenizer.encode("b", add_special_tokens=False)[0]
    bad = {"model": model, "max_tokens": 4, "temperature": 0.0, "logit_bias": {str(b): 100}}
    bad["guided_grammar"] = late_failing_grammar()
    before = server.wait_idle()
    with ThreadPoolExecutor(1) as pool:
        free = pool.submit(
            http.post, "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 24, "temperature": 0}
        )
        failed = http.post("/v1/completions", json={**bad, "prompt": PROMPT})
        streamed = http.post("/v1/chat/completions", json={**bad, "messages": ASK, "stream": True})
        assert free.result().status_code == 200
    assert free.result().json()["choices"][0]["text"] == offline.text
    assert failed.status_code == 400, failed.text
    error = failed.json()["error"]
    assert (error["type"], error["param"]) == ("invalid_request_error", "guided_grammar")
    assert "Current row has 2002 items" in error["message"] and "<state>" not in error["message"]
    events = [line[len("data: ") :] for line in streamed.text.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["param"] == "guided_grammar"
    after = server.wait_idle()
    assert after["spindle:step_reruns_total"] == before["spindle:step_reruns_total"]
    assert after["spindle:request_success_total[error]"] - before.get("spindle:request_success_total[error]", 0) == 2


# ---------------------------------------------------------------- tools
def reassemble(chunks: list[Any]) -> tuple[str, list[dict[str, Any]], str | None]:
    """Content, tool calls (merged by index as OpenAI clients do) and the finish reason of a streamed choice."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


def test_named_tool_call_round_trip(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    kwargs = {"model": model, "messages": ASK, "tools": TOOLS, "temperature": 0.0, "max_tokens": 80}
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(tool_choice=named, **kwargs)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, WEATHER["parameters"])

    content, streamed, finish = reassemble(
        list(client.chat.completions.create(tool_choice=named, stream=True, **kwargs))
    )
    assert finish == "tool_calls" and content == ""
    assert [(c["name"], json.loads(c["arguments"])) for c in streamed] == [("get_weather", arguments)]
    assert streamed[0]["id"]

    # The call and its result go back in the next turn, rendered into the prompt.
    history = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]
    follow_up = client.chat.completions.create(model=model, messages=history, tools=TOOLS, max_tokens=16)
    assert follow_up.choices[0].finish_reason in ("stop", "length", "tool_calls")
    prompt = http.post(
        "/detokenize", json={"tokens": http.post("/tokenize", json={"messages": history}).json()["tokens"]}
    )
    text = prompt.json()["prompt"]
    assert f'<tool_call>[{{"name": "get_weather", "arguments": {json.dumps(arguments)}}}]</tool_call>' in text
    assert "<tool_response>\n18 degrees and sunny\n</tool_response>" in text


def test_required_tool_calls_always_parse(client: openai.OpenAI, model: str) -> None:
    schemas = {f["function"]["name"]: f["function"]["parameters"] for f in TOOLS}
    for parallel in (False, True):
        response = client.chat.completions.create(
            model=model,
            messages=ASK,
            tools=TOOLS,
            tool_choice="required",
            parallel_tool_calls=parallel,
            temperature=1.0,
            seed=5,
            n=4,
            max_tokens=120,
        )
        for choice in response.choices:
            assert choice.finish_reason == "tool_calls"
            calls = choice.message.tool_calls
            assert len(calls) == 1 if not parallel else len(calls) >= 1
            for call in calls:
                jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def check_call_cut_off(client: openai.OpenAI, kwargs: dict[str, Any], cuts: tuple[int, ...]) -> None:
    """Greedy, the request cut off at each of ``cuts`` max_tokens returns the call of the whole output as far as it
    was written (the name, the beginning of the arguments) with finish_reason "length" and no markup in the content,
    whole and streamed; the whole output's call is complete."""
    whole = client.chat.completions.create(max_tokens=120, **kwargs).choices[0]
    assert whole.finish_reason == "tool_calls"
    [complete] = whole.message.tool_calls
    json.loads(complete.function.arguments)
    for max_tokens in cuts:
        cut = client.chat.completions.create(max_tokens=max_tokens, **kwargs).choices[0]
        assert cut.finish_reason == "length" and not cut.message.content
        [call] = cut.message.tool_calls
        assert call.type == "function" and call.id and call.function.name == complete.function.name
        assert complete.function.arguments.startswith(call.function.arguments)
        assert call.function.arguments != complete.function.arguments
        streamed = client.chat.completions.create(max_tokens=max_tokens, stream=True, **kwargs)
        content, calls, finish = reassemble(list(streamed))
        assert (content, finish) == ("", "length")
        assert [(c["name"], c["arguments"]) for c in calls] == [(call.function.name, call.function.arguments)]


# Greedy, the forced call is <tool_call>[{"name": "get_weather", "arguments": {"city": "Paris", ...: 5 tokens end in
# the tag, 19 in the arguments.
@pytest.mark.parametrize(
    ("tool_choice", "cuts"),
    [({"type": "function", "function": {"name": "get_weather"}}, (5, 19)), ("required", (19,))],
    ids=["named", "required"],
)
def test_a_forced_tool_call_cut_off_by_max_tokens(
    client: openai.OpenAI, model: str, tool_choice: Any, cuts: tuple[int, ...]
) -> None:
    kwargs = {"model": model, "messages": ASK, "tools": TOOLS, "tool_choice": tool_choice, "temperature": 0.0}
    check_call_cut_off(client, kwargs, cuts)


def test_an_auto_tool_call_cut_off_by_max_tokens(client: openai.OpenAI, model: str) -> None:
    """After turns in which the assistant called, the model calls by itself (tool_choice "auto")."""
    messages: list[dict[str, Any]] = []
    for index, city in enumerate(("Oslo", "Rome")):
        arguments = json.dumps({"city": city, "unit": "celsius"})
        call = {"id": f"c{index}", "type": "function", "function": {"name": "get_weather", "arguments": arguments}}
        messages += [
            {"role": "user", "content": f"Weather in {city}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
        ]
    messages.append({"role": "user", "content": "Weather in Paris?"})
    check_call_cut_off(client, {"model": model, "messages": messages, "tools": TOOLS, "temperature": 0.0}, (19,))


def test_auto_tool_choice_matches_the_offline_engine(client: openai.OpenAI, model: str, offline_llm: LLM) -> None:
    """The server's prompt carries the tools as documented: greedy output equals the offline engine's on the same
    rendering, read into content and calls the same way, whole and streamed."""
    prompt = offline_llm.tokenizer.encode_chat(conversation_with_tools(ASK, TOOLS, template_renders=False))
    offline = offline_llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=16))[0].outputs[0]
    expected_content, expected_calls = parse_tool_calls(offline.text, truncated=offline.finish_reason == "length")
    expected_finish = "tool_calls" if expected_calls and offline.finish_reason == "stop" else offline.finish_reason
    kwargs = {"model": model, "messages": ASK, "tools": TOOLS, "temperature": 0.0, "max_tokens": 16}
    choice = client.chat.completions.create(**kwargs).choices[0]
    content, calls, finish = reassemble(list(client.chat.completions.create(stream=True, **kwargs)))
    expected = [(c.name, c.arguments) for c in expected_calls]
    assert [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []] == expected
    assert [(c["name"], c["arguments"]) for c in calls] == expected
    assert (choice.message.content or "").strip() == content.strip() == expected_content.strip()
    assert choice.finish_reason == finish == expected_finish
