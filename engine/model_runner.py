"""Run one scheduled step: build the flat batch tensors, run the model, sample the rows that need a token."""

from __future__ import annotations

import itertools
from collections.abc import Mapping

import torch

from engine.kv_policy import QueryRecorder
from engine.models import AttentionContext, LlamaForCausalLM
from engine.sampler import SampledToken, Sampler, SamplingRow, logprob_tokens
from engine.spec.verifier import verify
from engine.structured.masks import GrammarMasks
from kernels.backend import AttentionBackend, BatchLayout
from kernels.quantized_cache import PagedCache
from scheduler.output import ScheduledRequest, SchedulerOutput


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_caches: list[tuple[PagedCache, PagedCache]],
        block_size: int,
        device: torch.device,
        query_recorder: QueryRecorder | None = None,
    ) -> None:
        self.model = model
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.sampler = Sampler()
        self.grammar_masks = GrammarMasks()
        self.query_recorder = query_recorder

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, rows: Mapping[str, SamplingRow], prompt_logprobs_from: Mapping[str, int]
    ) -> tuple[dict[str, list[SampledToken]], dict[str, list[SampledToken]]]:
        """Compute the scheduled tokens; return the new tokens of each request whose chunk reached its end: one
        sampled token, or for a request with drafts the accepted ones and the target's own (engine/spec/verifier.py).

        ``prompt_logprobs_from`` maps requests that want prompt logprobs to the first prompt position not yet recorded;
        the second result holds, per such request, the entries of the chunk's positions from there on (in order).
        """
        # Fewest query tokens first: decodes (one token), then verifications (a few), which attention backends can
        # handle as one batched decode computation, then prefill chunks.
        batch = sorted(output.scheduled, key=lambda s: len(s.token_ids))
        layout, input_ids, positions = flatten(batch, self.block_size, self.device)
        plain = [s for s in batch if s.sample and not s.num_draft_tokens]
        masks = self.grammar_masks.start([rows[s.request_id].matcher for s in plain])  # beside the forward
        ctx = AttentionContext(self.backend, self.backend.prepare(layout, self.dtype), self.kv_caches)
        if self.query_recorder is not None:
            ends = list(itertools.accumulate(layout.query_lens))
            spans = [(s.request_id, end - len(s.token_ids), end) for s, end in zip(batch, ends)]
            self.query_recorder.begin_step(spans, self.device)
            ctx.query_observer = self.query_recorder
        hidden = self.model(input_ids, positions, ctx)
        if self.query_recorder is not None:
            self.query_recorder.end_step()
        last_rows, draft_rows = [], []
        prompt_logprobs: dict[str, list[SampledToken]] = {}
        end = 0
        for scheduled in batch:
            begin, end = end, end + len(scheduled.token_ids)
            if scheduled.request_id in prompt_logprobs_from:
                entries = self._prompt_logprobs(
                    hidden[begin:end], scheduled, rows[scheduled.request_id], prompt_logprobs_from[scheduled.request_id]
                )
                if entries:
                    prompt_logprobs[scheduled.request_id] = entries
            if scheduled.num_draft_tokens:
                draft_rows.extend(range(begin, end))
            elif scheduled.sample:
                last_rows.append(end - 1)
        new_tokens: dict[str, list[SampledToken]] = {}
        if plain:
            logits = self.model.compute_logits(hidden[last_rows])
            tokens = self.sampler(logits, [rows[s.request_id] for s in plain], masks)
            new_tokens = {s.request_id: [token] for s, token in zip(plain, tokens)}
        speculating = [s for s in batch if s.num_draft_tokens]
        if speculating:
            drafts = [s.token_ids[len(s.token_ids) - s.num_draft_tokens :] for s in speculating]
            logits = self.model.compute_logits(hidden[draft_rows])
            verified = verify(logits, [rows[s.request_id] for s in speculating], drafts)
            new_tokens |= {s.request_id: [SampledToken(t) for t in ids] for s, ids in zip(speculating, verified)}
        return new_tokens, prompt_logprobs

    def _prompt_logprobs(
        self, hidden: torch.Tensor, scheduled: ScheduledRequest, row: SamplingRow, first: int
    ) -> list[SampledToken]:
        """Entries for the chunk's positions p >= ``first`` that predict a prompt token (p + 1 < prompt length)."""
        prompt = row.prompt_token_ids
        start = scheduled.start_position
        lo, hi = max(start, first), min(start + len(scheduled.token_ids), len(prompt) - 1)
        if lo >= hi:
            return []
        logprobs = torch.log_softmax(self.model.compute_logits(hidden[lo - start : hi - start]), dim=-1)
        return logprob_tokens(logprobs, list(prompt[lo + 1 : hi + 1]), row.params.prompt_logprobs or 0)


def flatten(
    batch: list[ScheduledRequest], block_size: int, device: torch.device
) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
    """One step's flat token ids and positions, and the attention layout with each token's cache slot."""
    input_ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    for scheduled in batch:
        table = scheduled.block_table
        start, row = scheduled.start_position, scheduled.cache_position
        count = len(scheduled.token_ids)
        input_ids.extend(scheduled.token_ids)
        positions.extend(range(start, start + count))
        slots.extend(table[r // block_size] * block_size + r % block_size for r in range(row, row + count))
    layout = BatchLayout(
        query_lens=[len(s.token_ids) for s in batch],
        context_lens=[s.cache_position + len(s.token_ids) for s in batch],
        block_tables=[s.block_table for s in batch],
        slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
        block_size=block_size,
    )
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    return layout, as_tensor(input_ids), as_tensor(positions)
