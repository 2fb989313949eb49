"""Runs a step plan: model inputs from the plan, the attention backend's forward, logits at the sample rows, the
sampler. Holds no request state beyond each seeded request's random generator."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.kv.cache import KVStorage
from tokenmill.model.linear import Linear
from tokenmill.runner.checks import check_plan
from tokenmill.sampler.sampler import Sampler, SamplingRow, TokenLogprobs, has_penalties, score_tokens
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import SamplingInputs, ScheduledSeq, SeqSamples, StepPlan, StepResult
from tokenmill.spec.tree import path_tokens
from tokenmill.spec.verifier import verify
from tokenmill.structured.masks import TokenMasks

_SCORE_ROWS = 128  # prompt rows scored per logits matrix


class ModelRunner:
    """`greedy`: optionally a faster argmax for the sampler (the CPU kernels'); `seed` seeds the draws of requests
    without a seed of their own, so a run is reproducible as a whole. Every plan is checked against the cache's and
    the model's bounds (`max_positions`, `vocab_size`) before it runs."""

    def __init__(self, backend: AttentionBackend, lm_head: Linear, kv_cache: KVStorage, device: torch.device,
                 greedy: Callable[[torch.Tensor], torch.Tensor] | None = None, seed: int = 0,
                 max_positions: int | None = None, vocab_size: int | None = None,
                 rotation: Callable[[int], tuple[torch.Tensor, torch.Tensor]] | None = None) -> None:
        self.backend = backend
        self.rotation = rotation  # RoPE (cos, signed sin) moving keys by an offset: plans with key shifts need it
        self.max_positions = max_positions
        self.vocab_size = vocab_size
        self.lm_head = lm_head
        self.kv_cache = kv_cache
        self.device = device
        self.sampler = Sampler(greedy, torch.Generator(device=device).manual_seed(seed))
        self._generators: dict[str, torch.Generator] = {}  # per seeded request, advanced only by its own draws

    @torch.inference_mode()
    def execute(self, plan: StepPlan, token_masks: Future[TokenMasks] | None = None) -> StepResult:
        """Runs `plan`; `token_masks`, being filled while the model runs, restrict grammar-bound rows' tokens."""
        ran = self.forward(plan)
        if ran is None:
            return StepResult()
        hidden, metadata = ran
        prompt_logprobs = self._score_prompts(plan, hidden)
        mass = self._entry_attention(plan, metadata)
        sampled = [s for s in plan.seqs if s.num_samples]
        if not sampled:
            return StepResult(prompt_logprobs=prompt_logprobs, attention_mass=mass)
        rows = plan.sample_indices()
        if len(rows) != hidden.shape[0]:  # a decode-only step samples every row, in order
            hidden = hidden[torch.tensor(rows, dtype=torch.long, device=self.device)]
        logits = self.lm_head.logits(hidden)  # model dtype or fp32: the sampler widens only when it must
        if token_masks is not None:
            token_masks.result().apply(logits)
        rows_of = [[self._sampling_row(s, i) for i in range(s.num_samples)] for s in sampled]
        samples = self._sample(logits, sampled, rows_of, plan.slot_mapping)
        return StepResult(samples, logits.float() if plan.return_logits else None, prompt_logprobs, mass)

    @torch.inference_mode()
    def forward(self, plan: StepPlan) -> tuple[torch.Tensor, object] | None:
        """The step up to the model's last hidden states (and the backend's metadata): the cache's bookkeeping and
        the forward pass; None for an empty plan. All a tensor-parallel worker runs (parallel/tensor.py)."""
        for request_id in plan.finished_request_ids:
            self._generators.pop(request_id, None)
        self.kv_cache.release((*plan.finished_request_ids, *plan.preempted_request_ids))
        if plan.is_empty:
            return None
        check_plan(plan, self.kv_cache.num_blocks, self.kv_cache.block_size, self.max_positions, self.vocab_size)
        self.kv_cache.copy_blocks(list(plan.block_copies))
        if plan.lane_copies is not None:
            self.kv_cache.move_rows(plan.lane_copies)
        for shift in plan.kv_shifts:
            assert self.rotation is not None, "a plan with key shifts needs a runner built with the RoPE rotation"
            self.kv_cache.rotate_keys(shift.blocks, *self.rotation(-shift.delta))
        input_ids = torch.tensor(plan.token_ids, dtype=torch.long, device=self.device)
        positions = torch.tensor(plan.positions, dtype=torch.long, device=self.device)
        metadata = self.backend.build_metadata(plan)
        return self.backend.forward(input_ids, positions, metadata), metadata

    def _entry_attention(self, plan: StepPlan, metadata: object) -> dict[str, torch.Tensor]:
        """The attention each sequence's entries received this step per lane, when the plan collects it (H2O)."""
        if not plan.collect_attention:
            return {}
        mass = self.backend.attention_mass(metadata)
        if mass is None:
            raise RuntimeError(f"{type(self.backend).__name__} does not report attention, which the plan asks for")
        out = {}
        for i, seq in enumerate(plan.seqs):
            out[seq.request_id] = mass[i, :, : seq.context_len].double()
        return out

    def _score_prompts(self, plan: StepPlan, hidden: torch.Tensor) -> dict[str, list[TokenLogprobs]]:
        """Prompt logprobs of the rows the plan marks, from raw logits; a few rows at a time, since a chunk's
        logits over the whole vocabulary would be large."""
        out: dict[str, list[TokenLogprobs]] = {}
        for seq in plan.seqs:
            rows = seq.prompt_logprobs
            if rows is None:
                continue
            scored = out[seq.request_id] = []
            first = seq.query_start + rows.offset
            for i in range(0, len(rows.targets), _SCORE_ROWS):
                targets = rows.targets[i : i + _SCORE_ROWS]
                logits = self.lm_head.logits(hidden[first + i : first + i + len(targets)])
                scored.extend(score_tokens(logits, targets, [rows.num_top] * len(targets)))
        return out

    def _sample(self, logits: torch.Tensor, sampled: list[ScheduledSeq], rows_of: list[list[SamplingRow]],
                slots: Sequence[int]) -> list[SeqSamples]:
        """One token per plain sequence; the verifier's accepted drafts and next token per drafted one."""
        starts = list(itertools.accumulate((s.num_samples for s in sampled), initial=0))
        plain = [i for i, s in enumerate(sampled) if not s.draft_token_ids]
        drafted = [i for i, s in enumerate(sampled) if s.draft_token_ids]
        out: dict[int, SeqSamples] = {}
        for group, verifying in ((plain, False), (drafted, True)):
            if not group:
                continue
            index = [r for i in group for r in range(starts[i], starts[i + 1])]
            group_logits = logits if len(index) == logits.shape[0] else logits[torch.tensor(index,
                                                                                             device=logits.device)]
            rows = [row for i in group for row in rows_of[i]]
            if verifying:
                verified = verify(self.sampler, group_logits, rows, [sampled[i].draft_token_ids for i in group],
                                  [sampled[i].draft_parents for i in group])
                for i, v in zip(group, verified, strict=True):
                    out[i] = SeqSamples(sampled[i].request_id, v.token_ids, v.logprobs, v.choices)
                    self._keep_path(sampled[i], v.path, slots)
            else:
                picked = self.sampler(group_logits, rows)
                for j, i in enumerate(group):
                    out[i] = SeqSamples(sampled[i].request_id, picked.token_ids[j : j + 1], picked.logprobs[j : j + 1])
        return [out[i] for i in range(len(sampled))]

    def _keep_path(self, seq: ScheduledSeq, path: list[int], slots: Sequence[int]) -> None:
        """A token tree's accepted rows `path` (sample rows, in order): their K/V moves to the entries right after
        the last real token's, where the scheduler keeps them (it rolls back the rest); a chain's already are."""
        first = seq.query_start + seq.num_tokens - seq.num_samples
        moves = [(first + row, first + depth) for depth, row in enumerate(path, 1) if row != depth]
        if moves:
            self.kv_cache.move_tree_rows(seq.request_id, [(slots[src], slots[dst]) for src, dst in moves])

    def _sampling_row(self, seq: ScheduledSeq, i: int) -> SamplingRow:
        """Sample row i of the sequence: after the drafts on its way (a chain's first i), which join the history
        penalties read."""
        inputs = seq.sampling
        assert inputs is not None, "a plan's sampled sequence carries its sampling inputs"
        params = inputs.params
        generator = None
        if params.seed is not None:
            generator = self._generators.get(seq.request_id)
            if generator is None:
                generator = self._generators[seq.request_id] = torch.Generator().manual_seed(params.seed)
        output = inputs.output_token_ids
        way = path_tokens(seq.draft_parents, seq.draft_token_ids, i)
        if i and output:  # the history is only filled in when a penalty reads it
            output = (*output, *way)
        elif i and has_penalties(params):
            output = tuple(way)
        blocked = inputs.blocked_token_ids if len(way) < inputs.blocked_rows else ()
        return SamplingRow(params, inputs.prompt_token_ids, output, generator, blocked)

    def time_rows(self, num_rows: int, rows_per_seq: int = 8, context: int = 256, max_seqs: int | None = None) -> float:
        """Seconds one step of `num_rows` rows takes: sequences of `rows_per_seq` rows verified greedily over
        `context` KV entries each (as far as the cache holds them), the shape of a speculative decode batch; more
        rows per sequence where `max_seqs` (what the engine runs at once, and a quantized cache has open blocks
        for) would be exceeded. Writes K/V into block 0 and up, so it runs before any request does."""
        if max_seqs is not None:
            rows_per_seq = max(rows_per_seq, -(-num_rows // max_seqs))
        bs = self.kv_cache.block_size
        context = max(min(context, self.kv_cache.num_blocks * bs, self.max_positions or context), rows_per_seq)
        seqs, start = [], 0
        while start < num_rows:
            rows = min(rows_per_seq, num_rows - start)
            ctx = max(context, rows)
            seqs.append(ScheduledSeq(f"profile-{start}", start, rows, ctx, tuple(range(-(-ctx // bs))), rows,
                                     SamplingInputs(SamplingParams(temperature=0.0)), (0,) * (rows - 1)))
            start += rows
        slots = tuple(s for seq in seqs for s in range(seq.context_len - seq.num_tokens, seq.context_len))
        positions = slots
        plan = StepPlan(tuple(seqs), (0,) * num_rows, positions, slots)
        started = time.perf_counter()
        self.execute(plan)
        elapsed = time.perf_counter() - started
        self.kv_cache.release(seq.request_id for seq in seqs)  # these requests never finish
        return elapsed
