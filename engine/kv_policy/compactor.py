"""Applies an eviction policy to requests' paged KV caches after a step, and frees the blocks it empties."""

from __future__ import annotations

import torch

from engine.kv_policy.eviction import EvictionPolicy
from engine.kv_policy.query_recorder import QueryRecorder
from scheduler.output import SchedulerOutput
from scheduler.request import RequestStatus
from scheduler.scheduler import Scheduler


class KVCompactor:
    """After each step, compacts every request that reached the policy's trigger: per layer, its resident rows are
    read through the block table, the policy picks (or merges) ``budget`` rows per KV head, those are written back
    to the first rows of the same blocks, and the scheduler frees the blocks past them."""

    def __init__(
        self,
        policy: EvictionPolicy,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        scale: float,
        recorder: QueryRecorder | None,
    ) -> None:
        self.policy = policy
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.scale = scale
        self.recorder = recorder
        self.num_compactions = 0
        self.num_evicted_tokens = 0

    @torch.inference_mode()
    def run(self, scheduler: Scheduler, output: SchedulerOutput) -> None:
        if self.recorder is not None:
            for request_id in [*output.finished_request_ids, *output.preempted_request_ids]:
                self.recorder.drop(request_id)
        for item in output.scheduled:
            request = scheduler.get_request(item.request_id)
            if request is None or request.status is not RequestStatus.RUNNING:
                continue
            if not self.policy.should_compact(request.num_kv_tokens):
                continue
            table = scheduler.kv_cache_manager.block_table(request.request_id)
            self.compact(request.request_id, table, request.num_kv_tokens)
            self.num_compactions += 1
            self.num_evicted_tokens += request.num_kv_tokens - self.policy.budget
            scheduler.evict_kv(request.request_id, self.policy.budget)

    def compact(self, request_id: str, block_table: list[int], num_rows: int) -> None:
        """Rewrite the first ``budget`` rows of the request's cache with what the policy keeps, layer by layer."""
        slots = self.slots(block_table, num_rows)
        kept_slots = slots[: self.policy.budget]
        for layer, (key_cache, value_cache) in enumerate(self.kv_caches):
            keys = key_cache.view(-1, *key_cache.shape[2:])
            values = value_cache.view(-1, *value_cache.shape[2:])
            queries = self.recorder.queries(request_id, layer) if self.recorder is not None else None
            new_keys, new_values = self.policy.compact(keys[slots], values[slots], queries, self.scale)
            keys[kept_slots] = new_keys
            values[kept_slots] = new_values

    def slots(self, block_table: list[int], num_rows: int) -> torch.Tensor:
        device = self.kv_caches[0][0].device
        rows = torch.arange(num_rows, device=device)
        table = torch.tensor(block_table, dtype=torch.long, device=device)
        return table[rows // self.block_size] * self.block_size + rows % self.block_size
