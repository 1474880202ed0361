"""Swap preemption and the prefix-store tier at the scheduler level, against the fake model's reference outputs.

The fake runner copies block contents on every swap and load, so a block moved to the wrong slot, read back stale
or loaded for the wrong hash changes the sampled tokens.
"""

import random

import pytest

from scheduler import FinishReason, Request, RequestStatus
from scheduler.preemption import PreemptionPolicy, SwapSpace
from tests.test_scheduler import (
    VOCAB,
    FakeRunner,
    assert_matches_reference,
    make_scheduler,
    random_workload,
    run_to_completion,
    step,
)


def test_swapped_request_resumes_where_it_stopped():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, preemption_mode="swap", swap_slots=4)
    runner = FakeRunner(scheduler.kv_cache_manager)
    a = Request("a", [1, 2, 3, 4], max_tokens=4)
    b = Request("b", [5, 6, 7], max_tokens=4)
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    output = step(scheduler, runner)
    assert output.preempted_request_ids == ["b"]
    assert [slot for _, slot in output.swap_out] == b.swap_slots and len(b.swap_slots) == 2
    assert (b.status, b.num_computed_tokens) == (RequestStatus.PREEMPTED, 3), "a swapped request keeps its progress"
    known = list(b.all_token_ids)
    while b.status is not RequestStatus.RUNNING:
        output = step(scheduler, runner)
    (item,) = [s for s in output.scheduled if s.request_id == "b"]
    # Only the last sampled token is computed: the rest comes back from the swap slots.
    assert (item.start_position, item.token_ids) == (3, known[3:])
    assert [block for _, block in output.swap_in] == item.block_table[:2]
    run_to_completion(scheduler, {}, runner)
    assert_matches_reference([a, b])
    stats = scheduler.stats()
    assert stats.num_swap_preemptions == stats.num_preemptions >= 1
    assert stats.num_free_swap_slots == stats.num_swap_slots == 4


def test_full_swap_space_falls_back_to_recompute():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, preemption_mode="swap", swap_slots=1)
    runner = FakeRunner(scheduler.kv_cache_manager)
    a = Request("a", [1, 2, 3, 4], max_tokens=4)
    b = Request("b", [5, 6, 7], max_tokens=4)  # two blocks: more than the one slot
    scheduler.add_request(a)
    scheduler.add_request(b)
    step(scheduler, runner)
    output = step(scheduler, runner)
    assert output.preempted_request_ids == ["b"] and output.swap_out == []
    assert (b.num_computed_tokens, b.swap_slots) == (0, [])
    run_to_completion(scheduler, {}, runner)
    assert_matches_reference([a, b])
    assert scheduler.stats().num_swap_preemptions == 0


def test_auto_mode_compares_moving_bytes_with_recomputing_tokens():
    policy = PreemptionPolicy("auto", SwapSpace(100), bytes_per_block=1000)
    assert policy.swap_slots(10, 2) is not None, "without measurements, swapping counts as cheaper"
    policy.observe_prefill(1000, 1.0)  # 1000 tokens/s
    policy.observe_swap(100_000, 1.0)  # 100 kB/s: two blocks out and in take 0.04 s
    assert policy.swap_is_cheaper(41, 2) and not policy.swap_is_cheaper(39, 2)
    policy.observe_swap(100_000, 10.0)  # slower: the estimate moves a fifth of the way to 10 kB/s
    assert policy.swap_bytes_per_second == pytest.approx(82_000)
    assert PreemptionPolicy("recompute").swap_slots(10**6, 1) is None
    with pytest.raises(ValueError, match="needs swap space"):
        PreemptionPolicy("swap")
    with pytest.raises(ValueError, match="preemption_mode must be one of"):
        PreemptionPolicy("sometimes", SwapSpace(1))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("mode", ["swap", "auto"])
def test_tight_pools_with_swapping_match_single_request_runs(seed: int, mode: str):
    rng = random.Random(seed)
    block_size = rng.choice([1, 2, 4])
    max_model_len = 32
    scheduler = make_scheduler(
        num_blocks=max_model_len // block_size + rng.randint(0, 4),
        block_size=block_size,
        prefix_caching=rng.random() < 0.5,
        preemption_mode=mode,
        swap_slots=rng.randint(1, 3 * max_model_len // block_size),
        max_model_len=max_model_len,
        max_num_seqs=rng.randint(2, 8),
        max_num_batched_tokens=rng.randint(4, 40),
    )
    arrivals = random_workload(rng, 16, max_model_len)
    run_to_completion(scheduler, arrivals)
    assert_matches_reference([r for requests in arrivals.values() for r in requests])
    stats = scheduler.stats()
    assert stats.num_free_swap_slots == stats.num_swap_slots


def test_prefix_store_serves_blocks_evicted_from_memory():
    scheduler = make_scheduler(num_blocks=6, block_size=2, max_model_len=12, prefix_store=True)
    runner = FakeRunner(scheduler.kv_cache_manager)
    shared = [3, 1, 4, 1, 5, 9, 2, 6]
    first = Request("first", [*shared, 7], max_tokens=2)
    run_to_completion(scheduler, {0: [first]}, runner)
    # An unrelated request of the whole pool evicts every cached block from memory.
    run_to_completion(scheduler, {0: [Request("other", [8] * 11, max_tokens=1)]}, runner)
    assert scheduler.kv_cache_manager.get_computed_blocks(Request("probe", [*shared, 0], max_tokens=1))[1] == 0
    second = Request("second", [*shared, 0], max_tokens=3)
    scheduler.add_request(second)
    output = step(scheduler, runner)
    # The four full blocks of the shared prefix come from the store; only the last token is computed.
    assert [h for h, _ in output.load_blocks] == second.block_hashes[:4]
    assert [s.start_position for s in output.scheduled] == [8]
    run_to_completion(scheduler, {}, runner)
    assert_matches_reference([first, second])
    assert runner.num_loaded_blocks == 4


def test_prefix_store_hits_stop_at_the_first_missing_block():
    scheduler = make_scheduler(num_blocks=8, block_size=2, max_model_len=12, prefix_store=True)
    runner = FakeRunner(scheduler.kv_cache_manager)
    first = Request("first", [1, 2, 3, 4, 5, 6, 7], max_tokens=1)
    run_to_completion(scheduler, {0: [first]}, runner)
    store = scheduler.kv_cache_manager.prefix_store
    del store.blocks[first.block_hashes[1]]  # a gap: the block after it cannot be used either
    scheduler.kv_cache_manager.pool.reset_prefix_cache()
    second = Request("second", [1, 2, 3, 4, 5, 6, 0], max_tokens=2)
    scheduler.add_request(second)
    output = step(scheduler, runner)
    assert [h for h, _ in output.load_blocks] == [first.block_hashes[0]]
    run_to_completion(scheduler, {}, runner)
    assert_matches_reference([first, second])


def test_aborting_a_swapped_request_frees_its_slots():
    scheduler = make_scheduler(num_blocks=4, block_size=2, max_model_len=8, preemption_mode="swap", swap_slots=4)
    runner = FakeRunner(scheduler.kv_cache_manager)
    scheduler.add_request(Request("a", [1, 2, 3, 4], max_tokens=4))
    scheduler.add_request(b := Request("b", [5, 6, 7], max_tokens=4))
    step(scheduler, runner)
    step(scheduler, runner)
    assert b.swap_slots
    scheduler.finish_request("b", FinishReason.ABORT)
    assert scheduler.stats().num_free_swap_slots == 4
    run_to_completion(scheduler, {}, runner)


def test_many_swaps_of_long_prompts_match_single_request_runs():
    rng = random.Random(7)
    scheduler = make_scheduler(
        num_blocks=10, block_size=2, max_model_len=16, max_num_batched_tokens=8, preemption_mode="swap", swap_slots=40
    )
    requests = [Request(f"r{i}", [rng.randrange(VOCAB) for _ in range(6)], max_tokens=10) for i in range(6)]
    run_to_completion(scheduler, {0: requests})
    assert scheduler.stats().num_swap_preemptions > 0
    assert_matches_reference(requests)
