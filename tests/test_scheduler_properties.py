"""Random programs of add / step / abort checked against invariants that must hold for every schedule."""

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import FinishReason, Request, RequestRejected, Scheduler
from scheduler.preemption import PREEMPTION_MODES
from tests.test_scheduler import VOCAB, FakeRunner, make_scheduler, reference_output, step

PREFIXES = [[(7 * i + 3) % VOCAB for i in range(40)], [(5 * i + 1) % VOCAB for i in range(40)]]


@dataclass(frozen=True)
class Add:
    prefix: int
    prompt_len: int
    tail_seed: int
    max_tokens: int
    min_tokens: int
    priority: int
    stop_token: int


@dataclass(frozen=True)
class Step:
    count: int


@dataclass(frozen=True)
class Abort:
    index: int


@st.composite
def adds(draw: st.DrawFn, max_model_len: int) -> Add:
    """Mostly requests that fit max_model_len; max_tokens may overshoot by one to exercise rejection."""
    prompt_len = draw(st.integers(1, max_model_len - 1))
    return Add(
        prefix=draw(st.integers(0, len(PREFIXES) - 1)),
        prompt_len=prompt_len,
        tail_seed=draw(st.integers(0, 3)),
        max_tokens=draw(st.integers(1, max_model_len - prompt_len + 1)),
        min_tokens=draw(st.integers(0, 4)),
        priority=draw(st.integers(0, 1)),
        stop_token=draw(st.integers(0, VOCAB - 1)),
    )


@st.composite
def programs(draw: st.DrawFn) -> tuple[dict[str, Any], list[Add | Step | Abort]]:
    """Small random scheduler limits, and operations sized so that most requests fit but some do not."""
    max_model_len = draw(st.integers(2, 40))
    block_size = draw(st.integers(1, 6))
    blocks_per_seq = -(-max_model_len // block_size)
    chunked = draw(st.booleans())
    prefix_caching = draw(st.booleans())
    preemption_mode = draw(st.sampled_from(PREEMPTION_MODES))
    limits = dict(
        num_blocks=draw(st.integers(max(1, blocks_per_seq - 2), blocks_per_seq * 3)),
        block_size=block_size,
        prefix_caching=prefix_caching,
        # Swap space from one block (mostly full: recompute fallbacks) to several sequences' worth.
        preemption_mode=preemption_mode,
        swap_slots=0 if preemption_mode == "recompute" else draw(st.integers(1, blocks_per_seq * 3)),
        prefix_store=prefix_caching and draw(st.booleans()),
        max_model_len=max_model_len,
        max_num_seqs=draw(st.integers(1, 5)),
        max_num_batched_tokens=draw(st.integers(1, 48) if chunked else st.integers(max_model_len, 64)),
        enable_chunked_prefill=chunked,
        long_prefill_token_threshold=draw(st.integers(0, 8)) if chunked else 0,
    )
    ops = st.one_of(
        adds(max_model_len),
        adds(max_model_len),
        st.builds(Step, st.integers(1, 4)),
        st.builds(Abort, st.integers(0, 30)),
    )
    return limits, draw(st.lists(ops, min_size=4, max_size=60))


def make_request(op: Add, request_id: str) -> Request:
    """A prompt that shares a prefix of random length with other requests' prompts, then diverges."""
    shared = PREFIXES[op.prefix][: op.prompt_len - op.prompt_len // 3]
    tail = [(op.tail_seed * 13 + i) % VOCAB for i in range(op.prompt_len - len(shared))]
    return Request(
        request_id,
        shared + tail,
        max_tokens=op.max_tokens,
        min_tokens=op.min_tokens,
        stop_token_ids=frozenset({op.stop_token}),
        priority=op.priority,
    )


def must_reject(scheduler: Scheduler, request: Request) -> bool:
    total = request.num_prompt_tokens + request.max_tokens
    block_size = scheduler.kv_cache_manager.block_size
    return (
        request.min_tokens > request.max_tokens
        or total > scheduler.config.max_model_len
        or -(-total // block_size) > scheduler.kv_cache_manager.num_blocks
    )


def run_program(scheduler: Scheduler, program: list[Add | Step | Abort], run_step: Callable[[], None]) -> list[Request]:
    """Apply the program's adds (admission checked against ``must_reject``), steps and aborts, then step until every
    request has finished; returns the admitted requests."""
    added: list[Request] = []
    for op in program:
        if isinstance(op, Add):
            request = make_request(op, f"r{len(added)}")
            try:
                scheduler.add_request(request)
            except RequestRejected:
                assert must_reject(scheduler, request)
                continue
            assert not must_reject(scheduler, request)
            added.append(request)
        elif isinstance(op, Step):
            for _ in range(op.count):
                run_step()
        elif added:
            scheduler.finish_request(added[op.index % len(added)].request_id, FinishReason.ABORT)

    # The oldest running request progresses every step and is never preempted, so each request needs at most
    # max_model_len steps once it leads.
    budget = (len(added) + 1) * scheduler.config.max_model_len
    while scheduler.has_unfinished_requests():
        run_step()
        budget -= 1
        assert budget > 0, "scheduler stopped making progress"
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    stats = scheduler.stats()
    assert stats.num_free_swap_slots == stats.num_swap_slots, "swap slots leaked"
    return added


def check_against_reference(requests: list[Request]) -> None:
    """Every request finished with the reference output (an aborted one with a prefix of it)."""
    for request in requests:
        expected, reason = reference_output(request)
        assert request.is_finished
        if request.finish_reason is FinishReason.ABORT:
            assert request.output_token_ids == expected[: request.num_output_tokens]
        else:
            assert (request.output_token_ids, request.finish_reason) == (expected, reason)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=programs())
def test_random_programs_keep_invariants_and_finish(setup: tuple[dict[str, Any], list[Add | Step | Abort]]) -> None:
    limits, program = setup
    scheduler = make_scheduler(**limits)
    runner = FakeRunner(scheduler.kv_cache_manager)
    reported: list[str] = []

    def run_step() -> None:
        reported.extend(step(scheduler, runner).finished_request_ids)

    added = run_program(scheduler, program, run_step)
    run_step()  # reports what finished in the last step
    assert sorted(reported) == sorted(r.request_id for r in added), "each finished request is reported once"
    check_against_reference(added)
