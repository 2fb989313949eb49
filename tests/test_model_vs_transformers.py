"""Model correctness against Hugging Face transformers loading the same GGUF (dequantized, fp32)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import CHAT_QUESTIONS, RAW_PROMPTS, chat_prompt
from tests.plans import make_plan
from tokenmill import SamplingParams
from tokenmill.attention.eager import EagerBackend
from tokenmill.kv.cache import KVCache

LOGITS_ATOL = 1e-3  # fp32 both sides; the same dequantized weights, so only summation order differs


def prefill_logits(model, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    n = len(token_ids)
    num_blocks = -(-n // block_size)
    cache = KVCache(model.cfg, num_blocks, block_size, model.dtype, torch.device("cpu"))
    # a scrambled block table so that the test also exercises non-contiguous blocks
    table = list(reversed(range(num_blocks)))
    backend = EagerBackend(model, cache)
    plan = make_plan([0], [token_ids], [table], block_size)
    hidden = backend.forward(torch.tensor(token_ids), torch.arange(n), backend.build_metadata(plan))
    return model.compute_logits(hidden)


@torch.no_grad()
def hf_greedy(hf_model, ids: list[int], num_tokens: int) -> list[int]:
    """Plain greedy loop on the reference model, EOS not special (the engine side uses ignore_eos)."""
    out = hf_model(torch.tensor([ids]), use_cache=True)
    generated: list[int] = []
    for _ in range(num_tokens):
        token = int(out.logits[0, -1].argmax())
        generated.append(token)
        out = hf_model(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
    return generated


@pytest.mark.parametrize("text", ["The capital of France is", "def add(a, b):\n    return a + b\n" * 6])
def test_prefill_logits_match_transformers(llm_fp32, hf_model, text: str) -> None:
    ids = llm_fp32.tokenizer.encode(text)
    ours = prefill_logits(llm_fp32.engine.model, ids)
    with torch.no_grad():
        ref = hf_model(torch.tensor([ids])).logits[0].float()
    assert torch.max(torch.abs(ours - ref)).item() <= LOGITS_ATOL


def test_greedy_continuations_match_transformers(llm_fp32, hf_model) -> None:
    tok = llm_fp32.tokenizer
    prompts = RAW_PROMPTS[:12] + [chat_prompt(tok, q) for q in CHAT_QUESTIONS[:10]]
    assert len(prompts) >= 20
    # 32 tokens each: the reference's token-by-token loop is the slowest part of the test suite.
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = llm_fp32.generate(prompts, params, use_tqdm=False)
    for prompt, result in zip(prompts, ours, strict=True):
        expected = hf_greedy(hf_model, tok.encode(prompt), 32)
        assert result.token_ids == expected, f"prompt {prompt!r}: {tok.decode(result.token_ids)!r} != " \
                                             f"{tok.decode(expected)!r}"
