"""The bytes of whole KV-cache blocks, across every layer, as one row per block: what the swap file and the prefix
store hold. Dense and quantized caches are copied as stored (no conversion), so a block comes back bit for bit."""

from __future__ import annotations

import torch

from kernels.quantized_cache import PagedCache, QuantizedCache


class BlockBytes:
    """Gathers blocks of the paged caches into rows of ``bytes_per_block`` uint8 and scatters rows back."""

    def __init__(self, kv_caches: list[tuple[PagedCache, PagedCache]]) -> None:
        # Byte views [num_blocks, bytes] of every stored tensor, sharing the caches' memory.
        self._parts: list[torch.Tensor] = []
        for key_cache, value_cache in kv_caches:
            for cache in (key_cache, value_cache):
                tensors = [cache.data, cache.scale, cache.zero] if isinstance(cache, QuantizedCache) else [cache]
                self._parts.extend(t.view(torch.uint8).view(t.shape[0], -1) for t in tensors)
        self.bytes_per_block = sum(part.shape[1] for part in self._parts)
        self.device = self._parts[0].device

    def gather(self, block_ids: list[int]) -> torch.Tensor:
        """A copy of the blocks: uint8 [len(block_ids), bytes_per_block] on the CPU."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        return torch.cat([part.index_select(0, ids) for part in self._parts], dim=1).cpu()

    def scatter(self, block_ids: list[int], rows: torch.Tensor) -> None:
        """Overwrite the blocks with rows from ``gather``."""
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        rows = rows.to(self.device)
        offset = 0
        for part in self._parts:
            width = part.shape[1]
            part.index_copy_(0, ids, rows[:, offset : offset + width])
            offset += width
