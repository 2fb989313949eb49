"""Runs a step plan: model inputs from the plan, the attention backend's forward, logits at the sample rows, the
sampler. Holds no request state beyond each seeded request's random generator."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.kv.cache import KVCache
from tokenmill.model.linear import Linear
from tokenmill.runner.checks import check_plan
from tokenmill.sampler.sampler import Sampler, SamplingRow
from tokenmill.scheduler.plan import SamplingInputs, SeqSamples, StepPlan, StepResult


class ModelRunner:
    """`greedy`: optionally a faster argmax for the sampler (the CPU kernels'); `seed` seeds the draws of requests
    without a seed of their own, so a run is reproducible as a whole. Every plan is checked against the cache's and
    the model's bounds (`max_positions`, `vocab_size`) before it runs."""

    def __init__(self, backend: AttentionBackend, lm_head: Linear, kv_cache: KVCache, device: torch.device,
                 greedy: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 max_positions: int | None = None, vocab_size: int | None = None) -> None:
        self.backend = backend
        self.max_positions = max_positions
        self.vocab_size = vocab_size
        self.lm_head = lm_head
        self.kv_cache = kv_cache
        self.device = device
        self.sampler = Sampler(greedy, torch.Generator(device=device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}  # per seeded request, advanced only by its own draws

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        for request_id in plan.finished_request_ids:
            self._generators.pop(request_id, None)
        if plan.is_empty:
            return StepResult()
        check_plan(plan, self.kv_cache.num_blocks, self.kv_cache.block_size, self.max_positions, self.vocab_size)
        self.kv_cache.copy_blocks(list(plan.block_copies))
        input_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=self.device)
        hidden = self.backend.forward(input_ids, positions, self.backend.build_metadata(plan))
        sampled = [s for s in plan.seqs if s.num_samples]
        if not sampled:
            return StepResult()
        rows = plan.sample_indices()
        if len(rows) != hidden.shape[0]:  # a decode-only step samples every row, in order
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
        logits = self.lm_head.logits(hidden)  # model dtype or fp32: the sampler widens only when it must
        sampling_rows = [self._sampling_row(s.request_id, s.sampling) for s in sampled for _ in range(s.num_samples)]
        out = self.sampler(logits, sampling_rows)
        samples, row = [], 0
        for seq in sampled:
            end = row + seq.num_samples
            samples.append(SeqSamples(seq.request_id, out.token_ids[row:end], out.logprobs[row:end]))
            row = end
        return StepResult(samples, logits.float() if plan.return_logits else None)

    def _sampling_row(self, request_id: str, inputs: SamplingInputs | None) -> SamplingRow:
        assert inputs is not None, "a plan's sampled sequence carries its sampling inputs"
        params = inputs.params
        generator = None
        if params.seed is not None:
            generator = self._generators.get(request_id)
            if generator is None:
                generator = self._generators[request_id] = torch.Generator().manual_seed(params.seed)
        return SamplingRow(params, inputs.prompt_token_ids, inputs.output_token_ids, generator,
                           inputs.blocked_token_ids)
