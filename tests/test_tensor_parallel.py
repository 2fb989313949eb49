"""Tensor parallelism on a tiny random model: TP=2 (two processes, gloo) gives TP=1's greedy tokens, with
logprobs within a stated tolerance (the all-reduce sums the two halves in another order), through chunked prefill,
prefix-cache hits and a batch; and the refusals."""

from __future__ import annotations

import pytest

from tests.conftest import write_tiny_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig

LOGPROB_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    return str(write_tiny_gguf(tmp_path_factory.mktemp("tp") / "tiny.gguf", hidden=128, heads=4, kv_heads=2,
                               ff=256))


def test_tp2_matches_tp1(tiny) -> None:
    prompts = [list(range(3, 30)), list(range(40, 130)), list(range(3, 30)) + [7, 8, 9]]  # the third hits the cache
    params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=1)
    options = {"enforce_eager": True, "dtype": "float32", "num_kv_blocks": 64, "max_num_batched_tokens": 32}
    alone = LLM(tiny, **options).generate(prompts, params)
    tp = LLM(tiny, tensor_parallel_size=2, **options)
    try:
        assert tp.engine.model_config.num_heads == 2 and tp.engine.model_config.num_kv_heads == 1
        assert tp.engine.kv_cache.k.shape[1] == 1  # this rank's KV head only
        together = tp.generate(prompts, params)
        assert tp.engine.stats().prefix_cache.hits > 0
    finally:
        tp.engine.close()
    for a, b in zip(alone, together, strict=True):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert abs(x.logprob - y.logprob) <= LOGPROB_TOLERANCE


def test_tp_refusals(tiny) -> None:
    with pytest.raises(ValueError, match="weight_format"):
        EngineConfig(tensor_parallel_size=2, weight_format="int8")
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(tensor_parallel_size=2, speculative="ngram")
    with pytest.raises(ValueError, match="num_heads"):  # 4 heads over 3 processes: refused before any starts
        LLM(tiny, tensor_parallel_size=3, enforce_eager=True)
