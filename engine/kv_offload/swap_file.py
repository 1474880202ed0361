"""The swap tier: a bounded memory-mapped file of block-sized slots (host memory on a GPU machine; here the page
cache over a file, which the kernel may write back to disk under memory pressure)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class SwapFile:
    """``num_slots`` rows of ``bytes_per_slot`` bytes in a file mapped shared; the file is unlinked once mapped, so
    it disappears with the process whatever way it ends."""

    def __init__(self, directory: str | Path | None, num_slots: int, bytes_per_slot: int) -> None:
        fd, path = tempfile.mkstemp(prefix="spindle-swap-", suffix=".bin", dir=directory)
        try:
            os.ftruncate(fd, num_slots * bytes_per_slot)
            mapped = torch.from_file(path, shared=True, size=num_slots * bytes_per_slot, dtype=torch.uint8)
        finally:
            os.close(fd)
            os.unlink(path)
        self.slots = mapped.view(num_slots, bytes_per_slot)
        self.path = path

    def write(self, slots: list[int], rows: torch.Tensor) -> None:
        self.slots.index_copy_(0, torch.tensor(slots, dtype=torch.long), rows)

    def read(self, slots: list[int]) -> torch.Tensor:
        return self.slots.index_select(0, torch.tensor(slots, dtype=torch.long))
