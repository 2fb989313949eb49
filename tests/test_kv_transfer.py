"""Prefix KV moved between engines (prefill/decode disaggregation): exact blocks, refusals, and the receiving
engine's greedy output identical to computing the prompt itself, on a tiny random model."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tests.conftest import write_tiny_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.kv.hashing import block_hashes, request_root

PROMPT = list(range(3, 43))  # 40 tokens: 2 full blocks of 16, and 8 more
GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(write_tiny_gguf(tmp_path_factory.mktemp("kv_transfer") / "tiny.gguf"))


def engine(path: str, **options) -> LLM:
    options = {"enforce_eager": True, "num_kv_blocks": 16, "dtype": "float32"} | options
    return LLM(path, **options)


def test_imported_prefix_is_hit_and_output_is_identical(tiny) -> None:
    prefill, decode, alone = engine(tiny), engine(tiny), engine(tiny)
    prefill.generate([PROMPT], SamplingParams(max_tokens=1))
    transfer = prefill.engine.export_prefix(PROMPT)
    kv = prefill.engine.scheduler.kv_cache
    assert transfer.hashes == block_hashes(PROMPT, 16, kv.hash_root)  # both full blocks, chain order
    assert transfer.k.shape == (2, 2, 32, 16)  # layers, kv heads, 2 blocks x 16 slots, head dim
    assert torch.equal(transfer.k, prefill.engine.kv_cache.k[:, :, :32])  # blocks 0 and 1 held the prompt

    assert decode.engine.import_prefix(transfer) == 2
    assert decode.engine.import_prefix(transfer) == 0  # already cached
    pool = decode.engine.scheduler.kv_cache.pool
    assert [pool.cached_block(h) for h in transfer.hashes] == [0, 1]
    assert pool.num_free_blocks == 16  # cached, not held
    got = decode.generate([PROMPT], GREEDY)[0]
    assert decode.engine.stats().prefix_cache.hits == 32
    assert got.token_ids == alone.generate([PROMPT], GREEDY)[0].token_ids


def test_export_stops_at_the_first_uncached_block_and_respects_the_salt(tiny) -> None:
    llm = engine(tiny)
    llm.generate([PROMPT[:20]], SamplingParams(max_tokens=1))  # one full block cached
    assert llm.engine.export_prefix(PROMPT).num_blocks == 1
    assert llm.engine.export_prefix(PROMPT, cache_salt="tenant").num_blocks == 0
    kv = llm.engine.scheduler.kv_cache
    llm.engine.add_request(PROMPT, SamplingParams(max_tokens=1), cache_salt="tenant")
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
    salted = llm.engine.export_prefix(PROMPT, cache_salt="tenant")
    assert salted.hashes == block_hashes(PROMPT, 16, request_root(kv.hash_root, "tenant"))


def test_import_takes_blocks_in_chain_order_until_none_is_free(tiny) -> None:
    prefill = engine(tiny)
    long_prompt = list(range(3, 71))  # 68 tokens: 4 full blocks
    prefill.generate([long_prompt], SamplingParams(max_tokens=1))
    transfer = prefill.engine.export_prefix(long_prompt)
    assert transfer.num_blocks == 4
    decode = engine(tiny, num_kv_blocks=8)
    decode.engine.add_request(list(range(100, 190)), SamplingParams(max_tokens=5))  # 90 tokens: 6 blocks held
    decode.engine.step()
    assert decode.engine.scheduler.kv_cache.num_free_blocks == 2
    assert decode.engine.import_prefix(transfer) == 2
    pool = decode.engine.scheduler.kv_cache.pool
    assert [pool.cached_block(h) is not None for h in transfer.hashes] == [True, True, False, False]


def test_incompatible_transfers_are_refused(tiny, tmp_path) -> None:
    prefill = engine(tiny)
    prefill.generate([PROMPT], SamplingParams(max_tokens=1))
    transfer = prefill.engine.export_prefix(PROMPT)
    with pytest.raises(ValueError, match="another model"):
        engine(tiny, block_size=8).engine.import_prefix(transfer)
    wide = write_tiny_gguf(tmp_path / "wide.gguf", hidden=256)  # head size 64: one the int8 kernels take
    with pytest.raises(ValueError, match="full-precision"):
        engine(str(wide), kv_cache_dtype="int8", enforce_eager=False).engine.import_prefix(transfer)
    with pytest.raises(ValueError, match="prefix cache"):
        engine(tiny, enable_prefix_caching=False).engine.import_prefix(transfer)
    with pytest.raises(ValueError, match="shape"):
        engine(tiny).engine.import_prefix(dataclasses.replace(transfer, k=transfer.k[:, :, :16]))
