"""What crosses from the scheduler to the model runner and back: plain, picklable data, no live objects.

A `StepPlan` says which tokens to compute, where their K/V go and which positions yield tokens; the runner answers
with a `StepResult`. Neither holds a `Request` or a list owned by the scheduler or the KV manager, so a plan can be
sent to another process (tensor-parallel workers, replicas) and reasoned about on its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from tokenmill.kv.streaming import KVShift
from tokenmill.sampler.sampler import TokenLogprobs
from tokenmill.sampling_params import SamplingParams
from tokenmill.spec.tree import visible_entries


@dataclass(frozen=True)
class SamplingInputs:
    """What the sampler needs of one request. The token history is filled in only when a penalty reads it."""

    params: SamplingParams
    prompt_token_ids: tuple[int, ...] = ()
    output_token_ids: tuple[int, ...] = ()
    blocked_token_ids: tuple[int, ...] = ()  # e.g. EOS and stop tokens while min_tokens is not reached
    blocked_rows: int = 0  # how many of the sequence's sample rows they apply to (the rest reach min_tokens)


@dataclass(frozen=True)
class PromptLogprobRows:
    """Rows of a prefill chunk whose logits score the prompt: rows [offset, offset + len(targets)) of the sequence
    predict `targets`, the prompt tokens that follow them; `num_top` alternatives are listed per row."""

    offset: int
    targets: tuple[int, ...]
    num_top: int


@dataclass(frozen=True)
class ScheduledSeq:
    """One request's share of a step: flat rows [query_start, query_start + num_tokens) of the plan's token arrays.

    Its queries attend to its first `context_len` KV entries (this step's included), read through `block_table`:
    query j sits at entry context_len - num_tokens + j and sees the entries up to it. The last `num_samples` rows
    yield a token each (0: a prefill chunk that has not caught up; 1 + k where k drafted tokens are verified): the
    last 1 + k rows hold the last real token, then the drafts `draft_token_ids`, whose tokens the step verifies.
    With `draft_parents` the drafts form a token tree (spec/tree.py): a draft's row then sees only the entries up to
    its parent's (`visible_entries`) besides its own, and its position is its depth past the last real token's.
    """

    request_id: str
    query_start: int
    num_tokens: int
    context_len: int
    block_table: tuple[int, ...]
    num_samples: int = 0
    sampling: SamplingInputs | None = None  # set when num_samples > 0
    draft_token_ids: tuple[int, ...] = ()  # num_samples - 1 of them when set
    prompt_logprobs: PromptLogprobRows | None = None  # the request asked for prompt logprobs
    # H2O per head (kv/h2o.py): [lanes, blocks] each layer's KV head's own table (lane = layer * kv_heads + head),
    # the same blocks as `block_table` in its own order; None when every lane reads `block_table`.
    lane_tables: torch.Tensor | None = None
    draft_parents: tuple[int, ...] = ()  # empty: the drafts are a chain

    def visible_entries(self) -> list[int] | None:
        """Per row, how many of the sequence's KV entries it sees besides its own; None when every row sees all
        entries before it (no tree)."""
        if not self.draft_parents:
            return None
        first = self.context_len - self.num_tokens
        root = self.num_tokens - self.num_samples
        drafts = visible_entries(self.draft_parents, first, root, len(self.draft_token_ids))
        return [first + j for j in range(root + 1)] + drafts


@dataclass(frozen=True)
class StepPlan:
    """One step. Sequences with a single new token come first (the eager backend attends them as one group).

    `positions` are token positions (RoPE); `slot_mapping` the cache slots the new K/V go to: the two are kept apart,
    since a cache that evicts entries keeps positions growing while slots are reused.
    """

    seqs: tuple[ScheduledSeq, ...] = ()
    token_ids: tuple[int, ...] = ()
    positions: tuple[int, ...] = ()
    slot_mapping: tuple[int, ...] = ()
    block_copies: tuple[tuple[int, int], ...] = ()  # (src, dst) whole-block copies before the step (fork writes)
    finished_request_ids: tuple[str, ...] = ()  # since the previous plan: the runner drops their per-request state
    preempted_request_ids: tuple[str, ...] = ()
    return_logits: bool = False  # StepResult.logits wanted (a verifier's target distribution)
    kv_shifts: tuple[KVShift, ...] = ()  # keys to rotate back after streaming-window evictions, before the step
    collect_attention: bool = False  # StepResult.attention_mass wanted (H2O's scores, kv/h2o.py)
    # [k, 3] (lane, source slot, destination slot): rows moved after H2O evictions, before the step (lane -1: in
    # every layer and head)
    lane_copies: torch.Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def is_empty(self) -> bool:
        return not self.seqs

    def sample_indices(self) -> list[int]:
        """Flat rows whose logits yield tokens, sequence by sequence."""
        return [i for s in self.seqs
                for i in range(s.query_start + s.num_tokens - s.num_samples, s.query_start + s.num_tokens)]


@dataclass
class SeqSamples:
    """The tokens drawn for one sequence, one per sample row, in row order."""

    request_id: str
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]
    # A drafted sequence's target choice at each of its sample rows (the verifier's `choices`), for drafters that
    # learn from the rows past the accepted ones; None otherwise.
    choices: list[int] | None = None


@dataclass
class StepResult:
    samples: list[SeqSamples] = field(default_factory=list)
    logits: torch.Tensor | None = None  # [sample rows, vocab] fp32, when the plan asked for them
    # Per request with PromptLogprobRows in the plan: one entry per target, in prompt order.
    prompt_logprobs: dict[str, list[TokenLogprobs]] = field(default_factory=dict)
    # Per sequence, when the plan collected attention: [lanes, context_len] the probability each KV entry received
    # this step, per lane (one lane: summed over layers and KV heads) summed over its query heads and the rows, in
    # the lane's entry order.
    attention_mass: dict[str, torch.Tensor] = field(default_factory=dict)
