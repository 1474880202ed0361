"""POST /v1/completions: prompts (text or token ids) in, completions (with echo and legacy logprobs) out."""

from __future__ import annotations

import asyncio
from typing import Any

from engine.outputs import RequestOutput
from engine.sampler import SampledToken
from server.errors import APIError
from server.protocol import (
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    UsageInfo,
    random_id,
)
from server.serving import Serving, include_usage, sampling_params
from server.streaming import Choice, Disconnected, EventStream, Started, collect, event_stream, total_usage
from server.structured import structured_outputs


class CompletionServing(Serving):
    async def completion_prompts(self, request: CompletionRequest) -> list[list[int]]:
        if not request.prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        prompts = []
        for item in _prompt_items(request):
            if isinstance(item, str):
                self.limits.check_text(item, "prompt")
                prompts.append(self.tokenizer.encode(item))
                await asyncio.sleep(0)  # tokenizing holds the GIL: let streams move between long prompts
            else:
                prompts.append(list(item))  # type: ignore[arg-type]
        return prompts

    async def create_completion(
        self, request: CompletionRequest, disconnected: Disconnected
    ) -> CompletionResponse | EventStream:
        request_id = random_id("cmpl")
        self.check_request(request, request_id, len(_prompt_items(request)))
        if request.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if request.best_of is not None and request.best_of != request.n:
            raise APIError(400, "best_of must equal n (or be omitted)", param="best_of")
        constraint = await structured_outputs(request, self.grammars)
        prompts = await self.completion_prompts(request)
        prompt_logprobs = request.logprobs if request.echo else None
        max_tokens = _completion_max_tokens(request)
        params = sampling_params(request, max_tokens, request.logprobs, prompt_logprobs, constraint)
        for prompt in prompts:
            self.check_length(len(prompt), params.max_tokens)
        started = await self.start(request_id, prompts, params, request.priority, prompt_only=request.echo_only)
        if request.stream:
            return self.stream_completion(request, request_id, started, prompts)
        choices = await collect(started, disconnected)
        return CompletionResponse(
            id=request_id,
            model=self.model_name,
            choices=[self._completion_choice(request, c) for c in choices],
            usage=total_usage(prompts, choices),
        )

    def _completion_choice(self, request: CompletionRequest, choice: Choice) -> CompletionChoice:
        prefix = self._prompt_text(choice, request.skip_special_tokens) if request.echo else ""
        return CompletionChoice(
            index=choice.index,
            text=prefix + choice.text,
            logprobs=(
                self._completion_logprobs(choice, choice.logprobs, choice.prompt_logprobs, request.skip_special_tokens)
                if request.logprobs is not None
                else None
            ),
            finish_reason=choice.finish_reason,
            stop_reason=choice.stop_reason,
            token_ids=choice.token_ids if request.return_token_ids else None,
            prompt_token_ids=choice.prompt_token_ids if request.return_token_ids else None,
        )

    def _completion_logprobs(
        self,
        choice: Choice,
        tokens: list[SampledToken],
        prompt_logprobs: list[SampledToken] | None = None,
        skip_special_tokens: bool = True,
    ) -> CompletionLogprobs:
        """The legacy logprobs shape for ``tokens``, which continue ``choice``'s text (advancing its offset).

        With ``prompt_logprobs`` (echo), the echoed prompt's tokens come first, from offset 0.

        Each token is spelled as the text spells it, decoded with the request's ``skip_special_tokens`` like the
        echoed prompt and the generated text: a special token the text leaves out is "" (its logprob is still
        reported), so the tokens joined are the text and each sits at its text_offset. vLLM spells every token as
        itself, so there tokens and offsets disagree with a text without its special tokens. The top_logprobs keys
        stay the candidates' own strings: they are not part of the text, and "" would merge special candidates.
        """
        result = CompletionLogprobs()

        def add(token_id: int, logprob: float | None, top_logprobs: dict[str, float] | None) -> None:
            text = self.token_text(token_id, skip_special_tokens)
            result.text_offset.append(choice.text_offset)
            choice.text_offset += len(text)
            result.tokens.append(text)
            result.token_logprobs.append(logprob)
            result.top_logprobs.append(top_logprobs)

        def add_all(entries: list[SampledToken]) -> None:
            for token in entries:
                add(token.token_id, token.logprob, {self.token_text(tid): lp for tid, lp in token.top_logprobs})

        if prompt_logprobs is not None:
            # Nothing precedes the first prompt token to predict it from: OpenAI reports nulls for it.
            add(choice.prompt_token_ids[0], None, None)
            add_all(prompt_logprobs)
            # The completion follows the echoed text.
            choice.text_offset = len(self._prompt_text(choice, skip_special_tokens))
        add_all(tokens)
        return result

    def stream_completion(
        self, request: CompletionRequest, request_id: str, started: Started, prompts: list[list[int]]
    ) -> EventStream:
        def chunk(choice: CompletionChoice) -> dict[str, Any]:
            body = CompletionResponse(id=request_id, model=self.model_name, choices=[choice])
            return body.model_dump(exclude={"usage"})

        def event(choice: Choice, output: RequestOutput) -> dict[str, Any] | None:
            text, logprobs = output.new_text, None
            if output.prompt_logprobs is not None:
                # Echo with logprobs: the echoed prompt waits for its logprobs, which come with the first tokens.
                text = self._prompt_text(choice, request.skip_special_tokens) + text
            if request.logprobs is not None:
                logprobs = self._completion_logprobs(
                    choice, output.new_logprobs, output.prompt_logprobs, request.skip_special_tokens
                )
            elif not text and output.finish_reason is None and not request.return_token_ids:
                return None  # a token whose text is held back (part of a stop string, or of a character): no news
            return chunk(
                CompletionChoice(
                    index=choice.index,
                    text=text,
                    logprobs=logprobs,
                    finish_reason=output.finish_reason,
                    stop_reason=output.stop_reason,
                    token_ids=output.new_token_ids if request.return_token_ids else None,
                )
            )

        def usage_event(usage: UsageInfo) -> dict[str, Any]:
            return CompletionResponse(id=request_id, model=self.model_name, choices=[], usage=usage).model_dump()

        echoed = []
        if request.echo and request.logprobs is None:
            echoed = [
                chunk(CompletionChoice(index=c.index, text=self._prompt_text(c, request.skip_special_tokens)))
                for c, _ in started
            ]
        events = event_stream(started, prompts, echoed, event, usage_event if include_usage(request) else None)
        return EventStream(events, started)

    def _prompt_text(self, choice: Choice, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(choice.prompt_token_ids, skip_special_tokens=skip_special_tokens)


def _prompt_items(request: CompletionRequest) -> list[str | list[int]]:
    """The prompts of a completion request: one string or token-id list each."""
    prompt = request.prompt
    if isinstance(prompt, str) or all(isinstance(p, int) for p in prompt):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


def _completion_max_tokens(request: CompletionRequest) -> int | None:
    """The engine's max_tokens. Echo alone still runs the prompt, for its logprobs; as in vLLM it samples one token,
    which the response drops (an engine request generates at least one)."""
    if not request.echo_only:
        return request.max_tokens
    if request.min_tokens:
        raise APIError(400, f"min_tokens ({request.min_tokens}) must not exceed max_tokens (0)", param="min_tokens")
    return 1
