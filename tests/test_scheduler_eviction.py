"""Random programs with a KV eviction policy in the loop: the scheduler's resident rows, block tables and trims
must keep every request's cache exactly what an independent model of the eviction says, with no block leaked."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from scheduler import KVCacheManager, Request, RequestRejected, Scheduler, SchedulerConfig, SchedulerOutput
from scheduler.request import RequestStatus
from tests.test_scheduler import VOCAB, check_blocks, next_token


@dataclass
class SinkWindowModel:
    """Keeps the first ``sink`` rows and the most recent ones, ``budget`` in all, once a block's worth is over."""

    budget: int
    sink: int
    block_size: int
    rows: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # request -> (position, token) per row

    def kept(self, rows: list[tuple[int, int]]) -> list[tuple[int, int]]:
        return rows[: self.sink] + rows[len(rows) - (self.budget - self.sink) :]


class EvictingRunner:
    """Writes each token at its cache row through the block table, reads the rows back before sampling and checks
    them against the model; after each step compacts the fake cache the way the model says, then tells the
    scheduler."""

    def __init__(self, scheduler: Scheduler, model: SinkWindowModel) -> None:
        self.scheduler, self.model = scheduler, model
        self.block_size = scheduler.kv_cache_manager.block_size
        self.kv: dict[int, list[tuple[int, int] | None]] = {}

    def slot(self, table: list[int], row: int) -> tuple[int, int]:
        return table[row // self.block_size], row % self.block_size

    def read(self, table: list[int], num_rows: int) -> list[tuple[int, int] | None]:
        return [self.kv[block][offset] for block, offset in (self.slot(table, r) for r in range(num_rows))]

    def execute(self, output: SchedulerOutput) -> dict[str, list[int]]:
        for request_id in output.preempted_request_ids:
            self.model.rows.pop(request_id, None)
        sampled = {}
        for item in output.scheduled:
            rows = self.model.rows.setdefault(item.request_id, [])
            assert item.cache_position == len(rows), "new rows must follow the resident ones"
            for i, token in enumerate(item.token_ids):
                block, offset = self.slot(item.block_table, item.cache_position + i)
                self.kv.setdefault(block, [None] * self.block_size)[offset] = (item.start_position + i, token)
                rows.append((item.start_position + i, token))
            if item.sample:
                resident = self.read(item.block_table, len(rows))
                assert resident == rows, "the cache lost or misplaced rows"
                sampled[item.request_id] = [next_token([token for _, token in rows])]
        return sampled

    def compact(self, output: SchedulerOutput) -> None:
        kv = self.scheduler.kv_cache_manager
        for item in output.scheduled:
            request = self.scheduler.get_request(item.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if request.num_kv_tokens < self.model.budget + self.block_size:
                continue
            table = kv.block_table(request.request_id)
            kept = self.model.kept(self.model.rows[request.request_id])
            for row, entry in enumerate(kept):
                block, offset = self.slot(table, row)
                self.kv[block][offset] = entry
            self.model.rows[request.request_id] = kept
            self.scheduler.evict_kv(request.request_id, self.model.budget)
            assert len(kv.block_table(request.request_id)) == kv.num_blocks_needed(self.model.budget)


@st.composite
def programs(draw: st.DrawFn) -> tuple[dict[str, Any], list[tuple[int, int, int]]]:
    block_size = draw(st.integers(1, 5))
    budget = draw(st.integers(2, 12))
    chunked = draw(st.booleans())
    max_model_len = draw(st.integers(4, 80))
    limits = dict(
        block_size=block_size,
        budget=budget,
        sink=draw(st.integers(0, 1)),
        num_blocks=draw(st.integers(1, 24)),
        max_model_len=max_model_len,
        max_num_seqs=draw(st.integers(1, 4)),
        max_num_batched_tokens=draw(st.integers(1, 16) if chunked else st.integers(max_model_len, 96)),
        enable_chunked_prefill=chunked,
    )
    requests = st.tuples(st.integers(1, max_model_len - 1), st.integers(1, max_model_len), st.integers(0, 3))
    return limits, draw(st.lists(requests, min_size=1, max_size=8))


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(setup=programs())
def test_eviction_keeps_caches_exact_and_finishes(setup: tuple[dict[str, Any], list[tuple[int, int, int]]]) -> None:
    limits, requests = setup
    budget, sink, block_size = limits.pop("budget"), limits.pop("sink"), limits["block_size"]
    num_blocks = limits.pop("num_blocks")
    config = SchedulerConfig(**{k: v for k, v in limits.items() if k != "block_size"})
    scheduler = Scheduler(config, KVCacheManager(num_blocks, block_size, False), kv_token_budget=budget)
    runner = EvictingRunner(scheduler, SinkWindowModel(budget, sink, block_size))
    added = []
    for index, (prompt_len, max_tokens, seed) in enumerate(requests):
        prompt = [(seed * 11 + 3 * i) % VOCAB for i in range(prompt_len)]
        request = Request(f"r{index}", prompt, max_tokens=min(max_tokens, config.max_model_len - prompt_len))
        resident = scheduler.max_kv_tokens(prompt_len + request.max_tokens)
        try:
            scheduler.add_request(request)
        except RequestRejected:
            assert -(-resident // block_size) > num_blocks
            continue
        assert -(-resident // block_size) <= num_blocks
        added.append(request)
    steps = 0
    while scheduler.has_unfinished_requests():
        output = scheduler.schedule()
        scheduler.update(output, runner.execute(output))
        runner.compact(output)
        check_blocks(scheduler)
        for request in scheduler.running:
            table = scheduler.kv_cache_manager.block_table(request.request_id)
            assert len(table) == scheduler.kv_cache_manager.num_blocks_needed(request.num_kv_tokens)
        steps += 1
        assert steps < 5000, "no progress"
    kv = scheduler.kv_cache_manager
    assert kv.num_free_blocks == kv.num_blocks, "blocks leaked"
    for request in added:
        assert request.is_finished and request.num_output_tokens == request.max_tokens
