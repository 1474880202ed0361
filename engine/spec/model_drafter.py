"""Drafting with a network on the engine's paged KV cache: the target's own layers (layer skipping or an early exit,
engine/spec/layer_skip.py) or a smaller draft model (engine/spec/draft_model.py).

KV rows. The drafter writes K/V at the request's own slots (its block table), so no pool outside the scheduler's
block accounting exists:
- A network that shares the target's KV (layer skipping: its layers *are* target layers) reads the rows the target
  wrote for every verified token; those are what the kept layers see in the full model too. It computes only the
  last sampled token and its drafts, at positions ``c, c + 1, ...``: rows the scheduler reserved for this step,
  which the verification step overwrites with the target's K/V before any attention reads them.
- A network with its own cache (a draft model: a second set of KV tensors indexed by the same block ids, so each
  pool block holds both and the byte budget pays for both) keeps a row valid as long as the token at its position
  is the one the drafter fed: accepted drafts' rows stay valid, rejected ones are recomputed. After a preemption
  the request's blocks are new, so the drafter starts again from position 0 (prefix-cache hits included: a draft
  model writes the same values for the same tokens).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Protocol

import torch

from engine.model_runner import flatten
from engine.models import AttentionContext
from engine.spec.drafter import DraftRequest
from kernels.backend import AttentionBackend
from kernels.quantized_cache import PagedCache
from scheduler.output import ScheduledRequest


class DraftNetwork(Protocol):
    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor: ...

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor: ...


class ModelDrafter:
    stops_on_entropy = True

    def __init__(
        self,
        name: str,
        network: DraftNetwork,
        backend: AttentionBackend,
        kv_caches: list[tuple[PagedCache, PagedCache]],
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        shares_target_kv: bool,
        min_acceptance: float | None,
        entropy_scale: float,
    ) -> None:
        """``min_acceptance``: stop a draft where ``1 - sqrt(entropy_scale * entropy)`` (AdaEDL's lower bound on the
        next token's acceptance) falls below it; None drafts as many tokens as asked."""
        self.name = name
        self.network = network
        self.backend = backend
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.dtype = dtype
        self.shares_target_kv = shares_target_kv
        self.min_acceptance = min_acceptance
        self.entropy_scale = entropy_scale
        # Own cache only: request id -> (first position fed last time, the tokens fed from there).
        self._fed: dict[str, tuple[int, list[int]]] = {}

    def forget(self, request_ids: Iterable[str]) -> None:
        for request_id in request_ids:
            self._fed.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, requests: Sequence[DraftRequest]) -> dict[str, list[int]]:
        requests = [r for r in requests if r.max_draft_tokens > 0]
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        # First pass: each request's tokens from its first row without valid draft KV through its last sampled one.
        batch = []
        for r in requests:
            start = self._first_invalid_row(r)
            batch.append(
                ScheduledRequest(r.request_id, list(r.token_ids[start:]), start, start, list(r.block_table), True)
            )
        for r, item in zip(requests, batch):
            self._fed[r.request_id] = (item.start_position, list(item.token_ids))
        active = dict(zip([r.request_id for r in requests], requests))
        while batch:
            tokens, keep_going = self._next_tokens(batch)
            next_batch = []
            for item, token, go_on in zip(batch, tokens, keep_going):
                request = active[item.request_id]
                draft = drafts[item.request_id]
                if not go_on:
                    continue
                draft.append(token)
                if len(draft) == request.max_draft_tokens:
                    continue
                position = item.start_position + len(item.token_ids)
                next_batch.append(
                    ScheduledRequest(item.request_id, [token], position, position, item.block_table, True)
                )
                self._fed[item.request_id][1].append(token)
            batch = next_batch
        if self.shares_target_kv:
            self._fed.clear()  # the target's rows are the context: nothing to remember
        return drafts

    def _first_invalid_row(self, request: DraftRequest) -> int:
        """The first position whose K/V this drafter must compute (the last sampled token's at the latest)."""
        last = len(request.token_ids) - 1
        if self.shares_target_kv or request.request_id not in self._fed:
            return last if self.shares_target_kv else 0
        start, fed = self._fed[request.request_id]
        valid = start
        for token, actual in zip(fed, request.token_ids[start:]):
            if token != actual:
                break
            valid += 1
        return min(valid, last)

    def _next_tokens(self, batch: list[ScheduledRequest]) -> tuple[list[int], list[bool]]:
        """Run the network over the batch; each sequence's most likely next token, and whether to propose it."""
        layout, input_ids, positions = flatten(batch, self.block_size, self.device)
        ctx = AttentionContext(self.backend, self.backend.prepare(layout, self.dtype), self.kv_caches)
        hidden = self.network(input_ids, positions, ctx)
        last_rows = [end - 1 for end in itertools.accumulate(layout.query_lens)]
        logits = self.network.compute_logits(hidden[last_rows])
        tokens = logits.argmax(dim=-1).tolist()
        if self.min_acceptance is None:
            return tokens, [True] * len(tokens)
        log_probs = torch.log_softmax(logits, dim=-1)
        entropy = (-(log_probs.exp() * log_probs).sum(dim=-1)).clamp_min(0.0).tolist()
        bound = [1.0 - math.sqrt(self.entropy_scale * h) for h in entropy]
        return tokens, [b >= self.min_acceptance for b in bound]
