from __future__ import annotations

import pytest

from tokenmill.request import Request
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.block_pool import BlockPool
from tokenmill.scheduler.kv_cache_manager import KVCacheManager


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
    req.num_computed_tokens = 6
    assert kv.allocate_slots(req, 2)  # 8 tokens still fit in 2 blocks
    assert kv.block_table("a") == [0, 1]
    req.num_computed_tokens = 8
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
