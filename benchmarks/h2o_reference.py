"""A plain-PyTorch H2O, one token at a time over a dense cache, with eviction applied as a mask, for quality only: the
engine's block-granular H2O against the token-granular forms it did not build (benchmarks/kv_memory.py, part h2o).

Granularities (every one keeps at most the same budget of entries, the recent ones by the engine's block rule):
- "block": whole blocks by scores summed over layers and heads, the engine's rule (`HeavyHitterBudget.victims`);
- "token": single tokens by the same shared scores;
- "head": the paper's, each layer's KV head evicting its own tokens by the attention its own query heads gave.
"""

from __future__ import annotations

import torch

from tokenmill.kv.h2o import HeavyHitterBudget
from tokenmill.model.llama import LlamaModel

GRANULARITIES = ("block", "token", "head")


class H2OReference:
    def __init__(self, model: LlamaModel, budget: HeavyHitterBudget, granularity: str, max_tokens: int) -> None:
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}")
        cfg = model.cfg
        self.model, self.budget, self.granularity = model, budget, granularity
        shape = (cfg.num_layers, cfg.num_kv_heads, max_tokens, cfg.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        per_head = granularity == "head"
        self.alive = torch.zeros(shape[:3] if per_head else (max_tokens,), dtype=torch.bool)
        self.scores = torch.zeros(shape[:3] if per_head else (max_tokens,), dtype=torch.float64)
        self.length = 0

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, cfg = self.length, self.model.cfg
        self.keys[layer, :, t], self.values[layer, :, t] = k[0].float(), v[0].float()
        group = cfg.num_heads // cfg.num_kv_heads
        queries = q[0].float().view(cfg.num_kv_heads, group, cfg.head_dim)
        logits = queries @ self.keys[layer, :, : t + 1].transpose(1, 2) / cfg.head_dim**0.5  # [Hkv, group, t + 1]
        alive = self.alive[layer, :, None, : t + 1] if self.granularity == "head" else self.alive[None, None, : t + 1]
        probs = logits.masked_fill(~alive, float("-inf")).softmax(-1)
        if self.granularity == "head":
            self.scores[layer, :, : t + 1] += probs.sum(1).double()
        else:
            self.scores[: t + 1] += probs.sum((0, 1)).double()
        return (probs @ self.values[layer, :, : t + 1]).reshape(1, cfg.num_heads, cfg.head_dim).to(q.dtype)

    def _evict(self) -> None:
        """Make room for one more entry within the budget, before the next token."""
        t, bs = self.length, self.budget.block_size
        if self.granularity == "block":
            blocks = [b for b in range(-(-t // bs)) if self.alive[b * bs]]
            entries = sum(int(self.alive[b * bs : (b + 1) * bs].sum()) for b in blocks)
            sums = [float(self.scores[b * bs : (b + 1) * bs].sum()) for b in blocks]
            for i in self.budget.victims(sums, entries, 1):
                self.alive[blocks[i] * bs : (blocks[i] + 1) * bs] = False
            return
        # The newest entries that the engine's rule would keep as the recent window: its full blocks and open block.
        recent = self.budget.recent_blocks * bs + t % bs
        candidates = torch.zeros_like(self.alive)
        candidates[..., : max(0, t - recent)] = True
        over = self.alive.sum(-1, keepdim=True) + 1 - self.budget.capacity  # per (layer, head) or shared
        scores = self.scores.masked_fill(~(candidates & self.alive), float("inf"))
        order = scores.sort(dim=-1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        self.alive &= ~(rank < over.clamp(min=0))

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> list[float]:
        """Log-probabilities of ids[1:], each predicted from the tokens before it as the cache holds them."""
        out = []
        for position, token in enumerate(ids[:-1]):
            self._evict()
            self.alive[..., position] = True
            hidden = self.model.forward(torch.tensor([token]), torch.tensor([position]), self._attend)
            self.length += 1
            logits = self.model.compute_logits(hidden)[0].double()
            out.append(float(logits.log_softmax(-1)[ids[position + 1]]))
        return out
