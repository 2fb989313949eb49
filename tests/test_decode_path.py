"""The decode-only step path (`LlamaModel.decode` + `KVCache.write`) against the general flat-batch forward."""

from __future__ import annotations

import pytest
import torch

from tokenmill.model.attention import AttentionMetadata, build_group
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.llama import KVCache
from tokenmill.model.loader import load_model

BLOCK = 16


@pytest.fixture(scope="module")
def model(model_path):
    return load_model(GGUFFile(model_path), torch.float32, torch.device("cpu"))


def prefill(model, cache: KVCache, prompts: list[list[int]], tables: list[list[int]]) -> None:
    """Fill each sequence's cache with one general forward per prompt."""
    for ids, table in zip(prompts, tables, strict=True):
        n = len(ids)
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(n)])
        meta = AttentionMetadata(slots, [build_group(0, [n], [n], [table], BLOCK, torch.device("cpu"))])
        model(torch.tensor(ids), torch.arange(n), meta, cache)


@torch.inference_mode()
def test_decode_step_matches_general_forward_and_writes_the_same_cache(model) -> None:
    cfg = model.cfg
    prompts = [[1, 504, 3458, 314] * 5, [9906, 28, 905], list(range(200, 233))]  # 20, 3 and 33 tokens
    tables = [[3, 7], [0], [1, 4, 9]]
    new_tokens = [42, 1000, 7]
    general_cache = KVCache(cfg, 12, BLOCK, torch.float32, torch.device("cpu"))
    prefill(model, general_cache, prompts, tables)
    decode_cache = KVCache(cfg, 12, BLOCK, torch.float32, torch.device("cpu"))
    decode_cache.k.copy_(general_cache.k)
    decode_cache.v.copy_(general_cache.v)

    positions = [len(p) for p in prompts]
    slots = torch.tensor([t[p // BLOCK] * BLOCK + p % BLOCK for t, p in zip(tables, positions, strict=True)])
    group = build_group(0, [1, 1, 1], [p + 1 for p in positions], tables, BLOCK, torch.device("cpu"))
    general = model(torch.tensor(new_tokens), torch.tensor(positions), AttentionMetadata(slots, [group]),
                    general_cache)

    hidden, keys, values = model.decode(torch.tensor(new_tokens), torch.tensor(positions), group.block_tables,
                                        group.mask, decode_cache)
    decode_cache.write(slots, keys, values)
    # Same arithmetic in the same order: identical in fp32.
    assert torch.equal(hidden, general)
    assert torch.equal(decode_cache.k, general_cache.k)
    assert torch.equal(decode_cache.v, general_cache.v)


@torch.inference_mode()
def test_decode_step_leaves_the_cache_untouched(model) -> None:
    cache = KVCache(model.cfg, 4, BLOCK, torch.float32, torch.device("cpu"))
    prefill(model, cache, [[1, 2, 3, 4, 5]], [[2]])
    before = cache.k.clone(), cache.v.clone()
    group = build_group(0, [1], [6], [[2]], BLOCK, torch.device("cpu"))
    model.decode(torch.tensor([6]), torch.tensor([5]), group.block_tables, group.mask, cache)
    assert torch.equal(cache.k, before[0]) and torch.equal(cache.v, before[1])
