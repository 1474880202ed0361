"""One streaming request to an OpenAI-compatible endpoint, timed token by token."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from bench.datasets import BenchRequest

CHAT_ENDPOINT = "/v1/chat/completions"
COMPLETIONS_ENDPOINT = "/v1/completions"


@dataclass
class RequestResult:
    prompt_len: int
    success: bool = False
    error: str = ""
    start: float = 0.0  # perf_counter seconds when the request was sent
    ttft: float = 0.0  # seconds to the first content chunk
    latency: float = 0.0  # seconds to the end of the stream
    itl: list[float] = field(default_factory=list)  # gaps between content chunks after the first
    output_tokens: int = 0
    generated_text: str = ""

    @property
    def tpot(self) -> float | None:
        """Time per output token after the first (None for a one-token output)."""
        if self.output_tokens < 2:
            return None
        return (self.latency - self.ttft) / (self.output_tokens - 1)

    def token_times(self) -> list[float]:
        """Absolute times (perf_counter) at which content chunks arrived."""
        times = [self.start + self.ttft]
        for gap in self.itl:
            times.append(times[-1] + gap)
        return times


def request_body(
    request: BenchRequest, endpoint: str, model: str, ignore_eos: bool, response_format: dict[str, Any] | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": request.output_len,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if ignore_eos:
        body["ignore_eos"] = True
    if response_format is not None:
        body["response_format"] = response_format
    if endpoint == CHAT_ENDPOINT:
        body["messages"] = request.messages
    else:
        body["prompt"] = request.prompt
    return body


def _chunk_text(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    if "delta" in choice:
        return choice["delta"].get("content") or ""
    return choice.get("text") or ""


async def send_request(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], prompt_len: int, headers: dict[str, str]
) -> RequestResult:
    result = RequestResult(prompt_len=prompt_len)
    result.start = time.perf_counter()
    last = result.start
    chunks = 0
    usage_tokens = None
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:500]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                payload = line[len("data:") :].strip()
                if payload == "[DONE]":
                    break
                chunk = json.loads(payload)
                if chunk.get("error"):
                    result.error = str(chunk["error"].get("message", chunk["error"]))
                    return result
                if chunk.get("usage"):
                    usage_tokens = chunk["usage"].get("completion_tokens")
                text = _chunk_text(chunk)
                if not text:
                    continue
                now = time.perf_counter()
                if chunks == 0:
                    result.ttft = now - result.start
                else:
                    result.itl.append(now - last)
                last = now
                chunks += 1
                result.generated_text += text
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - result.start
    result.output_tokens = usage_tokens if usage_tokens is not None else chunks
    if chunks == 0:  # nothing generated (an immediate end of sequence): the first "token" is the end
        result.ttft = result.latency
    result.success = True
    return result
