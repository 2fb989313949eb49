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
def hf_greedy(hf_model, prompts: list[list[int]], num_tokens: int) -> list[list[int]]:
    """Plain greedy loop on the reference model, EOS not special (the engine side uses ignore_eos). The prompts go as
    one left-padded batch with an attention mask and per-row positions, as transformers' own generate() does: one
    token at a time per prompt made this the slowest test in the suite."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[0] * (width - len(ids)) + ids for ids in prompts])
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = hf_model(input_ids, attention_mask=mask, position_ids=positions, use_cache=True)
    generated = []
    for _ in range(num_tokens):
        tokens = out.logits[:, -1].argmax(-1)
        generated.append(tokens)
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=mask.dtype)], 1)
        positions = positions[:, -1:] + 1
        out = hf_model(tokens[:, None], attention_mask=mask, position_ids=positions,
                       past_key_values=out.past_key_values, use_cache=True)
    return torch.stack(generated, 1).tolist()


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
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
    ours = llm_fp32.generate(prompts, params, use_tqdm=False)
    reference = hf_greedy(hf_model, [tok.encode(p) for p in prompts], 32)
    for prompt, result, expected in zip(prompts, ours, reference, strict=True):
        assert result.token_ids == expected, f"prompt {prompt!r}: {tok.decode(result.token_ids)!r} != " \
                                             f"{tok.decode(expected)!r}"
