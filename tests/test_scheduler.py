import random
from collections.abc import Sequence

import pytest

from scheduler import (
    FinishReason,
    KVCacheManager,
    Request,
    RequestRejected,
    RequestStatus,
    RequestUpdate,
    Scheduler,
    SchedulerConfig,
    SchedulerOutput,
)
from scheduler.preemption import PreemptionPolicy, SwapSpace
from tests.test_block_pool import assert_invariants as assert_pool_invariants

VOCAB = 64


def next_token(tokens: Sequence[int]) -> int:
    """A deterministic stand-in for a model: the next token depends on the last three tokens and the length."""
    a, b, c = ([0, 0, *tokens])[-3:]
    return (31 * c + 17 * b + 7 * a + len(tokens)) % VOCAB


def reference_output(request: Request) -> tuple[list[int], FinishReason]:
    """What the fake model generates for the request alone, with no scheduler involved."""
    tokens, output = list(request.prompt_token_ids), []
    while True:
        token = next_token(tokens)
        tokens.append(token)
        output.append(token)
        stops = request.stop_token_ids | request.eos_token_ids
        if len(output) >= request.min_tokens and token in stops:
            return output, FinishReason.STOP
        if len(output) >= request.max_tokens:
            return output, FinishReason.LENGTH


class FakeStore:
    """A prefix store in a dict: block hash -> the block's fake KV slots, as ``FakeRunner.persist`` wrote them."""

    def __init__(self) -> None:
        self.blocks: dict[int, list[tuple[int, int] | None]] = {}

    def lookup(self, block_hash: int) -> bool:
        return block_hash in self.blocks


class FakeRunner:
    """Plays the model runner: writes each scheduled token into its KV slot through the block table and samples
    ``next_token`` of the context read back the same way, so a wrong table or a clobbered block changes the output.
    Swaps and prefix-store loads copy the slots, so a block moved to the wrong place changes the output too.
    """

    def __init__(self, manager: KVCacheManager) -> None:
        self.manager = manager
        self.pool = manager.pool
        self.block_size = manager.block_size
        self.kv: dict[int, list[tuple[int, int] | None]] = {}  # block -> slots of (position, token)
        self.swap: dict[int, list[tuple[int, int] | None]] = {}  # swap slot -> a block's slots
        self.num_loaded_blocks = 0

    def execute(self, output: SchedulerOutput) -> dict[str, list[int]]:
        for block, slot in output.swap_out:
            # A slot freed by an aborted swapped-out request is reused without being read: overwriting is right. Two
            # live requests sharing a slot would read each other's KV back, which the output checks catch.
            self.swap[slot] = list(self.kv[block])
        for slot, block in output.swap_in:
            self.kv[block] = self.swap.pop(slot)
        store = self.manager.prefix_store
        for block_hash, block in output.load_blocks:
            assert isinstance(store, FakeStore) and self.pool.ref_count(block) == 1
            self.kv[block] = list(store.blocks[block_hash])
            self.num_loaded_blocks += 1
        sampled = {}
        for item in output.scheduled:
            for position, token in enumerate(item.token_ids, start=item.start_position):
                block = item.block_table[position // self.block_size]
                assert self.pool.ref_count(block) == 1, f"{item.request_id} writes into shared block {block}"
                self.kv.setdefault(block, [None] * self.block_size)[position % self.block_size] = (position, token)
            if item.sample:
                end = item.start_position + len(item.token_ids)
                slots = [self.kv[item.block_table[p // self.block_size]][p % self.block_size] for p in range(end)]
                assert all(slot is not None and slot[0] == p for p, slot in enumerate(slots)), "stale or missing KV"
                sampled[item.request_id] = [next_token([slot[1] for slot in slots if slot is not None])]
        return sampled

    def persist(self) -> None:
        """Write the blocks the step registered in the prefix cache to the prefix store, as the engine does."""
        for block, block_hash in self.manager.take_registered():
            assert isinstance(self.manager.prefix_store, FakeStore)
            self.manager.prefix_store.blocks.setdefault(block_hash, list(self.kv[block]))


def make_scheduler(
    num_blocks: int = 64,
    block_size: int = 4,
    prefix_caching: bool = True,
    preemption_mode: str = "recompute",
    swap_slots: int = 0,
    prefix_store: bool = False,
    **config,
) -> Scheduler:
    config.setdefault("max_model_len", 64)
    manager = KVCacheManager(num_blocks, block_size, prefix_caching, FakeStore() if prefix_store else None)
    preemption = PreemptionPolicy(preemption_mode, SwapSpace(swap_slots) if swap_slots else None)
    return Scheduler(SchedulerConfig(**config), manager, preemption=preemption)


def check_step(scheduler: Scheduler, output: SchedulerOutput) -> None:
    """Budgets of one step, and block ownership right after scheduling."""
    config = scheduler.config
    kv = scheduler.kv_cache_manager
    ids = [item.request_id for item in output.scheduled]
    assert len(ids) == len(set(ids)) <= config.max_num_seqs
    assert scheduler.num_running <= config.max_num_seqs
    assert output.num_batched_tokens == sum(len(item.token_ids) for item in output.scheduled)
    assert output.num_batched_tokens <= config.max_num_batched_tokens
    for item in output.scheduled:
        request = scheduler.get_request(item.request_id)
        assert request is not None and request.status is RequestStatus.RUNNING
        assert len(item.token_ids) >= 1
        if config.long_prefill_token_threshold:
            assert len(item.token_ids) <= config.long_prefill_token_threshold
        assert len(item.block_table) * kv.block_size >= item.start_position + len(item.token_ids)
        assert item.sample == (item.start_position + len(item.token_ids) - item.num_draft_tokens == request.num_tokens)
        assert item.sample or config.enable_chunked_prefill, "a prefill was split with chunking disabled"
    check_blocks(scheduler)


def check_blocks(scheduler: Scheduler) -> None:
    """Every reference is held by a running request; blocks are shared only through the prefix cache."""
    pool = scheduler.kv_cache_manager.pool
    owners = [0] * pool.num_blocks
    for request in scheduler.running:
        table = scheduler.kv_cache_manager.block_table(request.request_id)
        assert len(table) == len(set(table))
        for block in table:
            owners[block] += 1
    for block, count in enumerate(owners):
        assert pool.ref_count(block) == count, f"block {block}: ref_count {pool.ref_count(block)}, {count} owners"
        if count > 1:
            assert pool._hashes[block] is not None, f"block {block} shared without being in the prefix cache"
    assert_pool_invariants(pool)


def check_swap_space(scheduler: Scheduler) -> None:
    """Each swap slot is free or held by exactly one preempted request."""
    policy = scheduler.preemption
    if policy is None or policy.swap_space is None:
        return
    held = [slot for request in scheduler.waiting for slot in request.swap_slots]
    assert len(held) == len(set(held))
    assert all(not request.swap_slots for request in scheduler.running)
    assert len(held) + policy.swap_space.num_free_slots == policy.swap_space.num_slots


def step(scheduler: Scheduler, runner: FakeRunner) -> SchedulerOutput:
    output = scheduler.schedule()
    check_step(scheduler, output)
    scheduler.update(output, runner.execute(output))
    runner.persist()
    check_blocks(scheduler)
    check_swap_space(scheduler)
    return output


def run_to_completion(
    scheduler: Scheduler, arrivals: dict[int, list[Request]], runner: FakeRunner | None = None
) -> None:
    """Drive the scheduler with the fake model, adding requests at their arrival steps, until all finish."""
    runner = runner or FakeRunner(scheduler.kv_cache_manager)
    last_arrival = max(arrivals, default=0)
    num_steps = 0
    while scheduler.has_unfinished_requests() or num_steps <= last_arrival:
        for request in arrivals.get(num_steps, []):
            scheduler.add_request(request)
        step(scheduler, runner)
        num_steps += 1
        assert num_steps < 10_000, "scheduler made no progress"
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_blocks


def assert_matches_reference(requests: list[Request]) -> None:
    for request in requests:
        assert request.is_finished
        assert (request.output_token_ids, request.finish_reason) == reference_output(request), request.request_id


def schedule_with(
    scheduler: Scheduler, tokens: dict[str, list[int]]
) -> tuple[SchedulerOutput, dict[str, RequestUpdate]]:
    """One step where the runner samples the given tokens."""
    output = scheduler.schedule()
    updates = scheduler.update(output, {item.request_id: tokens[item.request_id] for item in output.scheduled})
    return output, {update.request_id: update for update in updates}


# Scheduling order and budgets


def test_running_decodes_are_scheduled_before_new_prefills():
    scheduler = make_scheduler()
    runner = FakeRunner(scheduler.kv_cache_manager)
    scheduler.add_request(Request("a", [1, 2, 3], max_tokens=5))
    step(scheduler, runner)
    scheduler.add_request(Request("b", [4, 5, 6, 7], max_tokens=5))
    output = step(scheduler, runner)
    assert [(s.request_id, s.token_ids, s.start_position) for s in output.scheduled] == [
        ("a", scheduler.get_request("a").output_token_ids[:1], 3),
        ("b", [4, 5, 6, 7], 0),
    ]
    assert output.num_batched_tokens == 5


def test_chunked_prefill_samples_only_on_the_last_chunk():
    scheduler = make_scheduler(max_num_batched_tokens=4)
    runner = FakeRunner(scheduler.kv_cache_manager)
    prompt = list(range(10, 20))
    scheduler.add_request(Request("a", prompt, max_tokens=2))
    chunks = [step(scheduler, runner).scheduled[0] for _ in range(3)]
    assert [(c.token_ids, c.start_position, c.sample) for c in chunks] == [
        (prompt[:4], 0, False),
        (prompt[4:8], 4, False),
        (prompt[8:], 8, True),
    ]
    assert len(scheduler.get_request("a").output_token_ids) == 1


def test_long_prefill_threshold_caps_one_request_per_step():
    scheduler = make_scheduler(long_prefill_token_threshold=3)
    runner = FakeRunner(scheduler.kv_cache_manager)
    scheduler.add_request(Request("a", list(range(7)), max_tokens=1))
    scheduler.add_request(Request("b", list(range(2)), max_tokens=1))
    output = step(scheduler, runner)
    assert [(s.request_id, len(s.token_ids)) for s in output.scheduled] == [("a", 3), ("b", 2)]


def test_max_num_seqs_and_token_budget_are_respected():
    scheduler = make_scheduler(max_num_seqs=2, max_num_batched_tokens=6)
    runner = FakeRunner(scheduler.kv_cache_manager)
    for i in range(3):
        scheduler.add_request(Request(f"r{i}", [i] * 4, max_tokens=3))
    output = step(scheduler, runner)
    assert [(s.request_id, len(s.token_ids)) for s in output.scheduled] == [("r0", 4), ("r1", 2)]
    assert (scheduler.num_running, scheduler.num_waiting) == (2, 1)
    output = step(scheduler, runner)
    assert [(s.request_id, len(s.token_ids)) for s in output.scheduled] == [("r0", 1), ("r1", 2)]


def test_without_chunked_prefill_a_prompt_that_does_not_fit_waits_and_blocks_the_queue():
    scheduler = make_scheduler(max_model_len=16, max_num_batched_tokens=16, enable_chunked_prefill=False)
    runner = FakeRunner(scheduler.kv_cache_manager)
    scheduler.add_request(Request("a", [1, 2], max_tokens=8))
    scheduler.add_request(Request("b", [3, 4], max_tokens=8))
    step(scheduler, runner)
    scheduler.add_request(Request("big", list(range(15)), max_tokens=1))
    scheduler.add_request(Request("small", [5], max_tokens=1))
    output = step(scheduler, runner)
    assert [s.request_id for s in output.scheduled] == ["a", "b"]
    assert scheduler.num_waiting == 2


def test_priority_then_arrival_order():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(Request("late", [1], max_tokens=1, arrival_time=2.0))
    scheduler.add_request(Request("early", [1], max_tokens=1, arrival_time=1.0))
    scheduler.add_request(Request("urgent", [1], max_tokens=1, arrival_time=3.0, priority=-1))
    order = []
    for _ in range(3):
        output, _ = schedule_with(scheduler, {"late": [9], "early": [9], "urgent": [9]})
        order += [s.request_id for s in output.scheduled]
    assert order == ["urgent", "early", "late"]


# Preemption


def test_preempts_the_most_recently_admitted_request():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    runner = FakeRunner(scheduler.kv_cache_manager)
    a = Request("a", [1, 2, 3, 4], max_tokens=4)
    b = Request("b", [5, 6, 7], max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    assert scheduler.kv_cache_manager.num_free_blocks == 0
    output = step(scheduler, runner)
    assert output.preempted_request_ids == ["b"]
    assert [s.request_id for s in output.scheduled] == ["a"], "no admission in a step that preempted"
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert scheduler.kv_cache_manager.block_table("b") == []
    run_to_completion(scheduler, {}, runner)
    assert_matches_reference([a, b])
    assert scheduler.stats().num_preemptions >= 1


def test_no_admission_in_a_step_that_preempted():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=8)
    runner = FakeRunner(scheduler.kv_cache_manager)
    scheduler.add_request(Request("a", [1, 2, 3, 4], max_tokens=4))
    scheduler.add_request(Request("b", [5, 6, 7], max_tokens=4))
    step(scheduler, runner)
    # Urgent enough to queue ahead of the preempted "b", and small enough for the block "b" leaves free.
    scheduler.add_request(Request("urgent", [8], max_tokens=1, priority=-1))
    output = step(scheduler, runner)
    assert (output.preempted_request_ids, [s.request_id for s in output.scheduled]) == (["b"], ["a"])
    output = step(scheduler, runner)
    assert [s.request_id for s in output.scheduled] == ["a", "urgent"]


def test_a_request_that_cannot_grow_preempts_itself_when_it_is_the_last():
    scheduler = make_scheduler(num_blocks=5, block_size=2, max_model_len=10)
    runner = FakeRunner(scheduler.kv_cache_manager)
    a = Request("a", [1, 2, 3, 4], max_tokens=6)
    b = Request("b", [5, 6, 7, 8], max_tokens=6)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    output = step(scheduler, runner)
    assert [s.request_id for s in output.scheduled] == ["a"]
    assert output.preempted_request_ids == ["b"]
    assert scheduler.running == [a]


def test_preempted_request_recomputes_its_outputs_on_readmission():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, prefix_caching=False)
    runner = FakeRunner(scheduler.kv_cache_manager)
    a = Request("a", [1, 2, 3, 4], max_tokens=4)
    b = Request("b", [5, 6, 7], max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    while b.status is not RequestStatus.PREEMPTED:
        step(scheduler, runner)
    known = list(b.all_token_ids)
    assert len(known) == 4
    while b.status is not RequestStatus.RUNNING:
        output = step(scheduler, runner)
    (item,) = [s for s in output.scheduled if s.request_id == "b"]
    assert (item.start_position, item.token_ids, item.sample) == (0, known, True)
    run_to_completion(scheduler, {}, runner)
    assert_matches_reference([a, b])


# Admission


@pytest.mark.parametrize(
    ("prompt", "max_tokens", "min_tokens", "message"),
    [
        ([], 4, 0, "prompt is empty"),
        (list(range(16)), 1, 0, "prompt has 16 tokens, more than max_model_len - 1 = 15"),
        (list(range(10)), 7, 0, r"prompt \(10 tokens\) \+ max_tokens \(7\) = 17 exceeds max_model_len \(16\)"),
        (list(range(4)), 0, 0, "max_tokens must be >= 1, got 0"),
        (list(range(4)), 2, 3, r"min_tokens \(3\) must be in \[0, 2\]"),
    ],
)
def test_rejects_requests_that_can_never_be_served(prompt, max_tokens, min_tokens, message):
    scheduler = make_scheduler(max_model_len=16)
    with pytest.raises(RequestRejected, match=message):
        scheduler.add_request(Request("r", prompt, max_tokens=max_tokens, min_tokens=min_tokens))
    assert not scheduler.has_unfinished_requests()


def test_rejects_a_request_larger_than_the_whole_pool():
    scheduler = make_scheduler(num_blocks=3, block_size=4)
    with pytest.raises(RequestRejected, match=r"needs 4 KV-cache blocks of 4 tokens, but the pool has only 3") as info:
        scheduler.add_request(Request("r", list(range(10)), max_tokens=3))
    assert isinstance(info.value, ValueError)
    scheduler.add_request(Request("ok", list(range(10)), max_tokens=2))


def test_rejects_a_duplicate_live_request_id():
    scheduler = make_scheduler()
    scheduler.add_request(Request("r", [1], max_tokens=1))
    with pytest.raises(RequestRejected, match="already in use"):
        scheduler.add_request(Request("r", [2], max_tokens=1))


def test_queue_bound_is_only_reported():
    scheduler = make_scheduler(max_waiting_requests=2)
    scheduler.add_request(Request("a", [1], max_tokens=1))
    assert not scheduler.is_queue_full()
    scheduler.add_request(Request("b", [1], max_tokens=1))
    assert scheduler.is_queue_full()
    scheduler.schedule()
    assert not scheduler.is_queue_full()


@pytest.mark.parametrize(
    ("field", "overrides"),
    [
        ("max_model_len", {"max_model_len": 1}),
        ("max_num_seqs", {"max_num_seqs": 0}),
        ("max_num_batched_tokens", {"max_num_batched_tokens": 0}),
        ("long_prefill_token_threshold", {"long_prefill_token_threshold": -1}),
        ("max_waiting_requests", {"max_waiting_requests": 0}),
        ("max_num_batched_tokens", {"enable_chunked_prefill": False, "max_num_batched_tokens": 100}),
        ("long_prefill_token_threshold", {"enable_chunked_prefill": False, "long_prefill_token_threshold": 8}),
    ],
)
def test_config_validation_names_the_field(field, overrides):
    with pytest.raises(ValueError, match=field):
        SchedulerConfig(**{"max_model_len": 256, **overrides})


# Finishing


def test_finish_request_frees_waiting_and_running_requests():
    scheduler = make_scheduler(max_num_seqs=1)
    scheduler.add_request(Request("run", list(range(6)), max_tokens=4))
    scheduler.add_request(Request("wait", list(range(6)), max_tokens=4))
    output = scheduler.schedule()
    assert scheduler.kv_cache_manager.num_free_blocks < scheduler.kv_cache_manager.num_blocks
    scheduler.finish_request("run", FinishReason.ABORT)
    scheduler.finish_request("wait", FinishReason.ABORT)
    scheduler.finish_request("wait", FinishReason.ABORT)
    scheduler.finish_request("unknown", FinishReason.ABORT)
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_blocks
    assert not scheduler.has_unfinished_requests() and scheduler.get_request("run") is None
    assert scheduler.update(output, {"run": [1]}) == [], "a request aborted after schedule() gets no tokens"
    assert scheduler.schedule().finished_request_ids == ["run", "wait"]
    assert scheduler.schedule().finished_request_ids == []


def test_stop_and_eos_tokens_finish_after_min_tokens_and_are_reported():
    scheduler = make_scheduler()
    scheduler.add_request(Request("stop", [1], max_tokens=9, stop_token_ids=frozenset({7}), min_tokens=2))
    scheduler.add_request(Request("eos", [1], max_tokens=9, eos_token_ids=frozenset({2})))
    _, updates = schedule_with(scheduler, {"stop": [7], "eos": [5]})
    assert updates["stop"].finish_reason is None and updates["eos"].finish_reason is None
    _, updates = schedule_with(scheduler, {"stop": [7], "eos": [2]})
    assert (updates["stop"].new_token_ids, updates["stop"].finish_reason) == ([7], FinishReason.STOP)
    assert (updates["eos"].new_token_ids, updates["eos"].finish_reason) == ([2], FinishReason.STOP)
    assert not scheduler.has_unfinished_requests()
    assert scheduler.schedule().finished_request_ids == ["stop", "eos"]


def test_max_tokens_finishes_with_length():
    scheduler = make_scheduler()
    request = Request("r", [1, 2], max_tokens=2, eos_token_ids=frozenset({3}), min_tokens=2)
    scheduler.add_request(request)
    _, updates = schedule_with(scheduler, {"r": [3]})
    assert updates["r"].finish_reason is None
    _, updates = schedule_with(scheduler, {"r": [4]})
    assert updates["r"].finish_reason is FinishReason.LENGTH
    assert request.output_token_ids == [3, 4] and request.all_token_ids == [1, 2, 3, 4]
    assert scheduler.kv_cache_manager.num_free_blocks == scheduler.kv_cache_manager.num_blocks


def test_several_sampled_tokens_stop_at_the_first_stop_condition():
    scheduler = make_scheduler()
    request = Request("r", [1], max_tokens=9, stop_token_ids=frozenset({5}))
    scheduler.add_request(request)
    _, updates = schedule_with(scheduler, {"r": [4, 5, 6]})
    assert (updates["r"].new_token_ids, updates["r"].finish_reason) == ([4, 5], FinishReason.STOP)
    assert request.output_token_ids == [4, 5]


# Prefix caching


def test_repeated_prompt_computes_only_the_uncached_tail():
    scheduler = make_scheduler(block_size=4)
    prompt = list(range(30, 40))
    first = Request("first", prompt, max_tokens=3)
    run_to_completion(scheduler, {0: [first]})
    second = Request("second", prompt, max_tokens=3)
    scheduler.add_request(second)
    output = scheduler.schedule()
    (item,) = output.scheduled
    assert (item.start_position, item.token_ids) == (8, prompt[8:])
    assert second.num_cached_prompt_tokens == 8
    stats = scheduler.stats()
    assert (stats.prefix_cache_queries, stats.prefix_cache_hits) == (20, 8)


def test_chunked_prefill_caches_each_chunk_once_computed():
    scheduler = make_scheduler(block_size=4, max_num_batched_tokens=16, long_prefill_token_threshold=8)
    runner = FakeRunner(scheduler.kv_cache_manager)
    prompt = list(range(20))
    scheduler.add_request(Request("long", prompt, max_tokens=1))
    step(scheduler, runner)
    scheduler.add_request(Request("same", prompt, max_tokens=1))
    output = step(scheduler, runner)
    assert [(s.request_id, s.start_position) for s in output.scheduled] == [("long", 8), ("same", 8)]


def test_stats_snapshot():
    scheduler = make_scheduler(num_blocks=8, block_size=4)
    scheduler.add_request(Request("a", list(range(5)), max_tokens=2))
    scheduler.add_request(Request("b", list(range(5)), max_tokens=2))
    scheduler.schedule()
    stats = scheduler.stats()
    assert (stats.num_running, stats.num_waiting, stats.num_free_blocks, stats.num_blocks) == (2, 0, 4, 8)
    assert stats.kv_cache_usage == 0.5 and stats.num_preemptions == 0


# The fake model as an end-to-end reference


def random_workload(rng: random.Random, num_requests: int, max_model_len: int) -> dict[int, list[Request]]:
    prefixes = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))] for _ in range(3)]
    arrivals: dict[int, list[Request]] = {}
    for i in range(num_requests):
        prompt = rng.choice(prefixes)[: rng.randint(1, 12)] + [rng.randrange(VOCAB) for _ in range(rng.randint(0, 6))]
        max_tokens = rng.randint(1, max_model_len - len(prompt))
        request = Request(
            f"r{i}",
            prompt,
            max_tokens=max_tokens,
            eos_token_ids=frozenset({0}),
            stop_token_ids=frozenset(rng.sample(range(VOCAB), 2)),
            min_tokens=rng.randint(0, max_tokens),
            priority=rng.choice([0, 0, 1]),
        )
        arrivals.setdefault(rng.randrange(20), []).append(request)
    return arrivals


@pytest.mark.parametrize("seed", range(12))
def test_batched_outputs_match_single_request_runs(seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4, 8])
    max_model_len = 32
    chunked = rng.random() < 0.7
    scheduler = make_scheduler(
        num_blocks=rng.randint(max_model_len // block_size, max_model_len // block_size + 8),
        block_size=block_size,
        prefix_caching=rng.random() < 0.8,
        max_model_len=max_model_len,
        max_num_seqs=rng.randint(1, 8),
        max_num_batched_tokens=rng.randint(1, 40) if chunked else rng.randint(max_model_len, 48),
        enable_chunked_prefill=chunked,
        long_prefill_token_threshold=rng.choice([0, 0, 3]) if chunked else 0,
    )
    arrivals = random_workload(rng, 16, max_model_len)
    run_to_completion(scheduler, arrivals)
    assert_matches_reference([r for requests in arrivals.values() for r in requests])


def test_tiny_pool_forces_preemption_and_still_matches():
    scheduler = make_scheduler(num_blocks=8, block_size=2, max_model_len=16, max_num_batched_tokens=8)
    rng = random.Random(1)
    requests = [Request(f"r{i}", [rng.randrange(VOCAB) for _ in range(6)], max_tokens=10) for i in range(6)]
    run_to_completion(scheduler, {0: requests})
    assert scheduler.stats().num_preemptions > 0
    assert_matches_reference(requests)
