"""Run one scheduled step: build the flat batch, run the model, sample the rows that need a token.

A step is first written down as a ``StepPlan`` (plain data); under tensor parallelism rank 0 broadcasts it and every
rank runs ``forward`` on it together, while only rank 0 samples.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from engine.kv_policy import QueryRecorder
from engine.kv_policy.residuals import ResidualBuffers
from engine.models import AttentionContext, LlamaForCausalLM
from engine.models.native_decoder import NativeDecoder
from engine.parallel.group import TensorParallelGroup
from engine.sampler import SampledToken, Sampler, SamplingRow, logprob_tokens
from engine.spec.verifier import verify
from engine.structured.masks import GrammarMasks
from kernels.backend import AttentionBackend, BatchLayout
from kernels.quantized_cache import PagedCache
from scheduler.output import ScheduledRequest, SchedulerOutput


@dataclass(frozen=True)
class StepPlan:
    """One forward pass as plain data: the flat batch, where its K/V rows go, and the rows that need logits."""

    input_ids: list[int]
    positions: list[int]
    slots: list[int]
    query_lens: list[int]
    context_lens: list[int]
    block_tables: list[list[int]]
    logit_rows: list[int]
    residual_buffers: list[tuple[int, int]] | None  # under a block codec: each sequence's (read, write) residual


class ModelRunner:
    def __init__(
        self,
        model: LlamaForCausalLM,
        backend: AttentionBackend,
        kv_caches: list[tuple[PagedCache, PagedCache]],
        block_size: int,
        device: torch.device,
        query_recorder: QueryRecorder | None = None,
        residuals: ResidualBuffers | None = None,
        native_decoder: NativeDecoder | None = None,
    ) -> None:
        self.model = model
        self.native_decoder = native_decoder  # takes the decode steps it can (engine/models/native_decoder.py)
        self.tp: TensorParallelGroup = model.tp
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.dtype = next(model.parameters()).dtype
        self.sampler = Sampler()
        self.grammar_masks = GrammarMasks()
        self.query_recorder = query_recorder
        self.residuals = residuals  # under a block codec: each request's full-precision filling block

    @torch.inference_mode()
    def execute(
        self, output: SchedulerOutput, rows: Mapping[str, SamplingRow], prompt_logprobs_from: Mapping[str, int]
    ) -> tuple[dict[str, list[SampledToken]], dict[str, list[SampledToken]]]:
        """Compute the scheduled tokens; return the new tokens of each request whose chunk reached its end: one
        sampled token, or for a request with drafts the accepted ones and the target's own (engine/spec/verifier.py).

        ``prompt_logprobs_from`` maps requests that want prompt logprobs to the first prompt position not yet recorded;
        the second result holds, per such request, the entries of the chunk's positions from there on (in order).
        """
        if self.residuals is not None:
            self.residuals.release([*output.finished_request_ids, *output.preempted_request_ids])
        # Fewest query tokens first: decodes (one token), then verifications (a few), which attention backends can
        # handle as one batched decode computation, then prefill chunks.
        batch = sorted(output.scheduled, key=lambda s: len(s.token_ids))
        plain = [s for s in batch if s.sample and not s.num_draft_tokens]
        speculating = [s for s in batch if s.num_draft_tokens]
        # Every row that needs logits, in one LM-head pass: the plain rows' last tokens, then every draft row, then
        # the prompt-logprob positions of each request that asked for them.
        last_rows: list[int] = []
        draft_rows: list[int] = []
        prompt_spans: dict[str, tuple[int, int, int]] = {}  # request -> (first row, end row, first position)
        end = 0
        for scheduled in batch:
            begin, end = end, end + len(scheduled.token_ids)
            if scheduled.request_id in prompt_logprobs_from:
                lo, hi = self._prompt_logprob_positions(
                    scheduled, rows[scheduled.request_id], prompt_logprobs_from[scheduled.request_id]
                )
                if lo < hi:
                    start = scheduled.start_position
                    prompt_spans[scheduled.request_id] = (begin + lo - start, begin + hi - start, lo)
            if scheduled.num_draft_tokens:
                draft_rows.extend(range(begin, end))
            elif scheduled.sample:
                last_rows.append(end - 1)
        prompt_rows = [r for first, stop, _ in prompt_spans.values() for r in range(first, stop)]
        plan = self._plan(batch, last_rows + draft_rows + prompt_rows)
        masks = self.grammar_masks.start([rows[s.request_id].matcher for s in plain])  # beside the forward
        if self.query_recorder is not None:
            ends = list(itertools.accumulate(plan.query_lens))
            spans = [(s.request_id, end - len(s.token_ids), end) for s, end in zip(batch, ends)]
            self.query_recorder.begin_step(spans, self.device)
        with self.tp.lockstep():
            self.tp.send_plan(plan)
            logits = self.forward(plan, self.query_recorder)
        if self.query_recorder is not None:
            self.query_recorder.end_step()
        assert logits is not None or not plan.logit_rows  # rank 0 always receives the gathered logits
        new_tokens: dict[str, list[SampledToken]] = {}
        if plain:
            tokens = self.sampler(logits[: len(last_rows)], [rows[s.request_id] for s in plain], masks)
            new_tokens = {s.request_id: [token] for s, token in zip(plain, tokens)}
        if speculating:
            drafts = [s.token_ids[len(s.token_ids) - s.num_draft_tokens :] for s in speculating]
            draft_logits = logits[len(last_rows) : len(last_rows) + len(draft_rows)]
            verified = verify(draft_logits, [rows[s.request_id] for s in speculating], drafts)
            new_tokens |= {s.request_id: [SampledToken(t) for t in ids] for s, ids in zip(speculating, verified)}
        prompt_logprobs: dict[str, list[SampledToken]] = {}
        offset = len(last_rows) + len(draft_rows)
        for request_id, (first, stop, position) in prompt_spans.items():
            row = rows[request_id]
            logprobs = torch.log_softmax(logits[offset : offset + stop - first], dim=-1)
            offset += stop - first
            targets = list(row.prompt_token_ids[position + 1 : position + 1 + stop - first])
            prompt_logprobs[request_id] = logprob_tokens(logprobs, targets, row.params.prompt_logprobs or 0)
        return new_tokens, prompt_logprobs

    @torch.inference_mode()
    def forward(self, plan: StepPlan, query_observer: QueryRecorder | None = None) -> torch.Tensor | None:
        """Run the model over the plan's batch (writing its K/V) and return the logits of its ``logit_rows``
        (gathered over the vocabulary shards: None on ranks other than 0). Every rank runs this for every step."""
        layout, input_ids, positions = layout_of(plan, self.block_size, self.device)
        ctx = AttentionContext(self.backend, self.backend.prepare(layout, self.dtype), self.kv_caches, query_observer)
        decoder = self.native_decoder
        if decoder is not None and decoder.accepts(input_ids.shape[0], ctx):
            hidden = decoder.forward(input_ids, positions, ctx)
        else:
            hidden = self.model(input_ids, positions, ctx)
        if not plan.logit_rows:
            return None
        return self.model.compute_logits(hidden[plan.logit_rows])

    @staticmethod
    def _prompt_logprob_positions(scheduled: ScheduledRequest, row: SamplingRow, first: int) -> tuple[int, int]:
        """The chunk's positions p >= ``first`` that predict a prompt token (p + 1 < prompt length), as [lo, hi)."""
        start = scheduled.start_position
        lo = max(start, first)
        hi = min(start + len(scheduled.token_ids), len(row.prompt_token_ids) - 1)
        return lo, hi

    def _plan(self, batch: list[ScheduledRequest], logit_rows: list[int]) -> StepPlan:
        residuals = None
        if self.residuals is not None:
            residuals = [self.residuals.plan(s.request_id, s.cache_position, len(s.token_ids)) for s in batch]
        return plan_step(batch, self.block_size, logit_rows, residuals)


def plan_step(
    batch: list[ScheduledRequest],
    block_size: int,
    logit_rows: list[int],
    residual_buffers: list[tuple[int, int]] | None = None,
) -> StepPlan:
    """One step's flat token ids and positions, each token's cache slot, and the rows that need logits."""
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
    return StepPlan(
        input_ids=input_ids,
        positions=positions,
        slots=slots,
        query_lens=[len(s.token_ids) for s in batch],
        context_lens=[s.cache_position + len(s.token_ids) for s in batch],
        block_tables=[list(s.block_table) for s in batch],
        logit_rows=logit_rows,
        residual_buffers=residual_buffers,
    )


def layout_of(plan: StepPlan, block_size: int, device: torch.device) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
    """The attention layout of a plan, and its flat token ids and positions as tensors."""
    as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
    layout = BatchLayout(
        query_lens=plan.query_lens,
        context_lens=plan.context_lens,
        block_tables=plan.block_tables,
        slot_mapping=as_tensor(plan.slots),
        block_size=block_size,
        residual_buffers=plan.residual_buffers,
    )
    return layout, as_tensor(plan.input_ids), as_tensor(plan.positions)


def flatten(
    batch: list[ScheduledRequest], block_size: int, device: torch.device
) -> tuple[BatchLayout, torch.Tensor, torch.Tensor]:
    """One step's attention layout and flat token ids and positions, for a forward pass outside the runner."""
    return layout_of(plan_step(batch, block_size, []), block_size, device)
