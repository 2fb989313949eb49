"""Quality measures used for lossy formats: greedy agreement and perplexity (against transformers in fp32)."""

from __future__ import annotations

import math

import pytest
import torch

from tokenmill.bench.quality import greedy_agreement, perplexity, window_nll


def test_greedy_agreement_counts_tokens_before_the_first_difference() -> None:
    got = greedy_agreement([[1, 2, 3, 4], [5, 6, 7, 8], [9, 9]], [[1, 2, 0, 4], [5, 6, 7, 8], [1, 9]])
    assert got == {"prefix_agreement": (2 + 4 + 0) / 10, "identical_sequences": 1 / 3}
    with pytest.raises(ValueError):
        greedy_agreement([[1]], [])


def test_window_nll_and_perplexity_match_transformers(llm_fp32, hf_model) -> None:
    engine = llm_fp32.engine
    text = "The quick brown fox jumps over the lazy dog. " * 6
    ids = engine.tokenizer.encode(text)[:48]
    ours = window_nll(engine, ids)
    with torch.inference_mode():
        logits = hf_model(torch.tensor([ids])).logits[0, :-1].float()
    theirs = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none")
    assert torch.allclose(ours, theirs, atol=1e-3, rtol=0)
    ppl = perplexity(engine, text, window=48, max_windows=1)
    assert ppl.tokens == 47 and ppl.windows == 1
    assert math.isclose(ppl.perplexity, math.exp(float(theirs.mean())), rel_tol=1e-3)
