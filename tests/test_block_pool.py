from __future__ import annotations

import pytest

from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams


def make_request(rid: str, num_prompt: int) -> Request:
    return Request(rid, list(range(num_prompt)), SamplingParams(max_tokens=8))


def test_allocate_takes_from_front_and_free_returns_to_back_in_reverse() -> None:
    pool = BlockPool(6)
    assert pool.allocate(2) == [0, 1]
    assert pool.allocate(3) == [2, 3, 4]
    assert pool.num_free_blocks == 1
    pool.free([0, 1])
    assert pool.num_free_blocks == 3
    # free list is now [5, 1, 0]: the tail block of the freed sequence comes back first
    assert pool.allocate(3) == [5, 1, 0]
    assert pool.num_free_blocks == 0


def test_allocate_too_many_raises_and_changes_nothing() -> None:
    pool = BlockPool(3)
    pool.allocate(2)
    with pytest.raises(MemoryError):
        pool.allocate(2)
    assert pool.num_free_blocks == 1
    assert pool.allocate(1) == [2]


def test_ref_counts_share_and_double_free() -> None:
    pool = BlockPool(4)
    [block] = pool.allocate(1)
    pool.share(block)
    assert pool.ref_count(block) == 2
    pool.free([block])
    assert pool.ref_count(block) == 1 and pool.num_free_blocks == 3
    pool.free([block])
    assert pool.ref_count(block) == 0 and pool.num_free_blocks == 4
    with pytest.raises(ValueError):
        pool.free([block])
    with pytest.raises(ValueError):
        pool.share(block)


def test_usage() -> None:
    pool = BlockPool(4)
    pool.allocate(1)
    assert pool.usage == pytest.approx(0.25)


def test_kv_manager_grows_table_by_block_boundaries() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 6)
    assert kv.allocate_slots(req, 6)  # 6 tokens -> 2 blocks
    assert kv.block_table("a") == [0, 1]
    kv.commit(req, 6)
    assert kv.allocate_slots(req, 2)  # 8 tokens still fit in 2 blocks
    assert kv.block_table("a") == [0, 1]
    kv.commit(req, 2)
    assert kv.allocate_slots(req, 1)  # the 9th token opens block 2
    assert kv.block_table("a") == [0, 1, 2]
    assert kv.num_free_blocks == 5
    kv.free(req)
    assert kv.block_table("a") == [] and kv.num_free_blocks == 8


def test_kv_manager_refuses_without_partial_allocation() -> None:
    kv = KVCacheManager(num_blocks=3, block_size=4)
    a, b = make_request("a", 8), make_request("b", 8)
    assert kv.allocate_slots(a, 8)
    assert not kv.allocate_slots(b, 8)  # needs 2, 1 free
    assert kv.block_table("b") == [] and kv.num_free_blocks == 1
    kv.free(b)  # freeing a request that holds nothing is harmless
    assert kv.num_free_blocks == 1



def test_kv_manager_counts_entries_and_maps_them_to_slots() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    kv.pool.allocate(1)  # block 0 taken: the request gets 1, 2, 3
    req = make_request("a", 10)
    assert kv.allocate_slots(req, 10)
    assert kv.block_table("a") == [1, 2, 3] and kv.num_entries("a") == 0
    assert kv.slots("a", 3, 6) == [7, 8, 9]
    kv.commit(req, 10)
    assert kv.num_entries("a") == 10
    with pytest.raises(ValueError):
        kv.commit(req, 3)  # 13 entries do not fit in 3 blocks
    with pytest.raises(ValueError):
        kv.slots("a", 10, 13)


def test_truncate_releases_the_blocks_past_the_cut_in_table_order() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    req = make_request("a", 14)
    assert kv.allocate_slots(req, 14)
    kv.commit(req, 14)
    assert kv.block_table("a") == [0, 1, 2, 3]
    assert kv.truncate(req, 5) == [2, 3]  # entries 0..4 live in blocks 0 and 1
    assert kv.block_table("a") == [0, 1] and kv.num_entries("a") == 5
    assert kv.pool.free_block_ids() == [4, 5, 6, 7, 3, 2]  # freed tail first, as any freed sequence
    # The next entries go on in block 1, then take the first free block.
    assert kv.allocate_slots(req, 4)
    assert kv.block_table("a") == [0, 1, 4]
    assert kv.slots("a", 5, 9) == [5, 6, 7, 16]
    kv.commit(req, 4)
    assert kv.truncate(req, 8) == [4]  # a cut on a block boundary keeps no empty block
    assert kv.truncate(req, 8) == []
    assert kv.truncate(req, 0) == [0, 1]
    assert kv.block_table("a") == [] and kv.num_free_blocks == 8
    with pytest.raises(ValueError):
        kv.truncate(req, 1)  # more entries than it holds


def test_truncate_refuses_to_cut_into_a_shared_block_and_changes_nothing() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4)
    parent, child = make_request("p", 9), make_request("c", 9)
    assert kv.allocate_slots(parent, 9)
    kv.commit(parent, 9)
    assert kv.fork(parent, child, 8) == []  # blocks 0 and 1 shared whole
    assert kv.block_table("c") == [0, 1] and kv.num_entries("c") == 8
    with pytest.raises(ValueError, match="shared"):
        kv.truncate(child, 6)
    assert kv.block_table("c") == [0, 1] and kv.pool.ref_count(1) == 2
    assert kv.truncate(child, 4) == [1]  # a whole shared block is only released by the child
    assert kv.pool.ref_count(1) == 1 and kv.block_table("p") == [0, 1, 2]


def test_truncate_drops_the_prefix_cache_entry_of_the_block_it_cuts() -> None:
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    req = make_request("a", 12)
    assert kv.allocate_slots(req, 12)
    kv.commit(req, 12)
    kv.cache_full_blocks(req)
    hashes = kv.block_hashes(req, 3)
    assert [kv.pool.cached_block(h) for h in hashes] == [0, 1, 2]
    assert kv.truncate(req, 6) == [2]
    # Block 1 will be written again from entry 6: its hash goes. Block 2 was whole and stays cached while free.
    assert [kv.pool.cached_block(h) for h in hashes] == [0, None, 2]
    kv.commit(req, 2)
    kv.cache_full_blocks(req)  # full again: registered anew
    assert kv.pool.cached_block(hashes[1]) == 1
