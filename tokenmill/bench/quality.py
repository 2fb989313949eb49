"""Quality cost of lossy settings: perplexity on plain text and greedy agreement with a reference path."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tokenmill.attention.eager import EagerBackend
from tokenmill.engine import LLMEngine
from tokenmill.scheduler.plan import ScheduledSeq, StepPlan


@dataclass
class Perplexity:
    perplexity: float
    tokens: int  # predicted tokens scored
    windows: int


@torch.inference_mode()
def window_nll(engine: LLMEngine, token_ids: Sequence[int]) -> torch.Tensor:
    """Negative log-likelihood of tokens 1.. of one window given the ones before, from a single prefill forward.

    Uses the first blocks of the engine's KV cache as scratch, so the engine must be idle.
    """
    if engine.has_unfinished_requests():
        raise RuntimeError("window_nll needs an idle engine: it borrows the KV cache")
    engine.reset_prefix_cache()
    n = len(token_ids)
    block_size = engine.kv_cache.block_size
    num_blocks = -(-n // block_size)
    if num_blocks > engine.kv_cache.num_blocks:
        raise ValueError(f"a window of {n} tokens needs {num_blocks} KV blocks, the cache has "
                         f"{engine.kv_cache.num_blocks}")
    device = engine.device
    # One sequence over the cache's first blocks, run by the eager backend: the reference path for every setting.
    plan = StepPlan((ScheduledSeq("window", 0, n, n, tuple(range(num_blocks))),), tuple(token_ids), tuple(range(n)),
                    tuple(range(n)))
    backend = EagerBackend(engine.model, engine.kv_cache)
    ids = torch.tensor(list(token_ids), dtype=torch.long, device=device)
    hidden = backend.forward(ids, torch.arange(n, device=device), backend.build_metadata(plan))
    logits = engine.model.compute_logits(hidden[:-1])
    return F.cross_entropy(logits, ids[1:], reduction="none")


def perplexity(engine: LLMEngine, text: str, window: int = 512, max_windows: int = 8) -> Perplexity:
    """exp(mean NLL) over consecutive, non-overlapping windows of the text's tokens (each scored from its start)."""
    if window < 2:
        raise ValueError(f"window must be >= 2, got {window}")
    ids = engine.tokenizer.encode(text)
    windows = [ids[i : i + window] for i in range(0, len(ids) - 1, window)][:max_windows]
    windows = [w for w in windows if len(w) >= 2]
    if not windows:
        raise ValueError("text too short for one window of two tokens")
    nll = torch.cat([window_nll(engine, w) for w in windows])
    return Perplexity(math.exp(float(nll.mean())), int(nll.numel()), len(windows))


def greedy_agreement(outputs: Sequence[Sequence[int]], reference: Sequence[Sequence[int]]) -> dict[str, float]:
    """How far greedy outputs follow the reference's: the share of tokens before the first difference, and the
    share of sequences identical from start to end."""
    if len(outputs) != len(reference) or not reference:
        raise ValueError("outputs and reference must be non-empty and of equal length")
    prefix, total, identical = 0, 0, 0
    for out, ref in zip(outputs, reference, strict=True):
        same = next((i for i, (a, b) in enumerate(zip(out, ref, strict=False)) if a != b), min(len(out), len(ref)))
        prefix += same
        total += len(ref)
        identical += int(list(out) == list(ref))
    return {"prefix_agreement": prefix / total, "identical_sequences": identical / len(reference)}
