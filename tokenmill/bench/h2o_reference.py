"""A plain-PyTorch H2O, one token at a time over a dense cache with eviction applied as a mask: the engine's H2O
checked against it (tests/test_h2o.py), and the paper's own schedule measured beside it (benchmarks/kv_memory.py,
part h2o-granularity).

Forms (each keeps at most the same budget of entries, the recent ones by the engine's block rule):
- "per-head" and "shared": the engine's rule (`HeavyHitterBudget.evict`: a block's worth of tokens per block
  needed), each layer's KV head choosing its own or one choice for all by the summed scores;
- "head" and "token": the paper's schedule, one token dropped per token added, per head or shared.
"""

from __future__ import annotations

import torch

from tokenmill.kv.h2o import HeavyHitterBudget
from tokenmill.model.llama import LlamaModel

FORMS = ("per-head", "shared", "head", "token")


class H2OReference:
    def __init__(self, model: LlamaModel, budget: HeavyHitterBudget, form: str, max_tokens: int) -> None:
        if form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}")
        cfg, bs = model.cfg, budget.block_size
        self.model, self.budget, self.form = model, budget, form
        self.per_head = form in ("per-head", "head")
        size = -(-max_tokens // bs) * bs
        shape = (cfg.num_layers, cfg.num_kv_heads, size, cfg.head_dim)
        self.keys, self.values = torch.zeros(shape), torch.zeros(shape)
        lanes = shape[:2] if self.per_head else (1, 1)
        self.alive = torch.zeros(*lanes, size, dtype=torch.bool)
        self.scores = torch.zeros(*lanes, size, dtype=torch.float64)  # per position
        self.entries = torch.zeros(lanes[0] * lanes[1], 0, dtype=torch.long)  # the engine's forms: positions held
        self.length = 0

    def _attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        t, cfg = self.length, self.model.cfg
        self.keys[layer, :, t], self.values[layer, :, t] = k[0].float(), v[0].float()
        group = cfg.num_heads // cfg.num_kv_heads
        queries = q[0].float().view(cfg.num_kv_heads, group, cfg.head_dim)
        logits = queries @ self.keys[layer, :, : t + 1].transpose(1, 2) / cfg.head_dim**0.5  # [Hkv, group, t + 1]
        alive = self.alive[layer if self.per_head else 0, :, None, : t + 1]
        probs = logits.masked_fill(~alive, float("-inf")).softmax(-1)
        if self.per_head:
            self.scores[layer, :, : t + 1] += probs.sum(1).double()
        else:
            self.scores[0, 0, : t + 1] += probs.sum((0, 1)).double()
        return (probs @ self.values[layer, :, : t + 1]).reshape(1, cfg.num_heads, cfg.head_dim).to(q.dtype)

    def _evict(self) -> None:
        """Make room for one more entry within the budget, before the next token."""
        t, bs = self.length, self.budget.block_size
        if self.form in ("per-head", "shared"):
            lanes, held = self.entries.shape
            blocks = -(-held // bs)
            padded = torch.zeros(lanes, blocks * bs, dtype=torch.long)
            padded[:, :held] = self.entries
            scores = torch.zeros(lanes, blocks * bs, dtype=torch.float64)
            scores[:, :held] = self.scores.view(lanes, -1).gather(1, self.entries)
            tables = torch.arange(blocks).expand(lanes, -1)  # where entries sit does not matter here, only which
            eviction = self.budget.evict(tables, scores, held, 1)
            if eviction is not None:
                self.entries = padded.gather(1, eviction.source)[:, : held - len(eviction.freed) * bs]
            self.entries = torch.cat((self.entries, torch.full((lanes, 1), t)), 1)
            self.alive.view(lanes, -1).zero_().scatter_(1, self.entries, True)
            return
        # The newest entries that the engine's rule would keep as the recent window: its full blocks and open block.
        recent = self.budget.recent_blocks * bs + t % bs
        candidates = torch.zeros_like(self.alive)
        candidates[..., : max(0, t - recent)] = True
        over = self.alive.sum(-1, keepdim=True) + 1 - self.budget.capacity
        scores = self.scores.masked_fill(~(candidates & self.alive), float("inf"))
        order = scores.sort(dim=-1, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1]).expand_as(order))
        self.alive &= ~(rank < over.clamp(min=0))
        self.alive[..., t] = True

    @torch.inference_mode()
    def logprobs(self, ids: list[int]) -> list[float]:
        """Log-probabilities of ids[1:], each predicted from the tokens before it as the cache holds them."""
        out = []
        for position, token in enumerate(ids[:-1]):
            self._evict()
            hidden = self.model.forward(torch.tensor([token]), torch.tensor([position]), self._attend)
            self.length += 1
            logits = self.model.compute_logits(hidden)[0].double()
            out.append(float(logits.log_softmax(-1)[ids[position + 1]]))
        return out
