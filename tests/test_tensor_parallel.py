"""Tensor parallelism on a tiny random model: TP=2 (two processes, gloo) gives TP=1's greedy tokens, with
logprobs within a stated tolerance (the all-reduce sums the two halves in another order), through chunked prefill,
prefix-cache hits and a batch, on the eager and the fused CPU step (prepacked bf16 weights included), with the
all-reduces in shared memory or over gloo; and the refusals."""

from __future__ import annotations

import pytest

from tests.conftest import write_tiny_gguf
from tokenmill import LLM, SamplingParams
from tokenmill.attention.eager import EagerBackend
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.config import EngineConfig

LOGPROB_TOLERANCE = {"float32": 1e-4, "bfloat16": 0.02}
PROMPTS = [list(range(3, 30)), list(range(40, 130)), list(range(3, 30)) + [7, 8, 9]]  # the third hits the cache


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> str:
    # Head size 64: one the fused step is built for.
    return str(write_tiny_gguf(tmp_path_factory.mktemp("tp") / "tiny.gguf", hidden=256, heads=4, kv_heads=2,
                               ff=512))


def _generate(tiny: str, world: int, options: dict) -> list:
    llm = LLM(tiny, tensor_parallel_size=world, **options)
    try:
        if world == 2:
            assert llm.engine.model_config.num_heads == 2 and llm.engine.model_config.num_kv_heads == 1
            assert llm.engine.kv_cache.k.shape[1] == 1  # this rank's KV head only
            group = llm.engine.tensor_parallel
            assert group is not None and (group.shm is not None) == options["shared_memory_all_reduce"]
        backend = EagerBackend if options["enforce_eager"] else FusedCPUBackend
        assert type(llm.engine.runner.backend) is backend
        # bf16 weights are prepacked after the split, from each rank's own slices
        assert (llm.engine.model.layers[0].down.packed is not None) == (options["dtype"] == "bfloat16")
        outputs = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0.0, logprobs=2), use_tqdm=False)
        assert llm.engine.stats().prefix_cache.hits > 0
        return [o.outputs[0] for o in outputs]
    finally:
        llm.engine.close()


@pytest.mark.parametrize(("dtype", "enforce_eager", "shm"),
                         [("float32", True, True), ("float32", False, True), ("bfloat16", False, True),
                          ("float32", False, False)])
def test_tp2_matches_tp1(tiny, dtype, enforce_eager, shm) -> None:
    """fp32: the same tokens. bf16 (prepacked weights on the fused step): the two halves' sums round differently, so
    the tokens agree up to a near tie, where both runs' top two are the same pair within the tolerance."""
    options = {"enforce_eager": enforce_eager, "dtype": dtype, "num_kv_blocks": 64, "max_num_batched_tokens": 32,
               "shared_memory_all_reduce": shm}
    tolerance = LOGPROB_TOLERANCE[dtype]
    for a, b in zip(_generate(tiny, 1, options), _generate(tiny, 2, options), strict=True):
        agree = next((i for i, (x, y) in enumerate(zip(a.token_ids, b.token_ids, strict=True)) if x != y),
                     len(a.token_ids))
        if dtype == "float32":
            assert agree == len(a.token_ids)
        for x, y in zip(a.logprobs[:agree], b.logprobs[:agree], strict=True):
            assert abs(x.logprob - y.logprob) <= tolerance
        if agree < len(a.token_ids):
            for out in (a, b):
                (t1, first), (t2, second) = out.logprobs[agree].top[:2]
                assert {t1, t2} == {a.token_ids[agree], b.token_ids[agree]} and first - second < tolerance


def test_tp_refusals(tiny) -> None:
    with pytest.raises(ValueError, match="weight_format"):
        EngineConfig(tensor_parallel_size=2, weight_format="int8")
    with pytest.raises(ValueError, match="speculative"):
        EngineConfig(tensor_parallel_size=2, speculative="ngram")
    with pytest.raises(ValueError, match="num_heads"):  # 4 heads over 3 processes: refused before any starts
        LLM(tiny, tensor_parallel_size=3, enforce_eager=True)
