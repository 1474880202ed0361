import random

import pytest

from scheduler.block_pool import BlockPool


def assert_invariants(pool: BlockPool) -> None:
    free = list(pool._free_queue)
    assert len(free) == len(set(free)) == pool.num_free_blocks
    assert all(pool.ref_count(b) == 0 for b in free), "a free block is referenced"
    assert sum(pool.ref_count(b) > 0 for b in range(pool.num_blocks)) == pool.num_used_blocks
    cached_free = [b for b in free if pool._hashes[b] is not None]
    assert len(cached_free) == pool.num_cached_free_blocks
    uncached_free = pool.num_free_blocks - pool.num_cached_free_blocks
    assert uncached_free + pool.num_cached_free_blocks + pool.num_used_blocks == pool.num_blocks
    assert {b: h for h, b in pool._hash_to_block.items()} == {b: h for b, h in enumerate(pool._hashes) if h is not None}


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 16), (-1, 16), (4, 0), (4, -2), (4, 1.5), (2.0, 4)])
def test_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError, match=r"num_blocks|block_size"):
        BlockPool(num_blocks, block_size)


def test_allocate_and_free_track_ref_counts():
    pool = BlockPool(4, 16)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3
    assert [pool.ref_count(b) for b in blocks] == [1, 1, 1]
    assert (pool.num_free_blocks, pool.num_used_blocks, pool.usage) == (1, 3, 0.75)
    pool.touch(blocks[:1])
    pool.free(blocks)
    assert pool.ref_count(blocks[0]) == 1 and pool.num_used_blocks == 1
    pool.free(blocks[:1])
    assert pool.num_free_blocks == 4 and pool.usage == 0.0
    assert_invariants(pool)


def test_over_allocation_raises_and_changes_nothing():
    pool = BlockPool(2, 16)
    pool.allocate(1)
    with pytest.raises(ValueError, match="cannot allocate 2 blocks, only 1 free"):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert_invariants(pool)


def test_double_free_raises():
    pool = BlockPool(2, 16)
    (block,) = pool.allocate(1)
    pool.free([block])
    with pytest.raises(ValueError, match="already free"):
        pool.free([block])


def test_cached_block_survives_free_and_is_revived_by_touch():
    pool = BlockPool(3, 4)
    block, other = pool.allocate(2)
    pool.cache_full_block(block, 1234)
    pool.free([block, other])
    assert pool.get_cached_block(1234) == block
    assert (pool.num_free_blocks, pool.num_cached_free_blocks) == (3, 1)
    pool.touch([block])
    assert pool.ref_count(block) == 1
    assert (pool.num_free_blocks, pool.num_cached_free_blocks) == (2, 0)
    # A revived block is not handed out again while in use.
    assert block not in pool.allocate(2)
    assert_invariants(pool)


def test_touch_shares_a_block_in_use():
    pool = BlockPool(2, 4)
    (block,) = pool.allocate(1)
    pool.cache_full_block(block, 7)
    pool.touch([block])
    assert pool.ref_count(block) == 2
    pool.free([block])
    assert pool.get_cached_block(7) == block and pool.num_used_blocks == 1
    assert_invariants(pool)


def test_eviction_takes_uncached_blocks_first_then_least_recently_freed():
    pool = BlockPool(5, 4)
    blocks = pool.allocate(5)
    for i, block in enumerate(blocks[:4]):
        pool.cache_full_block(block, 100 + i)
    pool.free([blocks[2], blocks[0]])
    pool.free([blocks[4], blocks[3], blocks[1]])
    # blocks[4] is uncached; cached blocks go in the order they were freed.
    assert pool.allocate(1) == [blocks[4]]
    assert pool.allocate(1) == [blocks[2]]
    assert pool.get_cached_block(102) is None, "eviction drops the hash"
    assert pool.allocate(3) == [blocks[0], blocks[3], blocks[1]]
    assert pool.num_cached_free_blocks == 0
    assert_invariants(pool)


def test_duplicate_hash_keeps_the_first_block():
    pool = BlockPool(2, 4)
    first, second = pool.allocate(2)
    pool.cache_full_block(first, 5)
    pool.cache_full_block(second, 5)
    assert pool.get_cached_block(5) == first
    pool.free([first, second])
    assert pool.allocate(1) == [second], "the uncached duplicate is recycled first"
    assert_invariants(pool)


def test_only_blocks_in_use_can_be_cached():
    pool = BlockPool(1, 4)
    with pytest.raises(ValueError, match="is free"):
        pool.cache_full_block(0, 1)


def test_prefix_caching_disabled_caches_nothing():
    pool = BlockPool(2, 4, enable_prefix_caching=False)
    (block,) = pool.allocate(1)
    pool.cache_full_block(block, 9)
    assert pool.get_cached_block(9) is None
    pool.free([block])
    assert pool.num_cached_free_blocks == 0


def test_reset_prefix_cache_forgets_every_hash():
    pool = BlockPool(3, 4)
    in_use, freed = pool.allocate(2)
    pool.cache_full_block(in_use, 1)
    pool.cache_full_block(freed, 2)
    pool.free([freed])
    pool.reset_prefix_cache()
    assert pool.get_cached_block(1) is None and pool.get_cached_block(2) is None
    assert pool.num_cached_free_blocks == 0 and pool.ref_count(in_use) == 1
    pool.free([in_use])
    assert pool.num_free_blocks == 3
    assert_invariants(pool)


def test_random_operations_keep_invariants():
    rng = random.Random(0)
    pool = BlockPool(16, 4)
    owned: list[int] = []  # one entry per reference held
    for step in range(2000):
        op = rng.random()
        if op < 0.3:
            n = rng.randint(0, pool.num_free_blocks)
            owned += pool.allocate(n)
        elif op < 0.5 and owned:
            block = rng.choice(owned)
            pool.cache_full_block(block, rng.randrange(8))
        elif op < 0.7:
            cached = [b for h in range(8) if (b := pool.get_cached_block(h)) is not None]
            if cached:
                block = rng.choice(cached)
                pool.touch([block])
                owned.append(block)
        elif owned:
            block = owned.pop(rng.randrange(len(owned)))
            pool.free([block])
        for block in range(pool.num_blocks):
            assert pool.ref_count(block) == owned.count(block), step
        assert_invariants(pool)
