"""Self-speculation (Draft & Verify; SWIFT): a subset of the target's own layers, with its final norm and LM head,
is the draft model. No second model, no training: the draft runs on the target's weights, shared, not copied; or,
with a draft weight format of its own (`speculative_weight_format`), on the same file's weights loaded once more in
that format (a 4-bit copy reads a fraction of a float target's bytes), where every layer is a candidate too.

Which layers: `calibrate` runs the target teacher-forced over calibration text (tokenmill's own source code and
docstrings, never a benchmark prompt), once with every layer and once per candidate subset (early exits: the first
m layers; skip sets: the first and last two layers and every second or third one between), and scores each subset
by the speedup its greedy agreement with the target, α, promises at its cost c (the subset's share of the bytes a
decode step reads): the best over k of (1 + α + ... + α^k) / (1 + k·c), verification taken as free since a CPU step
reads its weights once for all of its rows. The choice is stored under the model's cache key (file name and size,
dtype, weight format) in ~/.cache/tokenmill/self_draft and reused.

KV: the draft keeps a cache of its own for its layers (the draft-model machinery of spec/draft_model.py), rather
than sharing the target's. Sharing is exact only for an early exit's layers, since after a skipped layer the draft's
later layers see other inputs than the target's; and even then the draft's guesses would write K/V at positions the
scheduler has not allocated, which the target's pool, admission and preemption would all have to count. The own
cache costs the subset's share of each prompt's prefill and of the KV memory.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from tokenmill.model.linear import Linear
from tokenmill.model.llama import LlamaModel

logger = logging.getLogger(__name__)

CACHE = Path.home() / ".cache" / "tokenmill" / "self_draft"
CALIBRATION_TOKENS = 1024


def subset_model(model: LlamaModel, layers: Sequence[int]) -> LlamaModel:
    """The target with only `layers` (in order): its modules and tensors, shared."""
    if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= model.cfg.num_layers:
        raise ValueError(f"a layer subset is increasing indices below {model.cfg.num_layers}, got {list(layers)}")
    cfg = dataclasses.replace(model.cfg, num_layers=len(layers))
    return LlamaModel(cfg, model.dtype, model.embed, [model.layers[i] for i in layers], model.final_norm,
                      model.output, max_positions=model.max_positions)


def candidates(num_layers: int, whole: bool = False) -> list[tuple[int, ...]]:
    """Early exits at a quarter to three quarters of the depth, and skip sets that keep the first and last two
    layers and every second or third one between them; `whole`: every layer too (a draft in another format)."""
    out: list[tuple[int, ...]] = [tuple(range(num_layers))] if whole else []
    for fraction in (0.25, 1 / 3, 0.5, 2 / 3, 0.75):
        m = max(1, round(num_layers * fraction))
        out.append(tuple(range(m)))
    for stride in (2, 3):
        kept = {0, 1, num_layers - 2, num_layers - 1} | set(range(2, num_layers - 2, stride))
        out.append(tuple(sorted(i for i in kept if 0 <= i < num_layers)))
    return [c for i, c in enumerate(out) if c not in out[:i] and (len(c) < num_layers or whole)]


def promised_speedup(alpha: float, cost: float, max_k: int) -> tuple[float, int]:
    """(expected tokens per step) / (step time, target step = 1), best over draft lengths 0..max_k, and that k."""
    best, best_k = 1.0, 0
    for k in range(1, max_k + 1):
        value = sum(alpha**j for j in range(k + 1)) / (1 + k * cost)
        if value > best:
            best, best_k = value, k
    return best, best_k


@dataclass(frozen=True)
class Candidate:
    layers: tuple[int, ...]
    agreement: float  # α: how often the subset's greedy token is the target's, teacher-forced
    cost: float  # c: the subset's share of a decode step's weight bytes (its layers and the LM head)
    speedup: float  # what α and c promise at the best k
    k: int


@dataclass(frozen=True)
class Calibration:
    layers: tuple[int, ...]  # the choice: the best candidate
    table: tuple[Candidate, ...]


def calibration_tokens(encode: Callable[[str], Sequence[int]], limit: int = CALIBRATION_TOKENS) -> list[int]:
    """Tokens of tokenmill's own source: code and English prose, and in no benchmark's prompts."""
    package = Path(__file__).resolve().parents[1]
    text = "\n\n".join(p.read_text() for p in sorted(package.glob("*/*.py")))
    return list(encode(text))[:limit]


def calibrate(model: LlamaModel, tokens: Sequence[int], max_k: int,
              choices: Sequence[tuple[int, ...]] | None = None, target: LlamaModel | None = None) -> Calibration:
    """Scores every candidate subset of `model`'s layers on `tokens` (teacher-forced) against `target` (default:
    `model` itself; another one when the draft's layers are the target's in another format, which makes the whole
    depth a candidate); the best is the choice, even when it promises no speedup (adaptive draft lengths then draft
    nothing, and the table says why)."""
    target = model if target is None else target
    # One causal pass over at most the positions the model has RoPE tables for.
    ids = torch.tensor(list(tokens)[: model.rope_cos.shape[0]], dtype=torch.long, device=model.final_norm.device)
    want = _argmax(target, ids)
    step_bytes = target.weight_bytes()
    head_bytes = model.lm_head.weight_bytes()
    layer_bytes = [sum(m.weight_bytes() for m in layer.modules() if isinstance(m, Linear)) for layer in model.layers]
    table = []
    for layers in choices or candidates(model.cfg.num_layers, whole=target is not model):
        alpha = float((_argmax(subset_model(model, layers), ids) == want).float().mean())
        cost = (sum(layer_bytes[i] for i in layers) + head_bytes) / step_bytes
        table.append(Candidate(tuple(layers), alpha, cost, *promised_speedup(alpha, cost, max_k)))
    if not table:  # a model too shallow to leave a layer out: it drafts for itself
        return Calibration(tuple(range(model.cfg.num_layers)), ())
    best = max(table, key=lambda c: c.speedup)
    return Calibration(best.layers, tuple(table))


def cached_calibration(model: LlamaModel, key: str, encode: Callable[[str], Sequence[int]], max_k: int,
                       cache: Path | None = None, target: LlamaModel | None = None) -> Calibration:
    """The stored calibration for `key` (the model's cache key, and the draft's format where it has its own), or a
    new one (`calibrate`'s `target`), stored (in `cache`, default CACHE)."""
    cache = CACHE if cache is None else cache
    path = cache / (hashlib.sha256(f"{key}|k={max_k}".encode()).hexdigest()[:24] + ".json")
    if path.is_file():
        try:
            stored = json.loads(path.read_text())
            return Calibration(tuple(stored["layers"]), tuple(Candidate(tuple(c.pop("layers")), **c)
                                                              for c in stored["table"]))
        except (ValueError, KeyError, TypeError):
            logger.warning("unreadable self-speculation calibration %s: calibrating again", path)
    started = time.perf_counter()
    result = calibrate(model, calibration_tokens(encode), max_k, target=target)
    cache.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.tmp")  # written whole, then renamed: readers never see half
    partial.write_text(json.dumps({"key": key, "max_k": max_k, "layers": list(result.layers),
                                   "table": [dataclasses.asdict(c) for c in result.table]}))
    partial.replace(path)
    logger.info("self-speculation calibrated in %.1fs: %s", time.perf_counter() - started, "; ".join(
        f"{len(c.layers)} layers agree {c.agreement:.2f} at cost {c.cost:.2f}: {c.speedup:.2f}x" for c in result.table))
    return result


@torch.inference_mode()
def _argmax(model: LlamaModel, ids: torch.Tensor) -> torch.Tensor:
    """The model's greedy choice after every prefix of `ids`, one causal pass without a KV cache."""
    positions = torch.arange(ids.shape[0], device=ids.device)
    hidden = model(ids, positions, _causal_attention)
    return model.lm_head.logits(hidden).argmax(-1)


def _causal_attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         enable_gqa=True)
    return out.transpose(0, 1)
