"""Applies an eviction policy to requests' paged KV caches after a step, and frees the blocks it empties."""

from __future__ import annotations

import torch

from engine.kv_policy.eviction import EvictionPolicy
from engine.kv_policy.query_recorder import QueryRecorder
from kernels.quantized_cache import PagedCache, QuantizedCache, read_rows, write_rows
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
        kv_caches: list[tuple[PagedCache, PagedCache]],
        block_size: int,
        dtype: torch.dtype,
        scale: float,
        recorder: QueryRecorder | None,
    ) -> None:
        self.policy = policy
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.dtype = dtype  # rows of a quantized cache are scored in the model's dtype
        self.scale = scale
        self.recorder = recorder
        key_cache = kv_caches[0][0]
        self.device = key_cache.data.device if isinstance(key_cache, QuantizedCache) else key_cache.device
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
            keys, values = read_rows(key_cache, slots, self.dtype), read_rows(value_cache, slots, self.dtype)
            queries = self.recorder.queries(request_id, layer) if self.recorder is not None else None
            new_keys, new_values = self.policy.compact(keys, values, queries, self.scale)
            write_rows(key_cache, new_keys, kept_slots)
            write_rows(value_cache, new_values, kept_slots)

    def slots(self, block_table: list[int], num_rows: int) -> torch.Tensor:
        rows = torch.arange(num_rows, device=self.device)
        table = torch.tensor(block_table, dtype=torch.long, device=self.device)
        return table[rows // self.block_size] * self.block_size + rows % self.block_size
