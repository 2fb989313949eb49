"""Turns a scheduler step into model inputs, runs the model, and samples the requests that caught up."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.model.attention import AttentionMetadata, build_group
from tokenmill.model.fused_decode import FusedDecodeStep
from tokenmill.model.llama import KVCache, LlamaModel
from tokenmill.sampler.sampler import Sampler, SamplingRow, TokenLogprobs
from tokenmill.scheduler.scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class SampledToken:
    request_id: str
    token_id: int
    logprobs: TokenLogprobs | None


@dataclass
class ModelInputs:
    input_ids: torch.Tensor
    positions: torch.Tensor
    attention: AttentionMetadata
    sample_indices: torch.Tensor  # flat token index whose logits yield a new token
    sampled: list[ScheduledRequest]  # the requests those indices belong to, in order


class ModelRunner:
    """Runs one scheduler step. Decode-only steps (one new token per sequence, the steady state of generation) take
    the fused C++ step when one is given (`fused_decode`), else `LlamaModel.decode`; other steps run the general
    flat-batch forward. The eager paths give a decode token the same attention arithmetic (`decode_attention`)."""

    def __init__(self, model: LlamaModel, kv_cache: KVCache, device: torch.device,
                 fused_decode: FusedDecodeStep | None = None) -> None:
        self.model = model
        self.fused_decode = fused_decode
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.sampler = Sampler()

    def prepare(self, step: SchedulerOutput) -> ModelInputs:
        # Decodes first so they form one contiguous group attended without query padding.
        decodes = [s for s in step.scheduled if s.num_new_tokens == 1]
        chunks = [s for s in step.scheduled if s.num_new_tokens > 1]
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_indices: list[int] = []
        sampled: list[ScheduledRequest] = []
        groups = []
        for group in (decodes, chunks):
            if not group:
                continue
            group_start = len(input_ids)
            for item in group:
                start = item.request.num_computed_tokens
                end = start + item.num_new_tokens
                input_ids.extend(item.request.token_ids(start, end))
                positions.extend(range(start, end))
                table = item.block_table
                slots.extend(table[p // self.block_size] * self.block_size + p % self.block_size
                             for p in range(start, end))
                if item.samples:
                    sample_indices.append(len(input_ids) - 1)
                    sampled.append(item)
            groups.append(build_group(
                group_start,
                [s.num_new_tokens for s in group],
                [s.request.num_computed_tokens + s.num_new_tokens for s in group],
                [s.block_table for s in group],
                self.block_size,
                self.device,
            ))
        return ModelInputs(
            input_ids=torch.tensor(input_ids, dtype=torch.long, device=self.device),
            positions=torch.tensor(positions, dtype=torch.long, device=self.device),
            attention=AttentionMetadata(torch.tensor(slots, dtype=torch.long, device=self.device), groups),
            sample_indices=torch.tensor(sample_indices, dtype=torch.long, device=self.device),
            sampled=sampled,
        )

    @torch.inference_mode()
    def execute(self, step: SchedulerOutput) -> list[SampledToken]:
        self.kv_cache.copy_blocks(step.block_copies)
        inputs = self.prepare(step)
        sampled, groups = inputs.sampled, inputs.attention.groups
        if len(groups) == 1 and groups[0].query_scatter is None and len(sampled) == groups[0].num_seqs:
            # Decode-only step: one new token per sequence, every one sampled, in batch order.
            hidden = self._decode(inputs)
        else:
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.attention, self.kv_cache)
            hidden = hidden[inputs.sample_indices]
        if not sampled:
            return []
        logits = self.model.lm_head.logits(hidden)  # model dtype or fp32: the sampler widens only when it must
        rows = [self._sampling_row(item) for item in sampled]
        result = self.sampler(logits, rows)
        return [
            SampledToken(item.request.request_id, token, logprobs)
            for item, token, logprobs in zip(sampled, result.token_ids, result.logprobs, strict=True)
        ]

    def _decode(self, inputs: ModelInputs) -> torch.Tensor:
        group = inputs.attention.groups[0]
        if self.fused_decode is not None:
            return self.fused_decode(inputs.input_ids, inputs.positions, inputs.attention.slot_mapping,
                                     group.block_tables, group.context_lens, self.kv_cache)
        hidden, keys, values = self.model.decode(inputs.input_ids, inputs.positions, group.block_tables, group.mask,
                                                 self.kv_cache)
        self.kv_cache.write(inputs.attention.slot_mapping, keys, values)
        return hidden

    @staticmethod
    def _sampling_row(item: ScheduledRequest) -> SamplingRow:
        request = item.request
        params = request.params
        blocked: list[int] = []
        if request.num_output_tokens < params.min_tokens:
            blocked = [*params.stop_token_ids, *([] if params.ignore_eos else request.eos_token_ids)]
        return SamplingRow(params, request.prompt_token_ids, request.output_token_ids, request.generator, blocked)
