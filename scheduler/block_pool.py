"""Physical KV-cache blocks: reference counts, the free queue and the hash-addressed cache of full blocks."""

from collections import OrderedDict
from collections.abc import Iterable


class BlockPool:
    """Owns block ids ``0..num_blocks-1``.

    A block with ref_count 0 sits in the free queue. If it still carries a hash it is a *cached* block: a request with
    the same prefix can take it back with ``touch()`` until ``allocate()`` evicts it for new content. The free queue
    hands out uncached blocks first (evicting them loses nothing), then cached ones least recently freed first.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if not isinstance(num_blocks, int) or num_blocks < 1:
            raise ValueError(f"num_blocks must be a positive integer, got {num_blocks!r}")
        if not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._hashes: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._free_queue: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._num_cached_free = 0

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocate() can hand out, cached ones included."""
        return len(self._free_queue)

    @property
    def num_cached_free_blocks(self) -> int:
        return self._num_cached_free

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free_queue)

    @property
    def usage(self) -> float:
        return self.num_used_blocks / self.num_blocks

    def ref_count(self, block_id: int) -> int:
        return self._ref_counts[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take ``n`` blocks with ref_count 1, evicting cached ones as needed.

        Raises ValueError when fewer than ``n`` blocks are free: callers check ``num_free_blocks`` first, so running
        short is a bug rather than a scheduling outcome.
        """
        if n > len(self._free_queue):
            raise ValueError(f"cannot allocate {n} blocks, only {len(self._free_queue)} free")
        block_ids = []
        for _ in range(n):
            block_id, _ = self._free_queue.popitem(last=False)
            block_hash = self._hashes[block_id]
            if block_hash is not None:
                del self._hash_to_block[block_hash]
                self._hashes[block_id] = None
                self._num_cached_free -= 1
            self._ref_counts[block_id] = 1
            block_ids.append(block_id)
        return block_ids

    def touch(self, block_ids: Iterable[int]) -> None:
        """Add a reference to each block; a cached free block is revived and leaves the free queue."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                del self._free_queue[block_id]
                if self._hashes[block_id] is not None:
                    self._num_cached_free -= 1
            self._ref_counts[block_id] += 1

    def free(self, block_ids: Iterable[int]) -> None:
        """Drop a reference to each block, in order; blocks reaching 0 join the free queue in that order."""
        for block_id in block_ids:
            if self._ref_counts[block_id] == 0:
                raise ValueError(f"block {block_id} is already free")
            self._ref_counts[block_id] -= 1
            if self._ref_counts[block_id] > 0:
                continue
            self._free_queue[block_id] = None
            if self._hashes[block_id] is None:
                self._free_queue.move_to_end(block_id, last=False)
            else:
                self._num_cached_free += 1

    def get_cached_block(self, block_hash: int) -> int | None:
        return self._hash_to_block.get(block_hash)

    def cache_full_block(self, block_id: int, block_hash: int) -> bool:
        """Make a used, fully written block findable by its hash; True if it was not findable before.

        No-op if the block is already cached or another block holds the same hash (two requests computed the same
        prefix at once): the duplicate stays uncached and is recycled first once freed.
        """
        if self._ref_counts[block_id] == 0:
            raise ValueError(f"block {block_id} is free; only blocks in use can be cached")
        if not self.enable_prefix_caching or self._hashes[block_id] is not None or block_hash in self._hash_to_block:
            return False
        self._hashes[block_id] = block_hash
        self._hash_to_block[block_hash] = block_id
        return True

    def reset_prefix_cache(self) -> None:
        """Forget every hash. Blocks in use keep their contents but can no longer be shared."""
        self._hash_to_block.clear()
        self._hashes = [None] * self.num_blocks
        self._num_cached_free = 0
