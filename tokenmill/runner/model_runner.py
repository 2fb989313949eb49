"""Turns a scheduler step into model inputs, runs the model, and samples the requests that caught up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.attention import AttentionGroup, AttentionMetadata, build_group
from tokenmill.model.fused_step import FusedStep
from tokenmill.model.llama import KVCache, LlamaModel
from tokenmill.sampler.sampler import Sampler, SamplingRow, TokenLogprobs
from tokenmill.scheduler.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class SequenceBatch:
    """The step's sequences for the fused step: sequence s owns token rows [query_starts[s], query_starts[s + 1])."""

    query_starts: torch.Tensor  # [S + 1]
    block_tables: torch.Tensor  # [S, max_blocks], padded with block 0
    context_lens: torch.Tensor  # [S] keys of each sequence, its new tokens included


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    slot_mapping: torch.Tensor  # [T] cache slot receiving each new token's K/V
    sample_indices: torch.Tensor  # flat token index whose logits yield a new token
    sampled: list[ScheduledRequest]  # the requests those indices belong to, in order
    sequences: SequenceBatch | None  # for the fused step
    attention: AttentionMetadata | None  # for the eager model


class ModelRunner:
    """Runs one scheduler step, whatever mix of decodes and prefill chunks it holds: through the fused C++ step when
    one is given (`fused_step`), else through the eager model — `LlamaModel.decode` for decode-only steps (one new
    token per sequence, the steady state of generation), the general flat-batch forward otherwise."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device,
                 fused_step: FusedStep | None = None) -> None:
        self.model = model
        self.fused_step = fused_step
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.sampler = Sampler(fused_step.greedy if fused_step is not None else None)

    def prepare(self, step: SchedulerOutput) -> ModelInputs:
        # Decodes first: the eager model attends them as one group without query padding.
        decodes = [s for s in step.scheduled if s.num_new_tokens == 1]
        chunks = [s for s in step.scheduled if s.num_new_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_indices: list[int] = []
        sampled: list[ScheduledRequest] = []
        for item in (*decodes, *chunks):
            start = item.request.num_computed_tokens
            end = start + item.num_new_tokens
            input_ids.extend(item.request.token_ids(start, end))
            positions.extend(range(start, end))
            slots.extend(self._slots(item.block_table, start, end))
            if item.samples:
                sample_indices.append(len(input_ids) - 1)
                sampled.append(item)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=self.device)
        sequences, attention = None, None
        if self.fused_step is not None:
            sequences = self._sequence_batch([*decodes, *chunks])
        else:
            attention = AttentionMetadata(slot_mapping, self._eager_groups(decodes, chunks))
        return ModelInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            slot_mapping=slot_mapping,
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=self.device),
            sampled=sampled,
            sequences=sequences,
            attention=attention,
        )

    def _slots(self, table: list[int], start: int, end: int) -> list[int]:
        """Cache slots of positions [start, end): one range per block rather than a computation per token."""
        bs = self.block_size
        slots: list[int] = []
        for b in range(start // bs, (end - 1) // bs + 1):
            base = table[b] * bs
            slots.extend(range(base + max(start - b * bs, 0), base + min(end - b * bs, bs)))
        return slots

    def _sequence_batch(self, items: list[ScheduledRequest]) -> SequenceBatch:
        context_lens = [s.request.num_computed_tokens + s.num_new_tokens for s in items]
        width = max(-(-c // self.block_size) for c in context_lens)
        tables = [s.block_table[:width] for s in items]
        starts = [0]
        for item in items:
            starts.append(starts[-1] + item.num_new_tokens)
        return SequenceBatch(
            torch.tensor(starts, dtype=torch.long, device=self.device),
            torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long, device=self.device),
            torch.tensor(context_lens, dtype=torch.long, device=self.device),
        )

    def _eager_groups(self, decodes: list[ScheduledRequest], chunks: list[ScheduledRequest]) -> list[AttentionGroup]:
        groups = []
        token_start = 0
        for group in (decodes, chunks):
            if not group:
                continue
            groups.append(build_group(
                token_start,
                [s.num_new_tokens for s in group],
                [s.request.num_computed_tokens + s.num_new_tokens for s in group],
                [s.block_table for s in group],
                self.block_size,
                self.device,
            ))
            token_start += groups[-1].num_tokens
        return groups

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[SampledToken]:
        self.kv_cache.copy_blocks(step.block_copies)
        inputs = self.prepare(step)
        hidden = self._forward(inputs)
        sampled = inputs.sampled
        if not sampled:
            return []
        if len(sampled) != hidden.shape[0]:
            hidden = hidden[inputs.sample_indices]
        logits = self.model.lm_head.logits(hidden)  # model dtype or fp32: the sampler widens only when it must
        rows = [self._sampling_row(item) for item in sampled]
        result = self.sampler(logits, rows)
        return [
            SampledToken(item.request.request_id, token, logprobs)
            for item, token, logprobs in zip(sampled, result.token_ids, result.logprobs, strict=True)
        ]

    def _forward(self, inputs: ModelInputs) -> torch.Tensor:
        """Final hidden states of every token of the step (or of every sampled one, which for a decode-only step is
        every token in the same order)."""
        if inputs.sequences is not None:
            seqs = inputs.sequences
            return self.fused_step(inputs.input_ids, inputs.positions, inputs.slot_mapping, seqs.query_starts,
                                   seqs.block_tables, seqs.context_lens, self.kv_cache)
        attention = inputs.attention
        assert attention is not None
        groups = attention.groups
        if len(groups) == 1 and groups[0].query_scatter is None and len(inputs.sampled) == groups[0].num_seqs:
            # Decode-only step: one new token per sequence, every one sampled, in batch order.
            group = groups[0]
            hidden, keys, values = self.model.decode(inputs.input_ids, inputs.positions, group.block_tables,
                                                     group.mask, self.kv_cache)
            self.kv_cache.write(inputs.slot_mapping, keys, values)
            return hidden
        return self.model(inputs.input_ids, inputs.positions, attention, self.kv_cache)

    @staticmethod
    def _sampling_row(item: ScheduledRequest) -> SamplingRow:
        request = item.request
        params = request.params
        blocked: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            blocked = [*params.stop_token_ids, *([] if params.ignore_eos else request.eos_token_ids)]
        return SamplingRow(params, request.prompt_token_ids, request.output_token_ids, request.generator, blocked)
