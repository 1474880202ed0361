"""Hostile input against the shared server: each gets a clear OpenAI-shaped 4xx at once; the server keeps serving."""

from __future__ import annotations

import json
import time
from typing import TYPE_CHECKING

import httpx
import pytest

from tests.test_server_errors import CHAT, COMPLETIONS, assert_error_shape, assert_still_serving

if TYPE_CHECKING:
    from tests.server_fixtures import ServerProcess

pytest_plugins = ["tests.server_fixtures"]

FAST = 2.0  # seconds: a refusal involves no model step
USER = [{"role": "user", "content": "Hi"}]


def post_raw(http: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json"}, timeout=10)


def completion(fields: str) -> bytes:
    """A completion body with extra fields written as raw JSON text (NaN and Infinity are not JSON, but parse)."""
    return ('{"prompt": "Hello", "max_tokens": 2, ' + fields + "}").encode()


NUMBERS = [
    ("temperature", "NaN"),
    ("temperature", "Infinity"),
    ("temperature", "-0.5"),
    ("top_p", "NaN"),
    ("top_p", "-1"),
    ("top_k", "-5"),
    ("top_k", "Infinity"),
    ("min_p", "NaN"),
    ("presence_penalty", "Infinity"),
    ("frequency_penalty", "-Infinity"),
    ("repetition_penalty", "Infinity"),
    ("repetition_penalty", "NaN"),
    ("repetition_penalty", "-1"),
    ("seed", "NaN"),
    ("max_tokens", "-1"),
    ("max_tokens", "NaN"),
    ("n", "-1"),
    ("logprobs", "-1"),
    ("min_tokens", "-1"),
    ("priority", "NaN"),
    ("priority", "1e400"),
    ("priority", "9" * 30),
]


@pytest.mark.parametrize(("param", "value"), NUMBERS, ids=[f"{p}={v[:8]}" for p, v in NUMBERS])
def test_negative_and_non_finite_numbers_are_400(param: str, value: str, http: httpx.Client) -> None:
    error = assert_error_shape(post_raw(http, COMPLETIONS, completion(f'"{param}": {value}')), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


WRONG_TYPES = [
    (COMPLETIONS, {"prompt": [True, False]}, "prompt"),
    (COMPLETIONS, {"n": True}, "n"),
    (COMPLETIONS, {"max_tokens": 2.5}, "max_tokens"),
    (COMPLETIONS, {"temperature": "0.5"}, "temperature"),
    (COMPLETIONS, {"stop_token_ids": [False]}, "stop_token_ids.0"),
    (CHAT, {"messages": USER, "logprobs": 1}, "logprobs"),
    ("/detokenize", {"tokens": [1, False]}, "tokens.1"),
]


@pytest.mark.parametrize(("path", "fields", "param"), WRONG_TYPES, ids=[str(f)[:40] for _, f, _ in WRONG_TYPES])
def test_values_of_the_wrong_json_type_are_400(path: str, fields: dict, param: str, http: httpx.Client) -> None:
    """No silent coercion: true is not the token id 1, "0.5" is not a number."""
    body = {"prompt": "Hello", "max_tokens": 2} if path == COMPLETIONS else {"max_tokens": 2}
    error = assert_error_shape(http.post(path, json=body | fields), 400)
    assert str(error["param"]).startswith(param)


LOGIT_BIAS_KEYS = ["abc", "²", "٣", "1e3", " 5", "5 ", "+5", "9" * 5000, "-1", "99999999", ""]


@pytest.mark.parametrize("key", LOGIT_BIAS_KEYS, ids=[repr(k[:8]) for k in LOGIT_BIAS_KEYS])
def test_logit_bias_with_bad_keys_is_400(key: str, http: httpx.Client) -> None:
    body = {"prompt": "Hello", "max_tokens": 2, "logit_bias": {key: 1.0}}
    error = assert_error_shape(http.post(COMPLETIONS, json=body), 400)
    assert error["param"] == "logit_bias"


def test_logit_bias_with_a_nan_value_is_400(http: httpx.Client) -> None:
    error = assert_error_shape(post_raw(http, COMPLETIONS, completion('"logit_bias": {"5": NaN}')), 400)
    assert error["param"] == "logit_bias.5"


@pytest.mark.parametrize(
    "prompt",
    [[-1], [49152], [10**30], [[1, 2], [99_999_999]], [[5], [-3]]],
    ids=["negative", "vocab-size", "huge", "second-of-batch", "negative-in-batch"],
)
def test_prompt_token_ids_outside_the_vocabulary_are_400(prompt: list, http: httpx.Client) -> None:
    error = assert_error_shape(http.post(COMPLETIONS, json={"prompt": prompt, "max_tokens": 2}), 400)
    assert error["param"] == "prompt"


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "wizard", "content": "hi"}],
        [{"role": "user"}],
        [{"role": "system"}, *USER],
        [{"role": "assistant", "content": None}, *USER],
        [{"content": "hi"}],
        [{"role": "user", "content": 5}],
        [{"role": "user", "content": [{"type": "text"}]}],
        [{"role": "user", "content": ["hi"]}],
        ["hi"],
        "hi",
    ],
    ids=[
        "unknown-role",
        "no-content",
        "system-without-content",
        "assistant-without-content-or-tools",
        "no-role",
        "content-a-number",
        "text-part-without-text",
        "part-not-an-object",
        "message-not-an-object",
        "messages-a-string",
    ],
)
def test_bad_chat_messages_are_400(messages: object, http: httpx.Client) -> None:
    error = assert_error_shape(http.post(CHAT, json={"messages": messages, "max_tokens": 2}), 400)
    assert str(error["param"]).startswith("messages")


def test_invalid_utf8_is_400(http: httpx.Client) -> None:
    for content in (b"\xff\xfe\xfd", b'{"prompt": "caf\xe9", "max_tokens": 2}', b'{"prompt": "\xc0\xaf"}'):
        started = time.monotonic()
        assert_error_shape(post_raw(http, COMPLETIONS, content), 400)
        assert time.monotonic() - started < FAST
    assert_still_serving(http)


def test_ten_megabyte_body_is_413(server: ServerProcess, http: httpx.Client) -> None:
    body = b'{"prompt": "' + b"a" * (10 * 2**20) + b'"}'
    started = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=30) as fresh:  # the server may close this connection
        assert_error_shape(post_raw(fresh, COMPLETIONS, body), 413)
    assert time.monotonic() - started < 10
    assert_still_serving(http)


@pytest.mark.parametrize(
    ("path", "content"),
    [
        (COMPLETIONS, b"[" * 30_000 + b"]" * 30_000),
        (COMPLETIONS, b'{"prompt": "hi", "logit_bias": ' + b'{"a":' * 10_000 + b"1" + b"}" * 10_001),
        (
            CHAT,
            b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": '
            + b'{"a":' * 900
            + b"1"
            + b"}" * 901,
        ),
        (CHAT, b'{"messages": [{"role": "user", "content": [' + b"[" * 900 + b"]" * 900 + b"]}]}"),
    ],
    ids=["array", "object-in-a-field", "template-kwargs", "content-parts"],
)
def test_deeply_nested_json_is_400(path: str, content: bytes, http: httpx.Client) -> None:
    started = time.monotonic()
    assert_error_shape(post_raw(http, path, content), 400)
    assert time.monotonic() - started < FAST
    assert_still_serving(http)


@pytest.mark.parametrize(
    "fields",
    [{"n": 10**6}, {"n": 10**30}, {"n": 129}, {"n": 128, "prompt": ["a", "b"]}, {"n": 64, "prompt": ["a"] * 200}],
    ids=["million", "huge", "past-max-n", "batch-doubles-it", "batch-of-200"],
)
def test_huge_n_is_400_at_once(fields: dict, http: httpx.Client) -> None:
    started = time.monotonic()
    error = assert_error_shape(http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2} | fields), 400)
    assert time.monotonic() - started < FAST  # nothing was queued: no engine request per choice
    assert error["param"] == "n"


@pytest.mark.parametrize("max_tokens", [10**9, 10**30])
def test_huge_max_tokens_is_400(max_tokens: int, http: httpx.Client) -> None:
    for path, body in ((COMPLETIONS, {"prompt": "Hello"}), (CHAT, {"messages": USER})):
        error = assert_error_shape(http.post(path, json=body | {"max_tokens": max_tokens}), 400)
        assert (error["param"], error["code"]) == ("max_tokens", "context_length_exceeded")
        assert str(max_tokens) in error["message"]


def test_thousands_of_stop_strings_are_400(http: httpx.Client) -> None:
    stop = [f"stop{i}" for i in range(5000)]
    for path, body in ((COMPLETIONS, {"prompt": "Hello"}), (CHAT, {"messages": USER})):
        error = assert_error_shape(http.post(path, json=body | {"max_tokens": 2, "stop": stop}), 400)
        assert error["param"] == "stop"
        assert "5000" in error["message"]
    assert http.post(COMPLETIONS, json={"prompt": "Hi", "max_tokens": 2, "stop": ["a"] * 16}).status_code == 200


def test_tokenize_routes_refuse_bad_input(http: httpx.Client) -> None:
    for path, body in (
        ("/detokenize", {"tokens": [-1]}),
        ("/detokenize", {"tokens": [10**30]}),
        ("/detokenize", {"tokens": "abc"}),
        ("/tokenize", {"prompt": "x", "messages": USER}),
        ("/tokenize", {"messages": [{"role": "wizard", "content": "x"}]}),
    ):
        assert_error_shape(http.post(path, json=body), 400)


def test_the_server_serves_after_a_barrage(server: ServerProcess, http: httpx.Client) -> None:
    """Every hostile body above, once more back to back, then real work: the server is unharmed."""
    bodies = [completion(f'"{p}": {v}') for p, v in NUMBERS]
    bodies += [b"[" * 30_000, b"\xff", json.dumps({"prompt": "Hi", "n": 10**6}).encode()]
    for content in bodies:
        assert post_raw(http, COMPLETIONS, content).status_code == 400
    assert_still_serving(http)
    chat = http.post(CHAT, json={"messages": USER, "max_tokens": 3})
    assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] >= 1
    assert server.wait_idle()["spindle:kv_cache_usage_perc"] == 0
