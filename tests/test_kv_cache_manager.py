import subprocess
import sys

import pytest

from scheduler.block_hash import extend_block_hashes, hash_block_tokens
from scheduler.kv_cache_manager import KVCacheManager
from scheduler.request import Request

BLOCK_SIZE = 4


def make_request(request_id: str, prompt: list[int]) -> Request:
    return Request(request_id, prompt, max_tokens=8)


def compute(manager: KVCacheManager, request: Request, num_tokens: int | None = None) -> list[int]:
    """Admit the request with its prefix-cache hits, compute ``num_tokens`` (default: all) and register full blocks."""
    blocks, num_cached = manager.get_computed_blocks(request)
    num_new = (request.num_tokens if num_tokens is None else num_tokens) - num_cached
    assert manager.allocate_slots(request, num_new, blocks) is not None
    request.num_computed_tokens = num_cached + num_new
    manager.cache_full_blocks(request)
    return blocks


def test_hash_is_chained_and_stable_across_processes():
    root = hash_block_tokens(None, [1, 2, 3, 4])
    assert root == hash_block_tokens(None, (1, 2, 3, 4))
    assert hash_block_tokens(root, [5, 6, 7, 8]) != hash_block_tokens(None, [5, 6, 7, 8])
    assert hash_block_tokens(root, [5, 6, 7, 8]) != hash_block_tokens(root + 1, [5, 6, 7, 8])
    assert 0 <= root < 2**64
    code = "from scheduler.block_hash import hash_block_tokens; print(hash_block_tokens(None, [1, 2, 3, 4]))"
    for seed in ("1", "2"):
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={"PYTHONHASHSEED": seed}
        )
        assert int(out.stdout) == root


def test_extend_block_hashes_is_incremental():
    tokens = list(range(11))
    expected = [hash_block_tokens(None, tokens[0:4])]
    expected.append(hash_block_tokens(expected[0], tokens[4:8]))
    hashes: list[int] = []
    extend_block_hashes(hashes, tokens[:3], BLOCK_SIZE)
    assert hashes == []
    extend_block_hashes(hashes, tokens[:6], BLOCK_SIZE)
    assert hashes == expected[:1]
    extend_block_hashes(hashes, tokens, BLOCK_SIZE)
    assert hashes == expected


@pytest.mark.parametrize(("num_blocks", "block_size"), [(0, 4), (4, 0), (4, "16")])
def test_rejects_bad_config(num_blocks, block_size):
    with pytest.raises(ValueError):
        KVCacheManager(num_blocks, block_size)


def test_allocate_slots_grows_the_table_block_by_block():
    manager = KVCacheManager(8, BLOCK_SIZE)
    request = make_request("a", list(range(5)))
    first = manager.allocate_slots(request, 5)
    assert first is not None and len(first) == 2
    request.num_computed_tokens = 5
    assert manager.allocate_slots(request, 3) == []
    request.num_computed_tokens = 8
    new = manager.allocate_slots(request, 1)
    assert new is not None and len(new) == 1
    assert manager.block_table("a") == first + new
    assert manager.num_free_blocks == 5 and manager.usage == 3 / 8


def test_shared_prefix_hits_full_blocks_only():
    manager = KVCacheManager(16, BLOCK_SIZE)
    a = make_request("a", list(range(10)))
    compute(manager, a)
    b = make_request("b", [*range(8), 99, 98, 97])
    blocks, num_cached = manager.get_computed_blocks(b)
    assert blocks == manager.block_table("a")[:2] and num_cached == 8
    assert manager.allocate_slots(b, 3, blocks) is not None
    assert (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits) == (10 + 11, 8)
    assert manager.block_table("b")[:2] == blocks
    assert [manager.pool.ref_count(x) for x in blocks] == [2, 2]


def test_no_hit_after_an_earlier_block_diverges():
    manager = KVCacheManager(16, BLOCK_SIZE)
    compute(manager, make_request("a", list(range(12))))
    # Block 1 matches "a" token for token, but its chain starts from a different block 0.
    b = make_request("b", [50, 1, 2, 3, *range(4, 12)])
    assert manager.get_computed_blocks(b) == ([], 0)


def test_hit_leaves_at_least_one_token_to_compute():
    manager = KVCacheManager(16, BLOCK_SIZE)
    compute(manager, make_request("a", list(range(8))))
    blocks, num_cached = manager.get_computed_blocks(make_request("b", list(range(8))))
    assert num_cached == 4 and blocks == manager.block_table("a")[:1]
    _, num_cached = manager.get_computed_blocks(make_request("c", list(range(9))))
    assert num_cached == 8


def test_only_computed_blocks_are_cached():
    manager = KVCacheManager(16, BLOCK_SIZE)
    a = make_request("a", list(range(12)))
    assert manager.allocate_slots(a, 12) is not None
    a.num_computed_tokens = 6
    manager.cache_full_blocks(a)
    assert manager.get_computed_blocks(make_request("b", list(range(12))))[1] == 4
    a.num_computed_tokens = 12
    manager.cache_full_blocks(a)
    assert manager.get_computed_blocks(make_request("c", list(range(12))))[1] == 8


def test_failed_allocation_changes_nothing():
    manager = KVCacheManager(4, BLOCK_SIZE)
    compute(manager, make_request("a", list(range(8))))
    manager.free(make_request("a", []))
    assert manager.pool.num_cached_free_blocks == 2
    b = make_request("b", list(range(20)))
    blocks, num_cached = manager.get_computed_blocks(b)
    assert num_cached == 8
    # 2 hits + 3 new blocks > 4: the revived hits count against the free blocks.
    assert manager.allocate_slots(b, 12, blocks) is None
    assert manager.block_table("b") == []
    assert manager.pool.num_cached_free_blocks == 2 and manager.num_free_blocks == 4
    assert manager.prefix_cache_stats.hits == 0, "only successful admissions count"
    assert manager.allocate_slots(b, 8, blocks) is not None
    assert manager.num_free_blocks == 0
    assert (manager.prefix_cache_stats.queries, manager.prefix_cache_stats.hits) == (8 + 20, 8)


def test_free_evicts_the_tail_of_a_prefix_first():
    manager = KVCacheManager(3, BLOCK_SIZE)
    a = make_request("a", list(range(12)))
    compute(manager, a)
    table = manager.block_table("a")
    manager.free(a)
    assert manager.block_table("a") == [] and manager.num_free_blocks == 3
    assert manager.pool.allocate(1) == [table[2]]
    assert manager.get_computed_blocks(make_request("b", list(range(12))))[1] == 8


def test_prefix_caching_disabled_never_hits():
    manager = KVCacheManager(8, BLOCK_SIZE, enable_prefix_caching=False)
    compute(manager, make_request("a", list(range(9))))
    assert manager.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert manager.prefix_cache_stats.queries == 0
