"""What the engine reports about a request after each step, and at its end."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampler import SampledToken


@dataclass
class RequestTimes:
    """Wall-clock (time.monotonic) timestamps of one request's life."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None
    tokens: list[float] = field(default_factory=list)
    finished: float | None = None


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    new_token_ids: list[int]
    new_text: str
    new_logprobs: list[SampledToken]
    num_output_tokens: int
    # With SamplingParams.prompt_logprobs, on the first output only: entries for prompt tokens 1.. (the first has none).
    prompt_logprobs: list[SampledToken] | None = None
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    error: str | None = None
    # With error: the request parameter whose value failed it (the client's error, e.g. a grammar that fails once
    # decoding); None when the engine failed.
    error_param: str | None = None
    num_cached_tokens: int = 0
    times: RequestTimes | None = None
