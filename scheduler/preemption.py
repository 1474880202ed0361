"""How a preempted request gives back its KV blocks: dropped and recomputed later, or swapped out and back in.

Plain numbers only: the scheduler decides which blocks go to which swap slots; the engine moves the bytes.
"""

from __future__ import annotations

PREEMPTION_MODES = ("recompute", "swap", "auto")

# Weight of a new measurement in the running rate estimates: recent enough to follow load, smooth enough to ignore
# a single disturbed step.
_RATE_WEIGHT = 0.2


class SwapSpace:
    """Free-slot allocator of the swap tier: ``num_slots`` slots of one KV block each."""

    def __init__(self, num_slots: int) -> None:
        if num_slots < 1:
            raise ValueError(f"swap space must hold at least one block, got {num_slots} slots")
        self.num_slots = num_slots
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: slot 0 first

    @property
    def num_free_slots(self) -> int:
        return len(self._free)

    def allocate(self, n: int) -> list[int] | None:
        """``n`` slots, or None (taking nothing) when fewer are free."""
        if n > len(self._free):
            return None
        return [self._free.pop() for _ in range(n)]

    def free(self, slots: list[int]) -> None:
        self._free.extend(reversed(slots))


class PreemptionPolicy:
    """Chooses per preempted request between recompute and swap (``mode``: recompute | swap | auto).

    ``auto`` swaps when moving the request's blocks out and back in is estimated to take less time than recomputing
    its computed tokens: ``2 * blocks * bytes_per_block / swap_bytes_per_second`` against
    ``num_computed_tokens / prefill_tokens_per_second``. The engine feeds both rates from what it measures (the swap
    file's copies, prefill-dominated steps); until a prefill rate is known, swapping counts as cheaper. Whatever the
    mode, a request whose blocks do not fit the free swap slots is recomputed.
    """

    def __init__(self, mode: str, swap_space: SwapSpace | None = None, bytes_per_block: int = 0) -> None:
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"preemption_mode must be one of {', '.join(PREEMPTION_MODES)}, got {mode!r}")
        if mode != "recompute" and swap_space is None:
            raise ValueError(f"preemption_mode {mode} needs swap space")
        self.mode = mode
        self.swap_space = swap_space
        self.bytes_per_block = bytes_per_block
        self.prefill_tokens_per_second: float | None = None
        self.swap_bytes_per_second: float | None = None

    def observe_prefill(self, num_tokens: int, seconds: float) -> None:
        self.prefill_tokens_per_second = _blend(self.prefill_tokens_per_second, num_tokens, seconds)

    def observe_swap(self, num_bytes: int, seconds: float) -> None:
        self.swap_bytes_per_second = _blend(self.swap_bytes_per_second, num_bytes, seconds)

    def swap_slots(self, num_computed_tokens: int, num_blocks: int) -> list[int] | None:
        """Swap slots for a preempted request's first ``num_blocks`` blocks, or None to recompute it."""
        if self.swap_space is None or self.mode == "recompute" or num_blocks == 0:
            return None
        if self.mode == "auto" and not self.swap_is_cheaper(num_computed_tokens, num_blocks):
            return None
        return self.swap_space.allocate(num_blocks)

    def swap_is_cheaper(self, num_computed_tokens: int, num_blocks: int) -> bool:
        if self.prefill_tokens_per_second is None or self.swap_bytes_per_second is None:
            return True
        swap_seconds = 2 * num_blocks * self.bytes_per_block / self.swap_bytes_per_second
        return swap_seconds < num_computed_tokens / self.prefill_tokens_per_second


def _blend(previous: float | None, amount: int, seconds: float) -> float | None:
    if seconds <= 0 or amount <= 0:
        return previous
    rate = amount / seconds
    return rate if previous is None else (1 - _RATE_WEIGHT) * previous + _RATE_WEIGHT * rate
