"""Per-request limits from ServerConfig (and the scheduler's queue bound): choices, stop strings and prompt length,
checked before any work is done."""

from __future__ import annotations

from engine.config import ServerConfig
from engine.tokenizer import Tokenizer
from server.errors import APIError


class RequestLimits:
    def __init__(
        self, config: ServerConfig, tokenizer: Tokenizer, max_model_len: int, max_waiting_requests: int | None = None
    ) -> None:
        self.max_n = config.max_n
        self.max_waiting_requests = max_waiting_requests
        self.max_stop_strings = config.max_stop_strings
        # The completion needs at least one token of the context.
        self.max_prompt_tokens = min(config.max_prompt_tokens or max_model_len, max_model_len - 1)
        self.max_token_bytes = max(
            len(tokenizer.decode([token_id], skip_special_tokens=False).encode())
            for token_id in range(tokenizer.vocab_size)
        )

    def check_choices(self, num_prompts: int, n: int) -> None:
        sequences = num_prompts * n
        prompts = f" for each of {num_prompts} prompts" if num_prompts > 1 else ""
        if sequences > self.max_n:
            raise APIError(400, f"n={n}{prompts} asks for {sequences} choices, more than {self.max_n}", param="n")
        # Each choice waits as one sequence: a request with more than the queue holds could never be queued, and a
        # 503 would have its client retry in vain. One that could fit later gets the engine's 503.
        if self.max_waiting_requests is not None and sequences > self.max_waiting_requests:
            raise APIError(
                400,
                f"the request needs {sequences} sequences (n={n}{prompts}), but this server queues at most "
                f"{self.max_waiting_requests} (--max-waiting-requests)",
                param="n" if n > 1 else "prompt",
            )

    def check_stop(self, stop: str | list[str] | None) -> None:
        if isinstance(stop, list) and len(stop) > self.max_stop_strings:
            raise APIError(400, f"{len(stop)} stop strings, more than {self.max_stop_strings}", param="stop")

    def check_text(self, text: str, param: str) -> None:
        """Refuse text that is not Unicode (a lone surrogate, which JSON's \\ud800 escapes can carry, has no UTF-8
        form), or that cannot fit in a prompt, before tokenizing it, which holds the GIL (about 1 s per MB).

        No token spells more than ``max_token_bytes`` bytes, so longer text has more tokens than any prompt may
        (one token's worth more allows for the space a SentencePiece tokenizer prepends). Tokenizers that fuse a
        run of unknown characters into one token would break this; those Spindle builds fall back to bytes.
        """
        try:
            num_bytes = len(text.encode())
        except UnicodeEncodeError as exc:
            bad = text[exc.start : exc.end].encode("unicode_escape").decode()
            raise APIError(400, f"the {param} is not valid Unicode: a lone surrogate {bad}", param=param) from None
        if num_bytes > (self.max_prompt_tokens + 1) * self.max_token_bytes:
            raise APIError(
                400,
                f"the prompt is too long: {num_bytes} bytes of text make more than the {self.max_prompt_tokens} "
                "tokens a prompt may have",
                param=param,
                code="context_length_exceeded",
            )

    def check_prompt_tokens(self, prompt_len: int) -> None:
        if prompt_len > self.max_prompt_tokens:
            raise APIError(
                400,
                f"the prompt has {prompt_len} tokens, more than the {self.max_prompt_tokens} this server accepts",
                param="prompt",
                code="context_length_exceeded",
            )
