"""OpenAI's Responses API (/v1/responses) on a real server, driven by the official openai client and raw HTTP.

Greedy outputs are checked against the chat endpoint given the same conversation: a response is a chat completion
in another shape, so the two must agree token for token.
"""

from __future__ import annotations

import json
import typing
from typing import TYPE_CHECKING, Any

import httpx
import jsonschema
import openai
import pytest
from openai.types.responses import (
    ResponseCompletedEvent,
    ResponseFunctionToolCall,
    ResponseIncompleteEvent,
    ResponseOutputMessage,
    ResponseStreamEvent,
    ResponseTextDeltaEvent,
)

from server.errors import APIError
from server.responses_protocol import ResponseObject
from server.responses_stream import OutputEvents
from server.tool_calls import ToolUse
from tests.test_server_errors import assert_error_shape
from tests.test_structured_server import WEATHER

if TYPE_CHECKING:
    from tests.server_fixtures import Launcher, ServerProcess

pytest_plugins = ["tests.server_fixtures"]

RESPONSES = "/v1/responses"
SYSTEM = "You are a concise assistant."
QUESTION = "Name a primary colour."
GREEDY: dict[str, Any] = {"temperature": 0.0}
TOOL = {"type": "function", **WEATHER}  # the Responses API's flat shape
WEATHER_QUESTION = "What is the weather like in Paris right now?"
COLOUR = {
    "type": "object",
    "properties": {"colour": {"enum": ["red", "yellow", "blue"]}, "shade": {"type": "integer", "minimum": 0}},
    "required": ["colour", "shade"],
    "additionalProperties": False,
}
KEYS = ("key-a", "key-b")
STORE_SIZE = 2


def chat_text(client: openai.OpenAI, model: str, messages: list[dict[str, Any]], max_tokens: int, **kwargs: Any) -> Any:
    """The greedy chat completion of ``messages``: the reference a response must equal."""
    return client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **GREEDY, **kwargs)


def calls_of(response: Any) -> list[tuple[str, str]]:
    return [(item.name, item.arguments) for item in response.output if item.type == "function_call"]


def expected_status(finish_reason: str) -> tuple[str, str | None]:
    return ("incomplete", "max_output_tokens") if finish_reason == "length" else ("completed", None)


# ---------------------------------------------------------------- events, without a server
def read_with_the_sdk(wire: list[str]) -> list[Any]:
    """Each event parsed as the SDK's model of its type; the ``event:`` line must name that type."""
    union = typing.get_args(ResponseStreamEvent)[0]
    models = {typing.get_args(m.model_fields["type"].annotation)[0]: m for m in typing.get_args(union)}
    parsed = []
    for block in wire:
        name, data = block.removesuffix("\n\n").split("\n")
        payload = json.loads(data.removeprefix("data: "))
        assert name == f"event: {payload['type']}"
        parsed.append(models[payload["type"]].model_validate(payload))
    assert [event.sequence_number for event in parsed] == list(range(len(parsed)))
    return parsed


def test_every_stream_event_is_one_the_sdk_reads() -> None:
    pending = ResponseObject(
        id="resp_1", status="in_progress", model="m", temperature=1.0, top_p=1.0, text={}, tool_choice="auto"
    )
    events = OutputEvents(ToolUse(tools=[], forced=None))
    wire = [events.lifecycle("response.created", pending)]
    for delta in ("Let me check.", "\n", '<tool_call>[{"name": "f", "arguments": {"a": 1}}]</tool_call>', "\n"):
        wire += events.feed(delta, None)
    wire += events.feed("Done.", "stop")
    wire += events.finish("completed")
    wire.append(events.lifecycle("response.completed", pending.model_copy(update={"output": events.items})))
    wire.append(events.error(APIError(500, "generation failed", code="generation_error")))
    parsed = read_with_the_sdk(wire)
    message = ["response.output_item.added", "response.content_part.added", "response.output_text.delta"]
    message_done = ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    call = ["response.output_item.added", "response.function_call_arguments.delta"]
    call_done = ["response.function_call_arguments.done", "response.output_item.done"]
    assert [event.type for event in parsed] == [
        "response.created",
        *message,
        *message_done,  # the message closes when the call begins
        *call,
        *call_done,
        *message,  # the text after the call is a message of its own
        *message_done,
        "response.completed",
        "error",
    ]
    assert [item.type for item in parsed[-2].response.output] == ["message", "function_call", "message"]
    first, function_call, last = parsed[-2].response.output
    texts = (first.content[0].text, last.content[0].text)
    assert texts == ("Let me check.", "Done.")  # the whitespace around a call goes
    assert (function_call.name, json.loads(function_call.arguments)) == ("f", {"a": 1})
    assert [parsed[i].output_index for i in (1, 8, 12)] == [0, 1, 2]
    assert (parsed[-1].code, parsed[-1].message) == ("generation_error", "generation failed")

    # Nothing generated: still one (empty) message.
    empty = OutputEvents(None)
    [*_, done] = read_with_the_sdk(empty.finish("completed"))
    assert done.item.content[0].text == "" and done.item.status == "completed"


# ---------------------------------------------------------------- plain
def test_greedy_response_equals_greedy_chat(client: openai.OpenAI, model: str) -> None:
    chat = chat_text(client, model, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}], 12)
    response = client.responses.create(model=model, instructions=SYSTEM, input=QUESTION, max_output_tokens=12, **GREEDY)
    assert response.output_text == chat.choices[0].message.content
    assert response.id.startswith("resp_") and response.object == "response" and response.model == model
    [message] = response.output
    assert isinstance(message, ResponseOutputMessage)
    assert message.id.startswith("msg_") and message.role == "assistant"
    assert [(part.type, part.annotations) for part in message.content] == [("output_text", [])]
    status, reason = expected_status(chat.choices[0].finish_reason)
    assert response.status == status and message.status == status
    assert (response.incomplete_details.reason if response.incomplete_details else None) == reason
    usage = response.usage
    assert (usage.input_tokens, usage.output_tokens) == (chat.usage.prompt_tokens, chat.usage.completion_tokens)
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0
    assert 0 < usage.input_tokens_details.cached_tokens <= usage.input_tokens  # the chat request cached the prompt
    # What the request asked for, echoed with the defaults it got.
    assert (response.instructions, response.max_output_tokens, response.temperature, response.top_p) == (
        SYSTEM,
        12,
        0.0,
        1.0,
    )
    assert (response.tools, response.tool_choice, response.text.format.type) == ([], "auto", "text")
    assert response.store is True and response.parallel_tool_calls is True and response.previous_response_id is None
    assert response.metadata == {}

    # The same conversation as items: a developer message is the system prompt; content may be a list of parts.
    items = [
        {"role": "developer", "content": SYSTEM},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]},
    ]
    again = client.responses.create(model=model, input=items, max_output_tokens=12, metadata={"k": "v"}, **GREEDY)
    assert again.output_text == response.output_text and again.metadata == {"k": "v"}


def test_streamed_events_build_the_same_response(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    kwargs = {"model": model, "instructions": SYSTEM, "input": QUESTION, "max_output_tokens": 12, **GREEDY}
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [event.sequence_number for event in events] == list(range(len(events)))
    types = [event.type for event in events]
    deltas = [event for event in events if isinstance(event, ResponseTextDeltaEvent)]
    assert deltas and types == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * len(deltas),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    text = "".join(delta.delta for delta in deltas)
    assert text == whole.output_text == events[-2].item.content[0].text == events[-3].part.text == events[-4].text
    item_id = events[2].item.id
    assert {event.item_id for event in [*deltas, events[3], *events[-4:-2]]} == {item_id}
    final = events[-1]
    assert isinstance(final, ResponseCompletedEvent | ResponseIncompleteEvent)
    assert final.response.output_text == text and final.response.output[0].id == item_id
    assert final.response.usage.output_tokens == whole.usage.output_tokens

    # On the wire: each event is named by its type, and nothing follows the last one.
    with http.stream("POST", RESPONSES, json={**kwargs, "stream": True}) as raw:
        assert raw.headers["content-type"].startswith("text/event-stream")
        blocks = [block for block in raw.read().decode().split("\n\n") if block]
    for block in blocks:
        event_line, data_line = block.split("\n")
        assert event_line == f"event: {json.loads(data_line.removeprefix('data: '))['type']}"
    assert blocks[-1].startswith(f"event: response.{whole.status}\n")


# ---------------------------------------------------------------- structured output
def test_text_format_json_schema_gives_valid_json(client: openai.OpenAI, model: str) -> None:
    text = {"format": {"type": "json_schema", "name": "colour", "schema": COLOUR, "strict": True}}
    for stream in (False, True):
        kwargs = {"model": model, "input": QUESTION, "max_output_tokens": 60, "text": text, **GREEDY}
        if stream:
            response = list(client.responses.create(stream=True, **kwargs))[-1].response
        else:
            response = client.responses.create(**kwargs)
        assert response.status == "completed", response.output_text
        jsonschema.validate(json.loads(response.output_text), COLOUR)
        assert response.text.format.type == "json_schema" and response.text.format.schema_ == COLOUR
    response = client.responses.create(
        model=model, input="Describe Paris as JSON.", max_output_tokens=40, text={"format": {"type": "json_object"}}
    )
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)
    else:
        assert response.incomplete_details.reason == "max_output_tokens"


# ---------------------------------------------------------------- tools
def test_forced_function_call_then_its_output_fed_back(client: openai.OpenAI, model: str) -> None:
    forced = {"type": "function", "name": "get_weather"}
    kwargs = {"model": model, "input": WEATHER_QUESTION, "tools": [TOOL], "max_output_tokens": 56, **GREEDY}
    response = client.responses.create(tool_choice=forced, **kwargs)
    assert response.status == "completed" and response.tool_choice.name == "get_weather"
    [call] = response.output
    assert isinstance(call, ResponseFunctionToolCall)
    assert call.id.startswith("fc_") and call.call_id and call.status == "completed" and call.name == "get_weather"
    jsonschema.validate(json.loads(call.arguments), WEATHER["parameters"])
    assert [(tool.name, tool.parameters) for tool in response.tools] == [("get_weather", WEATHER["parameters"])]

    # Streamed: the call is one item, its arguments one delta.
    events = list(client.responses.create(tool_choice=forced, stream=True, **kwargs))
    assert [event.type for event in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert events[2].item.status == "in_progress" and events[3].delta == events[4].arguments == call.arguments
    assert calls_of(events[-1].response) == [("get_weather", call.arguments)]

    # The call and its result go back as items; the model continues as chat does from the same history.
    result = "18 degrees and sunny"
    follow_up = client.responses.create(
        model=model,
        input=[
            {"role": "user", "content": WEATHER_QUESTION},
            call.model_dump(exclude_none=True),
            {"type": "function_call_output", "call_id": call.call_id, "output": result},
        ],
        tools=[TOOL],
        max_output_tokens=16,
        **GREEDY,
    )
    history = [
        {"role": "user", "content": WEATHER_QUESTION},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": call.call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}
            ],
        },
        {"role": "tool", "tool_call_id": call.call_id, "content": result},
    ]
    chat = chat_text(client, model, history, 16, tools=[{"type": "function", "function": WEATHER}]).choices[0]
    assert follow_up.output_text == (chat.message.content or "")
    assert calls_of(follow_up) == [(c.function.name, c.function.arguments) for c in chat.message.tool_calls or []]


def test_a_call_cut_off_by_max_output_tokens_is_an_incomplete_item(client: openai.OpenAI, model: str) -> None:
    kwargs = {"model": model, "input": WEATHER_QUESTION, "tools": [TOOL], "max_output_tokens": 8, **GREEDY}
    forced = {"type": "function", "name": "get_weather"}
    whole = client.responses.create(tool_choice=forced, **kwargs)
    streamed = list(client.responses.create(tool_choice=forced, stream=True, **kwargs))[-1]
    assert streamed.type == "response.incomplete"
    for response in (whole, streamed.response):
        assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
        [call] = response.output
        assert (call.type, call.name, call.status) == ("function_call", "get_weather", "incomplete")
    assert streamed.response.output[0].arguments == whole.output[0].arguments


# ---------------------------------------------------------------- stored responses
def test_previous_response_id_continues_the_conversation(client: openai.OpenAI, model: str) -> None:
    first = client.responses.create(
        model=model, instructions=SYSTEM, input="My name is Ada.", max_output_tokens=8, **GREEDY
    )
    second = client.responses.create(
        model=model, previous_response_id=first.id, input="What is my name?", max_output_tokens=8, **GREEDY
    )
    assert second.previous_response_id == first.id and second.instructions is None
    # The earlier input and output are the prefix; the earlier instructions are not carried over (as OpenAI does).
    history = [
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "What is my name?"},
    ]
    assert second.output_text == chat_text(client, model, history, 8).choices[0].message.content
    third = client.responses.create(
        model=model, previous_response_id=second.id, input="Thanks.", max_output_tokens=8, **GREEDY
    )
    history += [{"role": "assistant", "content": second.output_text}, {"role": "user", "content": "Thanks."}]
    assert third.output_text == chat_text(client, model, history, 8).choices[0].message.content


def test_retrieve_and_delete(client: openai.OpenAI, model: str, http: httpx.Client) -> None:
    response = client.responses.create(model=model, input="Hello", max_output_tokens=4)
    assert client.responses.retrieve(response.id).model_dump() == response.model_dump()
    deleted = http.delete(f"{RESPONSES}/{response.id}")
    assert deleted.status_code == 200 and deleted.json() == {"id": response.id, "object": "response", "deleted": True}
    for request in (lambda: client.responses.retrieve(response.id), lambda: client.responses.delete(response.id)):
        with pytest.raises(openai.NotFoundError):
            request()
    unstored = client.responses.create(model=model, input="Hello", max_output_tokens=4, store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)
    kept = client.responses.create(model=model, input="Hello", max_output_tokens=4)
    client.responses.delete(kept.id)  # the SDK reads no body


@pytest.fixture(scope="module")
def keyed(launch_server: Launcher) -> ServerProcess:
    """A server with two API keys and room for two stored responses."""
    flags = ["--max-stored-responses", str(STORE_SIZE)]
    return launch_server("responses-keyed", flags, env={"SPINDLE_API_KEY": ",".join(KEYS)}).wait_ready()


def test_stored_responses_are_per_key_and_least_recently_used_go_first(keyed: ServerProcess) -> None:
    alice, bob = keyed.client(KEYS[0]), keyed.client(KEYS[1])

    def create(**kwargs: Any) -> Any:
        return alice.responses.create(input="Hello", max_output_tokens=2, **kwargs)

    mine = create()
    for other_key in (
        lambda: bob.responses.retrieve(mine.id),
        lambda: bob.responses.delete(mine.id),
        lambda: bob.responses.create(input="Hi", max_output_tokens=2, previous_response_id=mine.id),
    ):
        with pytest.raises(openai.NotFoundError):  # to another key, the id does not exist
            other_key()
    assert alice.responses.retrieve(mine.id).id == mine.id

    second = create()  # the store is full: [mine, second]
    alice.responses.retrieve(mine.id)  # reading it is a use: [second, mine]
    third = create()  # second, the least recently used, goes
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(second.id)
    assert alice.responses.retrieve(third.id).id == third.id
    assert alice.responses.retrieve(mine.id).id == mine.id  # [third, mine]
    continued = create(previous_response_id=third.id)  # continuing from one is a use too: third stays, mine goes
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(mine.id)
    assert alice.responses.retrieve(third.id).id == third.id
    assert alice.responses.retrieve(continued.id).previous_response_id == third.id


# ---------------------------------------------------------------- errors
BAD_FIELDS = [
    ({"background": True}, 400, "background", None),
    ({"reasoning": {"effort": "low"}}, 400, "reasoning", None),
    ({"truncation": "auto"}, 400, "truncation", None),
    ({"include": ["message.output_text.logprobs"]}, 400, "include", None),
    ({"n": 2}, 400, "n", None),
    ({"text": {"verbosity": "low"}}, 400, "text.verbosity", None),
    ({"tools": [{"type": "web_search"}]}, 400, "tools.0", "web_search"),
    ({"tools": [TOOL], "tool_choice": {"type": "function", "name": "nope"}}, 400, "tool_choice", "nope"),
    ({"tool_choice": {"type": "web_search_preview"}}, 400, "tool_choice.function.type", None),
    ({"tool_choice": "required"}, 400, "tool_choice", "tools"),
    ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     400, "text.format", "uniqueItems"),
    ({"text": {"format": {"type": "json_schema", "name": "x"}}}, 400, "text.format", "schema"),
    ({"tools": [TOOL], "text": {"format": {"type": "json_object"}}}, 400, "tools", None),
    ({"input": []}, 400, "input", "empty"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, 400, "input.", None),
    ({"input": [{"type": "reasoning", "summary": []}]}, 400, "input.list.0", "function_call_output"),
    ({"temperature": -1}, 400, "temperature", None),
    ({"top_k": -2}, 400, "top_k", None),
    ({"max_output_tokens": 0}, 400, "max_output_tokens", None),
    ({"max_output_tokens": 4096}, 400, "max_output_tokens", None),
    ({"metadata": {"k": "v" * 513}}, 400, "metadata", None),
    ({"model": "gpt-4o"}, 404, "model", "gpt-4o"),
    ({"previous_response_id": "resp_unknown"}, 404, "previous_response_id", "resp_unknown"),
]  # fmt: skip


@pytest.mark.parametrize(("fields", "status", "param", "mentions"), BAD_FIELDS)
def test_bad_requests_are_refused_naming_the_parameter(
    http: httpx.Client, fields: dict[str, Any], status: int, param: str, mentions: str | None
) -> None:
    for stream in (False, True):  # refused before any event
        body = {"input": "Hi", "max_output_tokens": 4, "stream": stream} | fields
        error = assert_error_shape(http.post(RESPONSES, json=body), status)
        assert error["param"].startswith(param) if param.endswith(".") else error["param"] == param, error
        assert mentions is None or mentions in error["message"]
    if param == "previous_response_id":
        assert error["code"] == "previous_response_not_found" and error["type"] == "not_found_error"


def test_unknown_ids_and_malformed_bodies(http: httpx.Client) -> None:
    for method in ("GET", "DELETE"):
        error = assert_error_shape(http.request(method, f"{RESPONSES}/resp_unknown"), 404)
        assert error["param"] == "response_id"
    assert assert_error_shape(http.get(f"{RESPONSES}/resp_unknown?stream=true"), 400)["param"] == "stream"
    for body in (b"{", b"[]", b'{"input": 5}', b'{"max_output_tokens": 4}'):
        assert_error_shape(http.post(RESPONSES, content=body, headers={"Content-Type": "application/json"}), 400)
