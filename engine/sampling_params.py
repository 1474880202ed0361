"""Per-request sampling and stopping parameters, validated at the edge so bad values never reach a model step."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from engine.errors import SpindleError
from engine.structured.spec import StructuredOutputs

MAX_LOGPROBS = 20


class InvalidParameter(SpindleError, ValueError):
    """A request parameter has an invalid value; ``param`` names it (as in OpenAI's error shape)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None  # None: no logprobs; k: the sampled token's plus the k most likely
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's (but the first) plus the k most likely
    logit_bias: dict[int, float] = field(default_factory=dict)
    structured_outputs: StructuredOutputs | None = None  # a grammar the output must match (vLLM's name)
    speculative_decoding: bool = True  # False: never draft tokens for this request, even with a drafter configured

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.validate()

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5

    @property
    def can_speculate(self) -> bool:
        """Whether verified drafts give this request what sampling alone would. Logprobs and grammars are not
        computed for draft positions, a stop string is found only after a step's tokens are all appended, and a
        seed promises the same draws as a run without drafts."""
        return (
            self.speculative_decoding
            and not self.stop
            and self.logprobs is None
            and self.prompt_logprobs is None
            and self.structured_outputs is None
            and (self.seed is None or self.greedy)
        )

    @property
    def uses_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    def validate(self, vocab_size: int | None = None) -> None:
        checks: list[tuple[bool, str, str]] = [
            (self.n >= 1, "n", f"n must be at least 1, got {self.n}"),
            (
                0.0 <= self.temperature < math.inf,
                "temperature",
                f"temperature must be non-negative and finite, got {self.temperature}",
            ),
            (0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= -1, "top_k", f"top_k must be -1 (disabled), 0 (disabled) or positive, got {self.top_k}"),
            (0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}"),
            (
                -2.0 <= self.presence_penalty <= 2.0,
                "presence_penalty",
                f"presence_penalty must be in [-2, 2], got {self.presence_penalty}",
            ),
            (
                -2.0 <= self.frequency_penalty <= 2.0,
                "frequency_penalty",
                f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}",
            ),
            (
                0.0 < self.repetition_penalty < math.inf,
                "repetition_penalty",
                f"repetition_penalty must be positive and finite, got {self.repetition_penalty}",
            ),
            (
                self.max_tokens is None or self.max_tokens >= 1,
                "max_tokens",
                f"max_tokens must be at least 1, got {self.max_tokens}",
            ),
            (self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}"),
            (
                self.max_tokens is None or self.min_tokens <= self.max_tokens,
                "min_tokens",
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})",
            ),
            (
                self.logprobs is None or 0 <= self.logprobs <= MAX_LOGPROBS,
                "logprobs",
                f"logprobs must be between 0 and {MAX_LOGPROBS}, got {self.logprobs}",
            ),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= MAX_LOGPROBS,
                "prompt_logprobs",
                f"prompt_logprobs must be between 0 and {MAX_LOGPROBS}, got {self.prompt_logprobs}",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings"),
            # The grammar decides where a constrained output ends: banning the end of sequence could leave no token
            # a finished grammar allows, and a stop could cut the output short of it and still claim "stop".
            *(
                (
                    self.structured_outputs is None or not active,
                    param,
                    f"{param} cannot be combined with structured output: the grammar decides where the output ends",
                )
                for param, active in (
                    ("min_tokens", self.min_tokens > 0),
                    ("ignore_eos", self.ignore_eos),
                    ("stop", bool(self.stop)),
                    ("stop_token_ids", bool(self.stop_token_ids)),
                )
            ),
        ]
        for ok, param, message in checks:
            if not ok:
                raise InvalidParameter(param, message)
        if vocab_size is not None:
            for param, ids in (("stop_token_ids", self.stop_token_ids), ("logit_bias", list(self.logit_bias))):
                bad = [i for i in ids if not 0 <= int(i) < vocab_size]
                if bad:
                    raise InvalidParameter(param, f"token id {bad[0]} in {param} is outside the vocabulary")
        for token_id, bias in self.logit_bias.items():
            if not -100.0 <= bias <= 100.0:
                raise InvalidParameter("logit_bias", f"logit_bias for token {token_id} must be in [-100, 100]")
