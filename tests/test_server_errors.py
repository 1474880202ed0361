"""Bad input, disconnects and load against a real server: OpenAI-shaped errors, and the server keeps serving."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import httpx
import openai
import pytest

if TYPE_CHECKING:
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
MESSAGES = [{"role": "user", "content": "Hi"}]
LONG_GENERATION = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "temperature": 0.0}


def assert_error_shape(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return error


def post_json(http: httpx.Client, path: str, body: dict[str, Any]) -> httpx.Response:
    """As ``http.post(path, json=body)``, but with JSON's \\u escapes, as a client in any language may send them:
    httpx writes UTF-8 and cannot encode a lone surrogate at all."""
    return http.post(path, content=json.dumps(body), headers={"Content-Type": "application/json"})


def assert_still_serving(http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, json={"prompt": "Hello", "max_tokens": 1})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 1


# ---------------------------------------------------------------- bad input
INVALID_PARAMETERS = [
    (COMPLETIONS, {"temperature": -1}, "temperature"),
    (COMPLETIONS, {"temperature": "hot"}, "temperature"),
    (COMPLETIONS, {"top_p": 0}, "top_p"),
    (COMPLETIONS, {"top_k": -2}, "top_k"),
    (COMPLETIONS, {"min_p": 2}, "min_p"),
    (COMPLETIONS, {"presence_penalty": 3}, "presence_penalty"),
    (COMPLETIONS, {"frequency_penalty": -3}, "frequency_penalty"),
    (COMPLETIONS, {"repetition_penalty": 0}, "repetition_penalty"),
    (COMPLETIONS, {"n": 0}, "n"),
    (COMPLETIONS, {"n": 1000}, "n"),
    (COMPLETIONS, {"max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    (COMPLETIONS, {"logprobs": 21}, "logprobs"),
    (COMPLETIONS, {"seed": 2**64}, "seed"),
    (COMPLETIONS, {"stop": [""]}, "stop"),
    (COMPLETIONS, {"stop_token_ids": [10**9]}, "stop_token_ids"),
    (COMPLETIONS, {"logit_bias": {"abc": 1}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"10000000": 1}}, "logit_bias"),
    (COMPLETIONS, {"logit_bias": {"5": 500}}, "logit_bias"),
    (COMPLETIONS, {"suffix": "x"}, "suffix"),
    (COMPLETIONS, {"prompt": ""}, "prompt"),
    (COMPLETIONS, {"prompt": []}, "prompt"),
    (COMPLETIONS, {"prompt": [10**9]}, "prompt"),
    (COMPLETIONS, {"stream": True, "temperature": -1}, "temperature"),
    (COMPLETIONS, {"prompt": "a lone surrogate \ud800"}, "prompt"),  # no UTF-8 form: once a 500 and a reset
    (COMPLETIONS, {"prompt": ["fine", "\udfff"]}, "prompt"),
    (CHAT, {"max_completion_tokens": 0}, "max_tokens"),  # once "unlimited"; refused as max_tokens 0 is
    (CHAT, {"max_tokens": 0}, "max_tokens"),
    (COMPLETIONS, {"max_tokens": 2.5}, "max_tokens"),
    (CHAT, {"top_logprobs": 2}, "top_logprobs"),
    (CHAT, {"logprobs": True, "top_logprobs": 50}, "top_logprobs"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages"),
    (CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    (CHAT, {"chat_template_kwargs": {"add_generation_prompt": False}}, "messages"),
    (CHAT, {"tool_choice": "required"}, "tool_choice"),
    (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"schema": {"not": {}}}}}, "response_format"),
]


@pytest.mark.parametrize(
    ("path", "fields", "param"), INVALID_PARAMETERS, ids=[str(p[1])[:48] for p in INVALID_PARAMETERS]
)
def test_invalid_parameter_is_400(path: str, fields: dict[str, Any], param: str, http: httpx.Client) -> None:
    base = {"prompt": "Hello", "max_tokens": 2} if path == COMPLETIONS else {"messages": MESSAGES, "max_tokens": 2}
    error = assert_error_shape(post_json(http, path, base | fields), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert_still_serving(http)


def test_context_window_is_400_with_the_numbers(http: httpx.Client, max_model_len: int) -> None:
    prompt = [1000] * (max_model_len - 10)
    error = assert_error_shape(http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 50}), 400)
    assert error["code"] == "context_length_exceeded"
    assert error["param"] == "max_tokens"
    for number in (max_model_len, len(prompt), 50, len(prompt) + 50):
        assert str(number) in error["message"]
    too_long = assert_error_shape(http.post(COMPLETIONS, json={"prompt": [1000] * max_model_len}), 400)
    assert too_long["param"] == "prompt"
    assert str(max_model_len) in too_long["message"]
    chat = assert_error_shape(http.post(CHAT, json={"messages": MESSAGES, "max_tokens": max_model_len}), 400)
    assert chat["code"] == "context_length_exceeded"
    assert_still_serving(http)


def test_integral_floats_count_as_integers(http: httpx.Client) -> None:
    """As in OpenAI's API (JavaScript clients send every number as a float): 2.0 is 2."""
    body = {"prompt": "Hello", "max_tokens": 2.0, "n": 1.0, "ignore_eos": True, "logprobs": 1.0}
    response = http.post(COMPLETIONS, json=body)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 2
    chat = http.post(CHAT, json={"messages": MESSAGES, "max_completion_tokens": 3.0, "ignore_eos": True})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] == 3, chat.text


def test_a_lone_surrogate_to_tokenize_is_400_and_the_connection_stays_open(http: httpx.Client) -> None:
    error = assert_error_shape(post_json(http, "/tokenize", {"prompt": "x\ud800y"}), 400)
    assert error["param"] == "prompt" and "\\ud800" in error["message"]
    assert_still_serving(http)  # the same keep-alive connection: uvicorn no longer resets it


@pytest.mark.parametrize("path", [COMPLETIONS, CHAT, "/tokenize"])
def test_unknown_model_is_404(path: str, http: httpx.Client) -> None:
    body = {"model": "no-such-model", "max_tokens": 2}
    body |= {"messages": MESSAGES} if path == CHAT else {"prompt": "Hello"}
    error = assert_error_shape(http.post(path, json=body), 404)
    assert (error["code"], error["param"]) == ("model_not_found", "model")
    assert_still_serving(http)


@pytest.mark.parametrize(
    "content",
    [b'{"prompt": "Hello",', b"", b"[1, 2]", b"\xff\xfe"],
    ids=["truncated", "empty", "not-an-object", "not-utf8"],
)
def test_malformed_json_is_400(content: bytes, http: httpx.Client) -> None:
    response = http.post(COMPLETIONS, content=content, headers={"content-type": "application/json"})
    assert_error_shape(response, 400)
    assert_still_serving(http)


def test_body_too_large_is_413(http: httpx.Client, max_body_bytes: int) -> None:
    body = b'{"prompt": "' + b"a" * max_body_bytes + b'"}'
    assert_error_shape(http.post(COMPLETIONS, content=body, headers={"content-type": "application/json"}), 413)

    def chunked() -> Iterator[bytes]:  # no Content-Length: the limit applies while reading
        yield body[: len(body) // 2]
        yield body[len(body) // 2 :]

    assert_error_shape(http.post(COMPLETIONS, content=chunked(), headers={"content-type": "application/json"}), 413)
    assert_still_serving(http)


def test_unknown_route_and_method(http: httpx.Client) -> None:
    assert_error_shape(http.get("/v1/nothing"), 404)
    assert_error_shape(http.get(COMPLETIONS), 405)


def test_openai_client_raises_typed_errors(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as bad:
        client.completions.create(model=model, prompt="Hello", temperature=-1)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=MESSAGES)  # type: ignore[arg-type]


# ---------------------------------------------------------------- disconnects
def test_disconnect_mid_stream_frees_kv_blocks(server: ServerProcess, http: httpx.Client) -> None:
    aborted = server.metrics().get("spindle:request_success_total[abort]", 0.0)
    with http.stream("POST", COMPLETIONS, json=LONG_GENERATION | {"stream": True}) as response:
        lines = response.iter_lines()
        assert sum(1 for _, line in zip(range(8), lines) if line.startswith("data: {")) >= 3
        during = server.metrics()
        assert during["spindle:num_requests_running"] == 1
        assert during["spindle:kv_cache_usage_perc"] > 0
    after = server.wait_idle()
    assert after["spindle:num_requests_running"] == 0
    assert after["spindle:kv_cache_usage_perc"] == 0
    assert after["spindle:request_success_total[abort]"] == aborted + 1
    assert_still_serving(http)


def test_disconnect_before_a_full_response_frees_kv_blocks(server: ServerProcess, http: httpx.Client) -> None:
    aborted = server.metrics().get("spindle:request_success_total[abort]", 0.0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{COMPLETIONS}", json=LONG_GENERATION, timeout=1.5)
    after = server.wait_idle()
    assert after["spindle:kv_cache_usage_perc"] == 0
    assert after["spindle:request_success_total[abort]"] == aborted + 1
    assert_still_serving(http)


# ---------------------------------------------------------------- load
def test_concurrent_streaming_clients(server: ServerProcess, http: httpx.Client, model: str) -> None:
    prompts = [f"Story number {i}: once upon a time" for i in range(32)]
    counts = [http.post("/tokenize", json={"prompt": p}).json()["count"] for p in prompts]

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[int, Any, str | None]:
        streamed_tokens, usage, finish = 0, None, None
        stream = await client.completions.create(
            model=model,
            prompt=prompts[i],
            max_tokens=8,
            temperature=0.8,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"return_token_ids": True, "ignore_eos": True},
        )
        async for chunk in stream:
            for choice in chunk.choices:
                streamed_tokens += len(choice.token_ids or [])
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        return streamed_tokens, usage, finish

    async def run_all() -> list[tuple[int, Any, str | None]]:
        async with server.async_client() as client:
            return await asyncio.gather(*(one(client, i) for i in range(32)))

    results = asyncio.run(run_all())
    for (streamed_tokens, usage, finish), prompt_tokens in zip(results, counts):
        assert finish == "length"
        assert streamed_tokens == usage.completion_tokens == 8
        assert usage.prompt_tokens == prompt_tokens
        assert usage.total_tokens == prompt_tokens + 8
    assert server.wait_idle()["spindle:kv_cache_usage_perc"] == 0
