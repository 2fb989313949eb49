"""Draft-model speculation (Leviathan et al. 2023): a second, smaller model with the target's vocabulary guesses the
next tokens of every decoding request, in batched steps of its own, one depth at a time.

Its KV lives in its own paged cache and block pool, not the target's. A draft block holds the draft's layers and
heads, so it is not the size of a target block; and with a pool of its own the target's accounting (admission,
preemption, prefix cache) is exactly what it is without speculation. The pool holds as many tokens as the target's
(within the engine's KV memory budget once more). When it runs short, the draft lets go of requests that are not
decoding this step (preempted ones) if that makes room, and otherwise gives the request no drafts.

Per request the proposer remembers which tokens its cache holds (entry i = token i). Each call keeps the longest
prefix of those that is still the request's (accepted drafts stay, rejected ones go: that is the rollback), computes
the rest (the whole prompt on the first call, the tokens emitted since on later ones) with chunks bounded by the
token budget, and then feeds back its own guesses one step at a time. Guesses are the draft's argmax: deterministic
given the tokens, so the verifier's one-hot rejection rule keeps sampling lossless. A self-draft lent the target's
cache (spec/target_kv.py) copies the entries of the tokens the target has computed instead of computing them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.attention.select import plain_backend
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.cache import KVCache
from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_file import GGUFFile
from tokenmill.model.llama import LlamaModel
from tokenmill.model.loader import load_model
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.plan import SamplingInputs, ScheduledSeq, StepPlan
from tokenmill.spec.adaptive import StepCostModel
from tokenmill.spec.draft_vocab import SubsetHead
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.proposer import DraftRequest, Proposer
from tokenmill.spec.target_kv import TargetKV, positions_to_slots
from tokenmill.spec.tree import DraftTree

logger = logging.getLogger(__name__)

_ARGMAX = SamplingInputs(SamplingParams(temperature=0.0))
# How far each call moves `steps_per_depth`: the lookups' share of a draft comes and goes with the text.
STEPS_WEIGHT = 0.1


@dataclass
class _DraftSeq:
    request_id: str
    tokens: list[int] = field(default_factory=list)  # the tokens whose KV the draft cache holds, entry i = token i
    blocks: list[int] = field(default_factory=list)


@dataclass
class _Work:
    """One request's part of a call: tokens still to feed the draft model, and the guesses so far."""

    seq: _DraftSeq
    request_tokens: list[int]  # the request's prompt and output
    pending: list[int]
    wanted: int
    guesses: list[int] = field(default_factory=list)
    runners_up: list[list[int]] = field(default_factory=list)  # per guess, the draft's next likeliest tokens
    lookup: list[int] = field(default_factory=list)  # a prompt-lookup guess riding on `pending`, checked with it


class DraftModelProposer(Proposer):
    """`runner`: the draft model's own runner over its own cache of `num_blocks` blocks; `max_step_tokens`: rows per
    draft step (the engine's token budget); `cost`: seconds of one draft step by its number of sequences, for
    adaptive draft lengths; `target_kv`: the target's cache to copy computed entries from (a self-draft), or None."""

    free = False

    def __init__(self, runner: ModelRunner, num_blocks: int, block_size: int, max_step_tokens: int,
                 max_positions: int, cost: StepCostModel | None = None, target_kv: TargetKV | None = None,
                 lookup: NgramProposer | None = None) -> None:
        if target_kv is not None and not isinstance(runner.kv_cache, KVCache):
            raise ValueError("a draft copies the target's entries into a full-precision cache only")
        self.target_kv = target_kv
        self.lookup = lookup
        # Draft steps per depth drafted, a moving average: one without lookups; less where they are agreed with.
        self.steps_per_depth = 1.0
        self.runner = runner
        self.pool = BlockPool(num_blocks)
        self.block_size = block_size
        self.max_step_tokens = max_step_tokens
        self.max_positions = max_positions
        self.cost = cost
        self._seqs: dict[str, _DraftSeq] = {}  # least recently asked first
        self._released: list[str] = []  # dropped since the last draft step: the runner hears of them then

    @classmethod
    def load(cls, path: str | Path, target: GGUFFile, dtype: torch.dtype, device: torch.device, *,
             weight_format: str, int4_group_size: int, prepack: str | None, enforce_eager: bool, num_blocks: int,
             block_size: int, max_step_tokens: int, max_positions: int, measure_cost: bool,
             max_kv_bytes: int | None = None, int8_activations: bool = False,
             vocab: torch.Tensor | None = None, lookup: NgramProposer | None = None) -> DraftModelProposer:
        """The draft model at `path` for the `target` model's file: same vocabulary (checked token by token), the
        target's dtype and weight format (`int8_activations`: the GGUF layers' int8 mode; `prepack`: the bf16 kernel
        float weights are packed for, or None), `num_blocks` KV blocks of its own (fewer if they would take more than
        `max_kv_bytes`); `vocab`: the only token ids it may guess (draft_vocab.py), or None for all; `lookup`: the
        prompt lookup whose guesses each draft checks first (`for_model`), or None."""
        started = time.perf_counter()
        gguf_file = GGUFFile(path)
        check_same_vocabulary(gguf_file, target)
        cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
        target_vocab = ModelConfig.from_gguf_metadata(target.metadata, target.tensor_names()).vocab_size
        if cfg.vocab_size != target_vocab:
            raise ValueError(f"the draft model's LM head has {cfg.vocab_size} rows, the target's {target_vocab}: "
                             "its guesses could name tokens the target does not have")
        num_blocks = affordable_blocks(cfg, dtype, num_blocks, block_size, max_kv_bytes)
        positions = min(max_positions, cfg.max_position, num_blocks * block_size)
        model = load_weights(gguf_file, dtype, device, weight_format, int4_group_size, positions, int8_activations,
                             prepack)
        proposer = cls.for_model(model, device, enforce_eager=enforce_eager, num_blocks=num_blocks,
                                 block_size=block_size, max_step_tokens=max_step_tokens, measure_cost=measure_cost,
                                 vocab=vocab, lookup=lookup)
        logger.info("draft model %s loaded in %.1fs", Path(path).name, time.perf_counter() - started)
        return proposer

    @classmethod
    def for_model(cls, model: LlamaModel, device: torch.device, *, enforce_eager: bool, num_blocks: int,
                  block_size: int, max_step_tokens: int, measure_cost: bool,
                  vocab: torch.Tensor | None = None, target_kv: TargetKV | None = None,
                  lookup: NgramProposer | None = None) -> DraftModelProposer:
        """A proposer drafting with `model` (loaded, or the target's own layers: spec/self_draft.py) over a KV
        cache of `num_blocks` blocks of its own; `vocab`: the only token ids it may guess (draft_vocab.py), or None
        for all; `target_kv`: the target's cache its catch-ups copy from (a self-draft's), or None; `lookup`: a
        prompt lookup whose guess each chain draft feeds along with its first step, keeping the part the draft's
        own argmax agrees with (the same guesses in fewer draft steps), or None."""
        kv_cache = KVCache(model.cfg, num_blocks, block_size, model.dtype, device)
        backend, greedy = plain_backend(model, kv_cache, device, enforce_eager)
        head = model.lm_head if vocab is None else SubsetHead(model.lm_head, vocab)
        runner = ModelRunner(backend, head, kv_cache, device, greedy,
                             max_positions=model.rope_cos.shape[0], vocab_size=model.embed.out_features)
        cost = None
        if measure_cost:
            counts = [n for n in (1, 2, 4, 8, 16, 32, 64) if n <= max(2, min(max_step_tokens, 64))]
            cost = StepCostModel.measure(lambda n: runner.time_rows(n, rows_per_seq=1), counts, repeats=2)
        logger.info("draft: %d layers on %s, %d KV blocks of its own, %s%s", model.cfg.num_layers,
                    type(backend).__name__, num_blocks,
                    "the whole vocabulary" if vocab is None else f"{len(vocab)} of {head.out_features} tokens",
                    "" if cost is None else ", one step " + ", ".join(
                        f"{n} seqs {t * 1e3:.1f} ms" for n, t in zip(cost.rows, cost.seconds, strict=True)))
        return cls(runner, num_blocks, block_size, max_step_tokens, model.rope_cos.shape[0], cost, target_kv, lookup)

    def propose(self, request_id: str, prompt_token_ids: Sequence[int], output_token_ids: Sequence[int],
                max_tokens: int) -> list[int]:
        return self.propose_batch([DraftRequest(request_id, prompt_token_ids, output_token_ids, max_tokens)])[0]

    def drop(self, request_id: str) -> None:
        if self.lookup is not None:
            self.lookup.drop(request_id)
        if isinstance(self.runner.lm_head, SubsetHead):
            self.runner.lm_head.forget(request_id)
        seq = self._seqs.pop(request_id, None)
        if seq is not None:
            self.pool.free(seq.blocks)
            self._released.append(request_id)

    def draft_seconds(self, num_seqs: int, depth: int) -> float:
        if self.cost is None or not num_seqs or not depth:
            return 0.0
        return depth * self.steps_per_depth * self.cost(num_seqs)

    def catch_up_seconds(self, request_id: str, num_tokens: int) -> float:
        """The tokens the cache lacks beyond the one a draft step feeds, priced as that many more rows in a step
        (the step-time model by sequences of one row each, extended linearly past its largest count): a prefill
        row costs about what a sequence's row does. Guesses the target rejected still count as held, so this can
        be low by a draft's length. Nothing with the target's cache lent: the entries are copied from it."""
        if self.target_kv is not None:
            return 0.0
        seq = self._seqs.get(request_id)
        extra = num_tokens - (len(seq.tokens) if seq is not None else 0) - 1
        if self.cost is None or extra <= 0:
            return 0.0
        return self.cost(1 + extra) - self.cost(1)

    def propose_batch(self, requests: Sequence[DraftRequest]) -> list[list[int]]:
        return [w.guesses if w is not None else [] for w in self._draft(requests, 1)]

    def propose_trees(self, requests: Sequence[DraftRequest], width: int, max_drafts: int) -> list[DraftTree]:
        """The argmax chain, and the draft's next `width - 1` likeliest tokens at each depth as leaves beside it
        (shallow ones first: they are the likelier to be reached), at most `max_drafts` tokens in all."""
        trees = []
        for w in self._draft(requests, width):
            if w is None:
                trees.append(DraftTree(()))
                continue
            chain = w.guesses[:max_drafts]
            leaves = [(depth, token) for depth, others in enumerate(w.runners_up[: len(chain)]) for token in others]
            leaves = leaves[: max_drafts - len(chain)]
            parents = (*range(len(chain)), *(depth for depth, _ in leaves))
            trees.append(DraftTree((*chain, *(token for _, token in leaves)), parents if leaves else ()))
        return trees

    def _draft(self, requests: Sequence[DraftRequest], width: int) -> list[_Work | None]:
        asked = {r.request_id for r in requests}  # decoding now, drafts or not: their state is kept
        work: dict[int, _Work] = {}
        for i, request in enumerate(requests):
            item = self._prepare(request, asked)
            if item is not None:
                work[i] = item
        items = list(work.values())
        if self.lookup is not None and width == 1 and not isinstance(self.runner.lm_head, SubsetHead):
            for i, w in work.items():
                request = requests[i]
                # One fewer than wanted: if the draft agrees with all of it, its own next token completes the draft.
                w.lookup = self.lookup.propose(request.request_id, request.prompt_token_ids, request.output_token_ids,
                                               w.wanted - 1)
                w.pending += w.lookup
        self._catch_up(items, width)
        rounds = 1
        while deeper := [w for w in items if len(w.guesses) < w.wanted]:
            for w in deeper:
                w.pending = [w.guesses[-1]]
            self._catch_up(deeper, width)
            rounds += 1
        if self.lookup is not None and items:
            self.steps_per_depth += STEPS_WEIGHT * (rounds / max(w.wanted for w in items) - self.steps_per_depth)
        return [work.get(i) for i in range(len(requests))]

    def _prepare(self, request: DraftRequest, asked: set[str]) -> _Work | None:
        """Roll the request's draft state back to the tokens it still shares with the request and reserve the KV
        the call needs; None when it gets no drafts."""
        tokens = [*request.prompt_token_ids, *request.output_token_ids]
        # Guess j is computed from the token at position len(tokens) - 2 + j, which must have a RoPE position.
        wanted = min(request.max_tokens, self.max_positions - len(tokens) + 1)
        if wanted <= 0 or not tokens:
            return None
        seq = self._seqs.pop(request.request_id, None) or _DraftSeq(request.request_id)
        self._seqs[request.request_id] = seq  # most recently asked last
        kept = 0
        for mine, theirs in zip(seq.tokens, tokens, strict=False):
            if mine != theirs:
                break
            kept += 1
        del seq.tokens[min(kept, len(tokens) - 1):]  # the last token is always fed: its logits give guess 1
        if not self._reserve(seq, len(tokens) + wanted - 1, asked):
            return None
        self._copy_from_target(seq, request, tokens)
        return _Work(seq, tokens, tokens[len(seq.tokens):], wanted)

    def _copy_from_target(self, seq: _DraftSeq, request: DraftRequest, tokens: list[int]) -> None:
        """Entries the draft lacks and the target holds, copied from the target's cache (blocks reserved)."""
        end = min(request.target_entries, len(tokens) - 1)
        start = len(seq.tokens)
        if self.target_kv is None or not request.target_blocks or end <= start:
            return
        bs = self.block_size
        assert isinstance(self.runner.kv_cache, KVCache)  # the constructor checks it
        self.target_kv.copy_to(self.runner.kv_cache, positions_to_slots(request.target_blocks, bs, start, end),
                               positions_to_slots(seq.blocks, bs, start, end))
        seq.tokens += tokens[start:end]

    def _reserve(self, seq: _DraftSeq, entries: int, asked: set[str]) -> bool:
        need = -(-entries // self.block_size) - len(seq.blocks)
        if need <= 0:
            return True
        idle = [r for r in self._seqs if r not in asked]  # least recently asked first
        if self.pool.num_free_blocks + sum(len(self._seqs[r].blocks) for r in idle) < need:
            return False  # letting go of the idle ones would not make room: keep them
        for request_id in idle:
            if self.pool.num_free_blocks >= need:
                break
            self.drop(request_id)
        seq.blocks.extend(self.pool.allocate(need))
        return True

    def _catch_up(self, items: list[_Work], width: int) -> None:
        """Feed every item's pending tokens through the draft model, in steps of at most `max_step_tokens` rows;
        each item's last fed token yields its next guess (and, for `width` > 1, its runners-up)."""
        while any(w.pending for w in items):
            step, budget = [], self.max_step_tokens
            for w in items:
                if w.pending and budget:
                    take = min(len(w.pending), budget)
                    if take < len(w.pending) and w.lookup:  # its rows ride with the sampled row or not at all
                        del w.pending[len(w.pending) - len(w.lookup):]
                        w.lookup = []
                        take = min(len(w.pending), budget)
                    step.append((w, w.pending[:take], take == len(w.pending)))
                    w.pending = w.pending[take:]
                    budget -= take
            guesses = self._run(step, width)
            for w, _, last in step:
                if last:
                    tokens, others = guesses[w.seq.request_id]
                    w.guesses += tokens
                    w.runners_up += [others] + [[] for _ in tokens[1:]]
                    w.lookup = []

    def _run(self, step: list[tuple[_Work, list[int], bool]],
             width: int) -> dict[str, tuple[list[int], list[int]]]:
        """One draft step; per sampled item its guesses (one, or a checked lookup's agreed part and the next) and,
        for `width` > 1, the runners-up of the first."""
        seqs, token_ids, positions, slots = [], [], [], []
        bs = self.block_size
        step = sorted(step, key=lambda item: len(item[1]) != 1)  # a plan lists its one-token sequences first
        for w, new, sample in step:
            seq = w.seq
            start, end = len(seq.tokens), len(seq.tokens) + len(new)
            # A lookup rides as drafts: the runner's greedy verifier keeps the part the draft's argmax agrees with.
            checked = tuple(w.lookup) if sample else ()
            seqs.append(ScheduledSeq(seq.request_id, len(token_ids), len(new), end, tuple(seq.blocks),
                                     int(sample) + len(checked), _ARGMAX if sample else None, checked))
            token_ids += new
            positions += range(start, end)
            slots += positions_to_slots(seq.blocks, bs, start, end)
        plan = StepPlan(tuple(seqs), tuple(token_ids), tuple(positions), tuple(slots),
                        finished_request_ids=tuple(self._released), return_logits=width > 1)
        if isinstance(self.runner.lm_head, SubsetHead):  # each sampled row may also guess its own request's tokens
            self.runner.lm_head.set_rows([(w.seq.request_id, w.request_tokens) for w, _, sample in step if sample])
        started = time.perf_counter()
        result = self.runner.execute(plan)
        # The model prices a step of one row per sequence, a guess deeper; a catch-up of many rows after idle steps
        # is rarer and would make every later depth look as dear as itself.
        if self.cost is not None and len(token_ids) == len(seqs):
            self.cost.observe(len(seqs), time.perf_counter() - started)
        self._released = []
        tokens = {s.request_id: list(s.token_ids) for s in result.samples}
        for w, new, sample in step:  # only now does the cache hold their entries; a lookup's rejected part goes
            rejected = len(w.lookup) - (len(tokens[w.seq.request_id]) - 1) if sample else 0
            w.seq.tokens += new[: len(new) - rejected]
        others: list[list[int]] = [[] for _ in result.samples]
        if result.logits is not None:  # the next likeliest tokens besides each argmax guess
            top = result.logits.topk(width, dim=-1).indices.tolist()
            others = [[t for t in row if t != s.token_ids[0]][: width - 1]
                      for row, s in zip(top, result.samples, strict=True)]
        return {s.request_id: (tokens[s.request_id], o) for s, o in zip(result.samples, others, strict=True)}


def load_weights(gguf_file: GGUFFile, dtype: torch.dtype, device: torch.device, weight_format: str,
                 int4_group_size: int, max_positions: int, int8_activations: bool, prepack: str | None) -> LlamaModel:
    """A draft's weights: the model in `gguf_file` in its own format and dtype (`prepack`: the bf16 kernel float
    weights are packed for, or None)."""
    model = load_model(gguf_file, dtype, device, weight_format, int4_group_size, max_positions=max_positions,
                       int8_activations=int8_activations)
    if prepack is not None:
        model.prepack_weights(prepack)
    return model


def affordable_blocks(cfg: ModelConfig, dtype: torch.dtype, num_blocks: int, block_size: int,
                      max_bytes: int | None) -> int:
    """`num_blocks`, or as many of the draft's blocks (K and V of its layers, in `dtype`) as fit in `max_bytes`."""
    if max_bytes is None:
        return num_blocks
    block_bytes = 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * block_size * dtype.itemsize
    return max(1, min(num_blocks, max_bytes // block_bytes))


def check_same_vocabulary(draft: GGUFFile, target: GGUFFile) -> None:
    """A draft's token ids must mean the target's: the same token strings in the same order."""
    key = "tokenizer.ggml.tokens"
    mine, theirs = draft.metadata.get(key), target.metadata.get(key)
    if mine is None or theirs is None or list(mine) != list(theirs):
        size = "?" if mine is None else len(mine)
        raise ValueError(f"the draft model's vocabulary ({size} tokens) is not the target's "
                         f"({'?' if theirs is None else len(theirs)} tokens): its token ids would mean other tokens")
