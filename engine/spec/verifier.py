"""Check linear drafts against the target model's logits at each draft position, in one pass over all requests.

Each position's logits go through the sampler's own transforms (bias, min-tokens, penalties over the output as if
the drafts before it were accepted, temperature, top-k/top-p/min-p), so a verified token is distributed exactly as
the sampler would have drawn it. Greedy rows accept the drafts equal to the argmax; sampling rows use the
rejection rule for a point-mass drafter.
"""

from __future__ import annotations

import dataclasses

import torch

from engine.sampler import SamplingRow, adjust_logits, sampling_probs


def verify(logits: torch.Tensor, rows: list[SamplingRow], drafts: list[list[int]]) -> list[list[int]]:
    """``logits`` [sum(len(d) + 1 for d in drafts), V] in fp32 (modified in place): request ``i``'s rows are the
    positions of its last sampled token and its drafts, in order. Returns each request's accepted drafts followed
    by one token of the target's own (the correction at the first rejection, or the bonus after the last draft)."""
    position_rows = [at for row, draft in zip(rows, drafts) for at in _position_rows(row, draft)]
    adjust_logits(logits, position_rows)
    targets = logits.argmax(dim=-1).tolist()
    sampled = [i for i, row in enumerate(position_rows) if not row.params.greedy]
    probs = {}
    if sampled:
        probs = dict(zip(sampled, sampling_probs(logits[sampled], [position_rows[i] for i in sampled])))
    results, first = [], 0
    for row, draft in zip(rows, drafts):
        if row.params.greedy:
            results.append(_accept_greedy(targets[first : first + len(draft) + 1], draft))
        else:
            span = torch.stack([probs[i] for i in range(first, first + len(draft) + 1)])
            results.append(rejection_sample(span, draft, torch.rand(len(draft))))
        first += len(draft) + 1
    return results


def _position_rows(row: SamplingRow, draft: list[int]) -> list[SamplingRow]:
    """The row as the sampler would see it at each draft position: the drafts before it count as output."""
    params = row.params
    if not params.uses_penalties and len(row.output_token_ids) >= params.min_tokens:
        return [row] * (len(draft) + 1)  # nothing depends on the output so far
    output = list(row.output_token_ids)
    return [dataclasses.replace(row, output_token_ids=output + draft[:j]) for j in range(len(draft) + 1)]


def _accept_greedy(targets: list[int], draft: list[int]) -> list[int]:
    accepted = 0
    while accepted < len(draft) and draft[accepted] == targets[accepted]:
        accepted += 1
    return [*draft[:accepted], targets[accepted]]


def rejection_sample(probs: torch.Tensor, draft: list[int], uniform: torch.Tensor) -> list[int]:
    """Speculative sampling for a drafter that proposes each token with certainty: accept draft token ``d`` at
    position ``j`` with probability ``probs[j, d]``; at the first rejection draw from ``probs[j]`` without ``d``
    (renormalised). Either way the emitted token has distribution ``probs[j]``. ``uniform``: one U(0, 1) per draft."""
    accept = (uniform < probs[torch.arange(len(draft)), draft]).tolist() if draft else []
    for j, token in enumerate(draft):
        if not accept[j]:
            residual = probs[j].clone()
            residual[token] = 0.0
            return [*draft[:j], int(torch.multinomial(residual, 1))]
    return [*draft, int(torch.multinomial(probs[len(draft)], 1))]
