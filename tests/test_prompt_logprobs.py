"""prompt_logprobs (vLLM's meaning) on a tiny random model: every prompt token after the first scored from the
raw logits, equal to one plain forward over the whole prompt whatever the chunking, prefix cache or output mode."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from conftest import write_tiny_gguf

from tokenmill import LLM, SamplingParams
from tokenmill.bench.quality import window_nll
from tokenmill.request import Request
from tokenmill.scheduler.scheduler import _prompt_logprob_rows

VOCAB = 300
PROMPT = [(13 * j + 5) % (VOCAB - 1) + 1 for j in range(83)]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("plp") / "tiny.gguf"
    return write_tiny_gguf(path, hidden=256, heads=4, kv_heads=2, ff=256, vocab=VOCAB, context=512,
                           metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


@pytest.fixture(scope="module")
def llm(tiny_model) -> LLM:
    # Chunks of 16 tokens: the prompt is scored over six steps, each reading the KV of the earlier ones.
    return LLM(str(tiny_model), dtype="float32", device="cpu", num_kv_blocks=64, block_size=16,
               max_num_batched_tokens=16)


@pytest.fixture(scope="module")
def reference(llm) -> list[float]:
    """Log-likelihoods from one eager forward over the whole prompt (the perplexity tool's path)."""
    return (-window_nll(llm.engine, PROMPT)).tolist()


def test_chunked_prompt_scores_equal_one_forward(llm, reference) -> None:
    [result] = llm.generate(PROMPT, SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    scored = result.prompt_logprobs
    assert scored is not None and len(scored) == len(PROMPT) and scored[0] is None
    assert [e.token_id for e in scored[1:]] == PROMPT[1:]
    got = [e.logprob for e in scored[1:]]
    assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) < 1e-4
    for entry in scored[1:]:
        assert len(entry.top) == 3 and [lp for _, lp in entry.top] == sorted((lp for _, lp in entry.top), reverse=True)
        assert entry.top[0][1] >= entry.logprob - 1e-6
        if entry.token_id in dict(entry.top):  # the target's own entry in the list agrees with its logprob
            assert math.isclose(dict(entry.top)[entry.token_id], entry.logprob, abs_tol=1e-6)


def test_prefix_cache_hits_are_not_used_for_scored_prompts(llm, reference) -> None:
    llm.generate(PROMPT, SamplingParams(max_tokens=1))  # leaves the prompt's blocks in the prefix cache
    rid = llm.engine.add_request(PROMPT, SamplingParams(max_tokens=1, prompt_logprobs=0))
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    [final] = [o for o in outputs if o.request_id == rid]
    assert final.num_cached_tokens == 0
    assert final.prompt_logprobs is not None
    got = [e.logprob for e in final.prompt_logprobs[1:]]
    assert max(abs(a - b) for a, b in zip(got, reference, strict=True)) < 1e-4
    assert all(e.top == [] for e in final.prompt_logprobs[1:])


def test_delta_outputs_carry_prompt_logprobs_once_and_siblings_each_score(llm, reference) -> None:
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True, prompt_logprobs=0, output_kind="delta")
    rid = llm.engine.add_request(PROMPT, params)
    outputs = []
    while llm.engine.has_unfinished_requests():
        outputs += llm.engine.step()
    carried = [o.prompt_logprobs for o in outputs if o.request_id == rid]
    assert len(carried) == 4 and carried[0] is not None and carried[1:] == [None] * 3
    [result] = llm.generate(PROMPT, SamplingParams(n=2, max_tokens=2, prompt_logprobs=0, seed=1))
    assert result.prompt_logprobs is not None
    assert max(abs(e.logprob - r) for e, r in zip(result.prompt_logprobs[1:], reference, strict=True)) < 1e-4
    assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks


def test_rows_skip_what_an_earlier_pass_scored() -> None:
    """After a preemption the prompt is computed again, but only positions not scored yet are scored."""
    request = Request("r", list(range(1, 11)), SamplingParams(prompt_logprobs=2))
    rows = _prompt_logprob_rows(request, 0, 4)
    assert rows is not None and (rows.offset, rows.targets, rows.num_top) == (0, (2, 3, 4, 5), 2)
    request.num_prompt_logprobs = 6  # positions 0..5 scored before the preemption
    assert _prompt_logprob_rows(request, 0, 4) is None
    rows = _prompt_logprob_rows(request, 4, 10)  # the chunk reaching the last prompt token: it predicts nothing
    assert rows is not None and (rows.offset, rows.targets) == (2, (8, 9, 10))
    assert _prompt_logprob_rows(Request("p", [1, 2, 3], SamplingParams()), 0, 3) is None


def test_bad_prompt_logprobs_are_refused() -> None:
    for bad in (-1, 21, 1.5, True):
        with pytest.raises(ValueError, match="prompt_logprobs"):
            SamplingParams(prompt_logprobs=bad)  # type: ignore[arg-type]
