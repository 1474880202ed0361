"""Maps requests to KV-cache blocks: block tables, prefix-cache lookups and registration of computed blocks."""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from scheduler.block_hash import extend_block_hashes
from scheduler.block_pool import BlockPool
from scheduler.request import Request


@dataclass
class PrefixCacheStats:
    """Cumulative token counts over admissions: tokens looked up in the prefix cache, and tokens found."""

    queries: int = 0
    hits: int = 0


class PrefixStore(Protocol):
    """A lower prefix-cache tier (engine/kv_offload: files on disk) keyed by chained block hash."""

    def lookup(self, block_hash: int) -> bool:
        """True if the block's KV can be loaded now: found and intact. The engine loads it before the next step."""
        ...


class KVCacheManager:
    """Per-request block tables over a BlockPool, with prefix-cache lookup and registration of computed blocks.

    With a ``prefix_store``, a lookup continues past the blocks cached in memory into the store; blocks found there
    are allocated fresh and listed by ``take_loads()`` for the engine to fill, and every block registered in memory
    is listed by ``take_registered()`` for the engine to write to the store.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        prefix_store: PrefixStore | None = None,
    ) -> None:
        self.pool = BlockPool(num_blocks, block_size, enable_prefix_caching)
        self.block_size = block_size
        self.prefix_cache_stats = PrefixCacheStats()
        self.prefix_store = prefix_store if enable_prefix_caching else None
        self._tables: dict[str, list[int]] = {}
        # Leading blocks of each table already registered in the prefix cache.
        self._num_cached_blocks: dict[str, int] = {}
        self._loads: list[tuple[int, int]] = []  # (block hash, block id) to fill from the prefix store
        self._registered: list[tuple[int, int]] = []  # (block id, block hash) newly cached in memory

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def usage(self) -> float:
        return self.pool.usage

    def num_blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_table(self, request_id: str) -> list[int]:
        """A copy of the request's block table (empty if it holds no blocks)."""
        return list(self._tables.get(request_id, ()))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's full blocks, and the number of tokens it covers.

        At most ``(num_tokens - 1) // block_size`` blocks match, so at least one token is left to compute: the step
        needs it to produce logits. The caller passes the blocks to ``allocate_slots``, which takes references.
        """
        if not self.pool.enable_prefix_caching:
            return [], 0
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        max_blocks = (request.num_tokens - 1) // self.block_size
        blocks = []
        for block_hash in request.block_hashes[:max_blocks]:
            block_id = self.pool.get_cached_block(block_hash)
            if block_id is None:
                break
            blocks.append(block_id)
        return blocks, len(blocks) * self.block_size

    def get_stored_blocks(self, request: Request, num_cached_blocks: int) -> list[int]:
        """Hashes of the request's full blocks that follow its ``num_cached_blocks`` memory hits and are in the prefix
        store, up to the first one missing (and, as in memory, never the block of its last token)."""
        if self.prefix_store is None:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        found = []
        for block_hash in request.block_hashes[num_cached_blocks:max_blocks]:
            if not self.prefix_store.lookup(block_hash):
                break
            found.append(block_hash)
        return found

    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed_blocks: list[int] | None = None,
        stored_hashes: Sequence[int] = (),
    ) -> list[int] | None:
        """Grow the request's table to hold its computed tokens, ``computed_blocks``, the blocks of ``stored_hashes``
        (loaded from the prefix store before the step) and ``num_new_tokens`` more.

        When admitting a request that holds no blocks, pass ``get_computed_blocks``' blocks, even if empty: the hits
        are referenced and the lookup is counted in ``prefix_cache_stats``. Counting here, once the admission succeeds,
        rather than at lookup keeps a request that waits at the head of the queue from being counted every step.
        Returns the newly allocated block ids, or None without changing anything if the pool is too small.
        """
        hits = computed_blocks or []
        table = self._tables.get(request.request_id, [])
        assert computed_blocks is None or not table, "prefix-cache hits only apply to a request without blocks"
        assert not stored_hashes or computed_blocks is not None, "stored blocks follow a request's memory hits"
        num_tokens = request.num_kv_tokens + (len(hits) + len(stored_hashes)) * self.block_size + num_new_tokens
        num_required = max(0, self.num_blocks_needed(num_tokens) - len(table) - len(hits))
        # Cached hits sitting in the free queue stop being allocatable once touched.
        num_revived = sum(1 for block_id in hits if self.pool.ref_count(block_id) == 0)
        if num_required + num_revived > self.pool.num_free_blocks:
            return None
        # Touch before allocating so that allocation cannot evict the hits.
        self.pool.touch(hits)
        new_blocks = self.pool.allocate(num_required)
        self._tables[request.request_id] = table
        table.extend(hits)
        table.extend(new_blocks)
        self._num_cached_blocks.setdefault(request.request_id, len(hits))
        self._loads.extend(zip(stored_hashes, new_blocks))
        if computed_blocks is not None and self.pool.enable_prefix_caching:
            self.prefix_cache_stats.queries += request.num_tokens
            self.prefix_cache_stats.hits += len(hits) * self.block_size
        return new_blocks

    def cache_full_blocks(self, request: Request) -> None:
        """Register the request's full blocks whose KV is now computed; call once the step's tokens are written."""
        if not self.pool.enable_prefix_caching:
            return
        num_full = request.num_computed_tokens // self.block_size
        num_cached = self._num_cached_blocks[request.request_id]
        if num_full <= num_cached:
            return
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size)
        table = self._tables[request.request_id]
        for i in range(num_cached, num_full):
            if self.pool.cache_full_block(table[i], request.block_hashes[i]) and self.prefix_store is not None:
                self._registered.append((table[i], request.block_hashes[i]))
        self._num_cached_blocks[request.request_id] = num_full

    def take_loads(self) -> list[tuple[int, int]]:
        """(block hash, block id) pairs allocated for prefix-store hits since the last call, to fill before the step."""
        loads, self._loads = self._loads, []
        return loads

    def take_registered(self) -> list[tuple[int, int]]:
        """(block id, block hash) pairs newly cached in memory since the last call (tracked with a prefix store)."""
        registered, self._registered = self._registered, []
        return registered

    def trim(self, request: Request, num_tokens: int) -> None:
        """Free the blocks past the first ``num_tokens`` rows of the request's table (after a KV policy compacted it).

        The kept blocks were rewritten in place, so the request must not share them: policies that compact run with
        prefix caching off.
        """
        assert not self.pool.enable_prefix_caching, "compacted blocks must not be shared"
        self._free_past(request, num_tokens)

    def free_unused(self, request: Request) -> None:
        """Free the blocks past the request's KV rows (those allocated for draft tokens that were rejected)."""
        assert self.num_blocks_needed(request.num_kv_tokens) >= self._num_cached_blocks[request.request_id]
        self._free_past(request, request.num_kv_tokens)

    def _free_past(self, request: Request, num_tokens: int) -> None:
        table = self._tables[request.request_id]
        keep = self.num_blocks_needed(num_tokens)
        self.pool.free(reversed(table[keep:]))
        del table[keep:]

    def free(self, request: Request) -> None:
        """Release the request's blocks, last block first so the tail of its prefix is evicted before the head."""
        self.pool.free(reversed(self._tables.pop(request.request_id, [])))
        self._num_cached_blocks.pop(request.request_id, None)
