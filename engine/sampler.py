"""Turn a step's logits into tokens: grammar masks, logit bias, min-tokens, penalties, temperature,
top-k/top-p/min-p, seeds.

Everything is vectorised over the rows of the batch; a Python loop runs only over rows that carry their own
random generator (a seed), so that a seeded request draws the same numbers whatever batch it shares.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.sampling_params import SamplingParams
from engine.structured.spec import error_summary

if TYPE_CHECKING:
    from engine.structured import GrammarMatcher, PendingMasks


@dataclass
class SamplingRow:
    params: SamplingParams
    generator: torch.Generator | None
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    eos_token_ids: frozenset[int]
    matcher: GrammarMatcher | None = None  # with structured output: where the output stands in its grammar
    # Set by the sampler when the grammar itself failed on this row: its request fails alone, its token is dropped.
    grammar_error: str | None = None


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: float | None = None  # log-probability under the model's raw distribution
    top_logprobs: tuple[tuple[int, float], ...] = ()


def logprob_tokens(logprobs: torch.Tensor, token_ids: list[int], num_top: int) -> list[SampledToken]:
    """One SampledToken per row of ``logprobs`` [N, V]: ``token_ids[i]``'s logprob and the row's ``num_top`` best."""
    chosen = logprobs.gather(1, torch.tensor(token_ids, device=logprobs.device).unsqueeze(1)).squeeze(1).tolist()
    tops: list[tuple[tuple[int, float], ...]] = [()] * len(token_ids)
    if num_top > 0:
        values, ids = logprobs.topk(num_top, dim=-1)
        tops = [tuple(zip(row_ids, row_values)) for row_ids, row_values in zip(ids.tolist(), values.tolist())]
    return [SampledToken(t, lp, top) for t, lp, top in zip(token_ids, chosen, tops)]


def _padded(rows: list[list[int]]) -> torch.Tensor:
    """Right-pad id lists with -1 into one [N, max_len] tensor."""
    width = max((len(r) for r in rows), default=0)
    out = torch.full((len(rows), max(width, 1)), -1, dtype=torch.long)
    for i, ids in enumerate(rows):
        if ids:
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out


def _token_counts(rows: list[list[int]], vocab_size: int) -> torch.Tensor:
    ids = _padded(rows)
    counts = torch.zeros((len(rows), vocab_size + 1), dtype=torch.float32)
    counts.scatter_add_(1, ids % (vocab_size + 1), torch.ones_like(ids, dtype=torch.float32))
    return counts[:, :vocab_size]  # column vocab_size collected the -1 padding


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """OpenAI presence/frequency penalties over output tokens; repetition penalty (CTRL) over prompt and output."""
    vocab = logits.shape[1]
    output_counts = _token_counts([list(r.output_token_ids) for r in rows], vocab)
    presence = torch.tensor([r.params.presence_penalty for r in rows]).unsqueeze(1)
    frequency = torch.tensor([r.params.frequency_penalty for r in rows]).unsqueeze(1)
    repetition = torch.tensor([r.params.repetition_penalty for r in rows]).unsqueeze(1)
    prompt_seen = _token_counts([list(r.prompt_token_ids) for r in rows], vocab) > 0
    seen = prompt_seen | (output_counts > 0)
    penalised = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits.copy_(torch.where(seen, penalised, logits))
    logits -= frequency * output_counts + presence * (output_counts > 0).float()


def apply_top_k_top_p_min_p(logits: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor):
    """Mask (to -inf) tokens outside each row's top-k, nucleus top-p and min-p sets. top_k 0 means no cut."""
    vocab = logits.shape[1]
    if bool((min_p > 0).any()):
        probs = torch.softmax(logits, dim=-1)
        threshold = probs.max(dim=-1, keepdim=True).values * min_p.unsqueeze(1)
        logits.masked_fill_(probs < threshold, float("-inf"))
    if bool((top_k > 0).any()) or bool((top_p < 1.0).any()):
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).unsqueeze(1)
        ranks = torch.arange(vocab).unsqueeze(0)
        cut = ranks >= k
        sorted_probs = torch.softmax(sorted_logits.masked_fill(cut, float("-inf")), dim=-1)
        mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
        cut |= mass_before >= top_p.unsqueeze(1)
        cut[:, 0] = False  # the most likely token always survives
        logits.scatter_(1, order, sorted_logits.masked_fill(cut, float("-inf")))


def adjust_logits(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """Logit bias, the min-tokens ban on stops, then penalties, in place: the logits greedy decoding maximises."""
    for i, row in enumerate(rows):
        params = row.params
        if params.logit_bias:
            ids = torch.tensor([int(t) for t in params.logit_bias], dtype=torch.long)
            logits[i].index_add_(0, ids, torch.tensor(list(params.logit_bias.values()), dtype=logits.dtype))
        if len(row.output_token_ids) < params.min_tokens:
            banned = row.eos_token_ids | frozenset(params.stop_token_ids)
            if banned:
                logits[i, list(banned)] = float("-inf")
    penalised_rows = [i for i, r in enumerate(rows) if r.params.uses_penalties]
    if penalised_rows:
        subset = logits[penalised_rows]
        apply_penalties(subset, [rows[i] for i in penalised_rows])
        logits[penalised_rows] = subset


def sampling_probs(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The distribution non-greedy ``rows`` sample from: adjusted ``logits`` (modified in place) over the temperature,
    cut by top-k/top-p/min-p."""
    logits /= torch.tensor([r.params.temperature for r in rows]).unsqueeze(1)
    apply_top_k_top_p_min_p(
        logits,
        torch.tensor([max(r.params.top_k, 0) for r in rows]),
        torch.tensor([r.params.top_p for r in rows]),
        torch.tensor([r.params.min_p for r in rows]),
    )
    return torch.softmax(logits, dim=-1)


def _advance(matcher: GrammarMatcher, token_id: int, is_eos: bool) -> str | None:
    """Move ``matcher`` by the token sampled under its mask; what went wrong when the grammar failed instead."""
    if matcher.error is not None:  # computing the mask failed: the mask allowed only the end of sequence
        return f"the grammar failed: {error_summary(matcher.error)}"
    if is_eos:
        return None if matcher.finished else "the grammar refused the end of sequence its own mask allowed"
    if matcher.accepts([token_id]) != 1:
        return f"the grammar refused token {token_id} its own mask allowed"
    if not matcher.advance(token_id):  # llguidance may find an error only once it consumes the token
        return f"the grammar failed at token {token_id}: {error_summary(matcher.error or '')}"
    return None


class Sampler:
    def __call__(
        self, logits: torch.Tensor, rows: list[SamplingRow], masks: PendingMasks | None = None
    ) -> list[SampledToken]:
        """logits [N, V] in fp32 (modified in place) -> one token per row.

        ``masks`` holds the grammar masks of the rows with a matcher; each sampled token advances its row's matcher.
        """
        raw_logprobs = None
        if any(r.params.logprobs is not None for r in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        if masks is not None:
            masks.apply(logits)  # first: penalties, temperature and the cuts only ever see allowed tokens
        adjust_logits(logits, rows)
        token_ids = self._choose(logits, rows).tolist()
        results = [self._result(token_ids[i], i, rows[i], raw_logprobs) for i in range(len(rows))]
        # Matchers move last, so a call that raises changes no state and can be re-run (the engine does, to isolate
        # the request that fails). A grammar that fails marks its own row instead of raising: its request is the
        # only one to fail, and the step need not be run again.
        for row, token_id in zip(rows, token_ids):
            if row.matcher is not None:
                row.grammar_error = _advance(row.matcher, token_id, token_id in row.eos_token_ids)
        return results

    @staticmethod
    def _choose(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        chosen = logits.argmax(dim=-1)
        random_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
        if not random_rows:
            return chosen
        probs = sampling_probs(logits[random_rows], [rows[i] for i in random_rows])
        # Gumbel-max in its exponential form: argmax(p / E) with E ~ Exp(1) samples from p.
        noise = torch.empty_like(probs)
        for j, i in enumerate(random_rows):
            noise[j].exponential_(generator=rows[i].generator)
        chosen[random_rows] = (probs / noise).argmax(dim=-1)
        return chosen

    @staticmethod
    def _result(token_id: int, i: int, row: SamplingRow, raw_logprobs: torch.Tensor | None) -> SampledToken:
        if raw_logprobs is None or row.params.logprobs is None:
            return SampledToken(token_id)
        return logprob_tokens(raw_logprobs[i : i + 1], [token_id], row.params.logprobs)[0]
