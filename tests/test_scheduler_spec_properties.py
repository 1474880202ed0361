"""Random programs with speculative decoding on: drafts of random quality are scheduled, verified and rolled back,
and the KV accounting stays exact (no leak, no double ownership, each table exactly as long as its computed rows)."""

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import KVCacheManager, Request, Scheduler, SchedulerOutput
from tests.test_scheduler import (
    VOCAB,
    FakeRunner,
    check_blocks,
    check_step,
    check_swap_space,
    make_scheduler,
    next_token,
)
from tests.test_scheduler_properties import Abort, Add, Step, check_against_reference, programs, run_program


class VerifyingRunner(FakeRunner):
    """The fake model, verifying drafts like a greedy target: it accepts the drafts equal to ``next_token`` of the
    context read back from the KV cache (draft rows included), then adds its own token."""

    def __init__(self, manager: KVCacheManager) -> None:
        super().__init__(manager)
        self.draft_tokens = self.accepted_tokens = 0

    def execute(self, output: SchedulerOutput) -> dict[str, list[int]]:
        sampled = super().execute(output)  # writes every row; samples after the last one, which is wrong for drafts
        for item in output.scheduled:
            if not item.num_draft_tokens:
                continue
            end = item.start_position + len(item.token_ids)
            context = [self.kv[item.block_table[p // self.block_size]][p % self.block_size] for p in range(end)]
            tokens = [slot[1] for slot in context if slot is not None]
            assert len(tokens) == end
            first_draft = end - item.num_draft_tokens
            new = []
            for position in range(first_draft, end + 1):
                expected = next_token(tokens[:position])
                new.append(expected)
                if position == end or tokens[position] != expected:
                    break
            self.draft_tokens += item.num_draft_tokens
            self.accepted_tokens += len(new) - 1
            sampled[item.request_id] = new
        return sampled


def draft_lengths(scheduler: Scheduler, rng: random.Random) -> dict[str, int]:
    """Up to 5 draft rows for each decoding request."""
    return {
        request.request_id: rng.randint(0, 5)
        for request in scheduler.running
        if request.num_computed_tokens == request.num_tokens - 1
    }


def fill(scheduler: Scheduler, output: SchedulerOutput, rng: random.Random) -> SchedulerOutput:
    """Drafts for the reserved rows, sometimes fewer than reserved: the true continuation for a random length, then
    wrong tokens."""
    drafts = {}
    for item in output.scheduled:
        tokens, draft = list(scheduler.get_request(item.request_id).all_token_ids), []
        num_right, num_drafts = rng.randint(0, 5), rng.randint(0, item.num_draft_slots)
        for i in range(num_drafts):
            token = next_token(tokens)
            if i >= num_right:
                token = (token + rng.randint(1, VOCAB - 1)) % VOCAB
            tokens.append(token)
            draft.append(token)
        drafts[item.request_id] = draft
    return scheduler.fill_drafts(output, drafts)


def check_exact_tables(scheduler: Scheduler) -> None:
    kv = scheduler.kv_cache_manager
    for request in scheduler.running:
        table = kv.block_table(request.request_id)
        assert len(table) == kv.num_blocks_needed(request.num_computed_tokens), request.request_id
        assert request.num_computed_tokens < request.num_tokens, "rejected draft rows still counted"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=programs(), seed=st.integers(0, 2**32 - 1))
def test_speculative_programs_keep_exact_kv_accounting(
    setup: tuple[dict[str, Any], list[Add | Step | Abort]], seed: int
) -> None:
    limits, program = setup
    rng = random.Random(seed)
    scheduler = make_scheduler(**limits)
    runner = VerifyingRunner(scheduler.kv_cache_manager)

    def run_step() -> None:
        wanted = draft_lengths(scheduler, rng)
        output = scheduler.schedule(wanted)
        for item in output.scheduled:
            assert item.num_draft_slots <= wanted.get(item.request_id, 0)  # never more rows than asked for
        output = fill(scheduler, output, rng)
        check_step(scheduler, output)
        scheduler.update(output, runner.execute(output))
        runner.persist()
        check_blocks(scheduler)
        check_swap_space(scheduler)
        check_exact_tables(scheduler)

    check_against_reference(run_program(scheduler, program, run_step))


def test_drafts_are_verified_and_rejected_rows_rolled_back() -> None:
    """A hand-checked case: 6 rows reserved, 4 drafts filled in, 2 right; 3 tokens kept and the block the rejected
    rows took is freed."""
    scheduler = make_scheduler(num_blocks=16, block_size=4, prefix_caching=True)
    runner = VerifyingRunner(scheduler.kv_cache_manager)
    request = Request("a", list(range(5)), max_tokens=20)
    scheduler.add_request(request)
    scheduler.update(output := scheduler.schedule(), runner.execute(output))  # prefill: 5 rows, 2 blocks
    tokens = list(request.all_token_ids)
    right = [next_token(tokens), next_token([*tokens, next_token(tokens)])]
    reserved = scheduler.schedule({"a": 6})
    assert reserved.scheduled[0].num_draft_slots == 6 and len(reserved.scheduled[0].block_table) == 3  # rows 0..11
    output = scheduler.fill_drafts(reserved, {"a": [*right, (right[1] + 1) % VOCAB, 5]})
    (item,) = output.scheduled
    assert item.num_draft_tokens == 4 and len(item.token_ids) == 5
    assert len(item.block_table) == 3  # rows 0..9
    scheduler.update(output, runner.execute(output))
    assert request.output_token_ids[1:3] == right and request.num_output_tokens == 4
    assert request.num_computed_tokens == request.num_tokens - 1 == 8
    assert len(scheduler.kv_cache_manager.block_table("a")) == 2  # rows 0..7
    assert scheduler.kv_cache_manager.num_free_blocks == 14
    assert runner.accepted_tokens == 2 and runner.draft_tokens == 4
