"""A self-draft's catch-up copied from the target's KV cache (spec/target_kv.py): the copy against a plain indexing
reference, the caches it is lent from, and on a tiny random model: every draft step feeds one row per request, the
target's own layers as the draft are accepted every time, and greedy output stays the plain engine's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import tiny_llm, write_draft_pair

from tokenmill import SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.kv.cache import KVCache
from tokenmill.kv.quant import KVFormat
from tokenmill.kv.quantized_cache import QuantizedKVCache
from tokenmill.model.config import ModelConfig
from tokenmill.spec.target_kv import TargetKV, lendable, positions_to_slots

VOCAB = 300
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


def config(layers: int) -> ModelConfig:
    return ModelConfig(architecture="llama", num_layers=layers, hidden_size=256, intermediate_size=256, num_heads=4,
                       num_kv_heads=2, head_dim=64, vocab_size=VOCAB, max_position=1024, rope_theta=1e4,
                       rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True)


def random_cache(layers: int, dtype: torch.dtype = torch.float32) -> KVCache:
    cache = KVCache(config(layers), 8, 4, dtype, torch.device("cpu"))
    cache.k.copy_(torch.randn(cache.k.shape))
    cache.v.copy_(torch.randn(cache.v.shape))
    return cache


@pytest.mark.parametrize("layers", [(0, 1, 2), (0, 2)], ids=["every-layer", "subset"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_copy_moves_exactly_the_named_entries(layers, dtype) -> None:
    target = random_cache(3)
    draft = KVCache(config(len(layers)), 8, 4, dtype, torch.device("cpu"))
    src = positions_to_slots([5, 2, 7], 4, 1, 10)  # positions 1..9 of a request whose blocks are 5, 2, 7
    assert src == [21, 22, 23, 8, 9, 10, 11, 28, 29]
    dst = positions_to_slots([0, 3, 6], 4, 1, 10)
    TargetKV(target, layers).copy_to(draft, src, dst)
    for mine, theirs in ((draft.k, target.k), (draft.v, target.v)):
        want = torch.zeros_like(mine)
        for j, layer in enumerate(layers):
            for s, d in zip(src, dst, strict=True):
                want[j, :, d] = theirs[layer, :, s].to(dtype)
        assert torch.equal(mine, want)  # the named slots, rounded to the draft's dtype; every other slot untouched


def test_a_copy_that_does_not_fit_is_refused() -> None:
    target = random_cache(3)
    with pytest.raises(ValueError, match="outside"):
        TargetKV(target, (0, 3))
    with pytest.raises(ValueError, match="cannot take"):
        TargetKV(target, (0, 1)).copy_to(random_cache(3), [0], [0])  # a 3-layer draft for 2 layers
    with pytest.raises(ValueError, match="source slots"):
        TargetKV(target, (0, 1, 2)).copy_to(random_cache(3), [0, 1], [0])


def test_only_a_full_precision_cache_by_position_is_lent() -> None:
    cache = random_cache(2)
    assert lendable(cache, evicts=False, sharded=False) is cache
    assert lendable(cache, evicts=True, sharded=False) is None  # a streaming window or H2O: slots move
    assert lendable(cache, evicts=False, sharded=True) is None  # one rank's heads
    quantized = QuantizedKVCache(config(2), 8, 4, torch.float32, torch.device("cpu"), KVFormat(8), 4)
    assert lendable(quantized, evicts=False, sharded=False) is None
    assert EngineConfig().speculative_copy_kv


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return write_draft_pair(tmp_path_factory.mktemp("target_kv"), VOCAB)[0]


def prompts() -> list[list[int]]:
    return [[(31 * j + 11 * i) % (VOCAB - 1) + 1 for j in range(20 + 13 * i)] for i in range(6)]


@pytest.fixture(scope="module")
def reference(model) -> list[list[int]]:
    return [r.token_ids for r in tiny_llm(model).generate(prompts(), GREEDY, use_tqdm=False)]


def self_llm(model: Path, **options: object):  # noqa: ANN201 - an LLM
    """Without lookups checked by the draft, whose rows would ride along in draft steps."""
    return tiny_llm(model, **({"speculative": "self", "num_speculative_tokens": 4, "speculative_adaptive": False,
                               "speculative_lookup": False} | options))


def draft_rows(llm, monkeypatch) -> list[tuple[int, int]]:  # noqa: ANN001 - an LLM and pytest's fixture
    """Records (rows, sequences) of every draft step the engine runs."""
    runner, seen = llm.engine.speculator.proposer.runner, []
    execute = runner.execute

    def counting(plan):  # noqa: ANN001, ANN202 - the runner's own signature
        seen.append((plan.num_tokens, len(plan.seqs)))
        return execute(plan)

    monkeypatch.setattr(runner, "execute", counting)
    return seen


@pytest.mark.parametrize("options", [
    {"speculative_layers": (0, 1)},  # the target's own layers: what the draft would compute is what it copies
    {"speculative_layers": (0,)},
    {"speculative_layers": (0, 1), "speculative_weight_format": "q4", "gguf_activations": "int8"},
    {"speculative_layers": (0, 1), "max_num_batched_tokens": 24, "num_kv_blocks": 14},  # chunked, preempted
    {"speculative_layers": (0,), "speculative_tree_width": 2},  # accepted tree rows moved in the target, then copied
], ids=["whole", "early-exit", "q4-copy", "chunked-preempted", "tree"])
def test_draft_steps_feed_one_row_each_and_output_is_identical(model, reference, options, monkeypatch) -> None:
    llm = self_llm(model, **options)
    assert llm.engine.speculator.proposer.target_kv is not None
    steps = draft_rows(llm, monkeypatch)
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert steps and all(rows == seqs for rows, seqs in steps)  # no prompt or accepted token run through the draft
    stats = llm.engine.stats()
    if options.get("num_kv_blocks"):
        assert stats.num_preemptions > 0
    spec = stats.spec_decode
    if options["speculative_layers"] == (0, 1) and "speculative_weight_format" not in options:
        # Any wrong slot or stale entry in the copy would make the target's own layers disagree with it.
        assert spec.num_draft_tokens > 0 and spec.num_accepted_tokens == spec.num_draft_tokens
    else:
        assert spec.num_accepted_tokens > 0
    proposer = llm.engine.speculator.proposer
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks and not proposer._seqs


def test_without_the_copy_the_draft_computes_its_own_entries(model, reference, monkeypatch) -> None:
    llm = self_llm(model, speculative_layers=(0, 1), speculative_copy_kv=False)
    assert llm.engine.speculator.proposer.target_kv is None
    steps = draft_rows(llm, monkeypatch)
    assert [r.token_ids for r in llm.generate(prompts(), GREEDY, use_tqdm=False)] == reference
    assert any(rows > seqs for rows, seqs in steps)  # the prompts' prefill through the draft


@pytest.mark.parametrize("options", [{"kv_cache_dtype": "int8"}, {"sliding_window": 64, "attention_sinks": 4}],
                         ids=["int8-kv", "window"])
def test_a_cache_that_cannot_be_copied_by_position_is_not_lent(model, options) -> None:
    llm = self_llm(model, speculative_layers=(0,), **options)
    assert llm.engine.speculator.proposer.target_kv is None
    assert llm.engine.speculator.target_tables is None
