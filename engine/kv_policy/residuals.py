"""Which residual buffers each request's filling KV block uses under a block codec (kernels/codec_cache.py)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass
class _Residual:
    slot: int
    step_start: int  # cache position of the last step planned
    read: int
    write: int


class ResidualBuffers:
    """Each running request holds one residual slot (buffers ``2 * slot`` and ``2 * slot + 1``). A step reads the
    request's filling block from the buffer the previous step wrote, and writes its new filling block to the other
    one when it seals a block (to the same one otherwise), so that a retried step (same cache position) finds the
    rows it read the first time. Slots are freed when the scheduler reports the request finished or preempted."""

    def __init__(self, num_slots: int, block_size: int) -> None:
        self.block_size = block_size
        self._free = deque(range(num_slots))
        self._held: dict[str, _Residual] = {}

    def release(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            held = self._held.pop(request_id, None)
            if held is not None:
                self._free.append(held.slot)

    def plan(self, request_id: str, cache_position: int, num_tokens: int) -> tuple[int, int]:
        """(buffer read, buffer written) for a step writing rows [cache_position, cache_position + num_tokens)."""
        held = self._held.get(request_id)
        if held is None:
            if not self._free:
                raise RuntimeError("more running requests than residual slots (max_num_seqs)")
            slot = self._free.popleft()
            held = self._held[request_id] = _Residual(slot, -1, 2 * slot, 2 * slot)
        if held.step_start != cache_position:
            read = held.write
            seals = cache_position // self.block_size != (cache_position + num_tokens) // self.block_size
            held.step_start, held.read, held.write = cache_position, read, read ^ 1 if seals else read
        return held.read, held.write
