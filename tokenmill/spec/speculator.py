"""The engine's side of speculation: before each step, draft tokens for the requests that are decoding; after it,
what the verifier accepted. The drafts ride on the request (`Request.draft_token_ids`) into the one scheduling rule,
which schedules them as 1 + k tokens and rolls back the rejected ones."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from tokenmill.request import Request, RequestStatus
from tokenmill.scheduler.plan import StepPlan, StepResult
from tokenmill.spec.adaptive import Acceptance, StepCostModel, choose_draft_lengths
from tokenmill.spec.guard import SpeculationGuard
from tokenmill.spec.proposer import DraftRequest, Proposer
from tokenmill.spec.tree import MAX_TREE_ROWS, DraftTree, spine_length

logger = logging.getLogger(__name__)


@dataclass
class SpecDecodeStats:
    """Counters named after vLLM's spec-decode metrics."""

    num_drafts: int = 0  # verify steps of a request that carried at least one draft token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [i]: drafts whose token i was accepted
    num_held_steps: int = 0  # decode steps the guard ran without drafts (spec/guard.py)

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_accepted_length(self) -> float:
        """Tokens per verify step: the accepted drafts plus the target's own token (vLLM's definition)."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0


# A request a costly drafter has left idle this many steps gets a probe draft of PROBE_TOKENS (one request per step):
# at the acceptance prior the cost model can decline every draft, and a request that never drafts never measures
# how often its drafts would be accepted. Each probe that the cost model does not follow with drafts of its own
# doubles the request's wait for the next one, up to PROBE_EVERY_MAX: where drafts do not pay, probes cost a draft
# step pass each, and at a few requests a fixed interval added up to a probe every few steps. A probe is sent only
# where its best outcome (every probe token accepted) would make the cost model draft for the request: otherwise
# it could change nothing, and it costs a draft pass plus the draft's catch-up on every token since its last one.
PROBE_EVERY = 16
PROBE_EVERY_MAX = 256
PROBE_TOKENS = 2
# A drafter's catch-up (a draft model feeding the tokens of its steps without drafts) is paid once and buys drafts
# for the steps after it, so a step that starts a request's drafts is charged the catch-up spread over the steps
# the request has left at its expected tokens per step, but over no more than CATCH_UP_HORIZON: when the batch or
# the acceptance changes, drafts stop being chosen and the state falls behind again.
CATCH_UP_HORIZON = 32


class Speculator:
    """`cost(rows)`: the step-time model for adaptive lengths, or None for a fixed `max_draft_tokens` whenever the
    proposer has that many. `tree_width` > 1: token trees of that many tokens per depth (spec/tree.py) where the
    proposer has candidates; lengths are then chosen for the tree's chain, its leaves riding along.
    `target_tables`: a request's block table in the target's KV cache, handed to the proposer with each ask
    (`DraftRequest.target_blocks`) when the engine lends a drafter that cache (spec/target_kv.py); None: not lent.
    `guard`: drafts only at batch sizes where steps with them are measured to give more tokens per second than
    steps without (spec/guard.py), timed by `clock` from `propose` to `step_done`; None: no such check."""

    def __init__(self, proposer: Proposer, max_draft_tokens: int, max_model_len: int, max_step_tokens: int,
                 cost: Callable[[int], float] | None = None, tree_width: int = 1,
                 target_tables: Callable[[str], list[int]] | None = None, guard: SpeculationGuard | None = None,
                 clock: Callable[[], float] = time.perf_counter) -> None:
        if max_draft_tokens < 1:
            raise ValueError(f"max_draft_tokens must be >= 1, got {max_draft_tokens}")
        self.proposer = proposer
        self.max_draft_tokens = max_draft_tokens
        self.max_model_len = max_model_len
        self.max_step_tokens = max_step_tokens
        self.cost = cost
        self.tree_width = tree_width
        self.target_tables = target_tables
        self.guard = guard
        self._clock = clock
        self._guarded: tuple[int, bool, float] | None = None  # this step's (decoding, drafts allowed, start time)
        self.stats = SpecDecodeStats(accepted_per_position=[0] * max_draft_tokens)
        self._acceptance: dict[str, Acceptance] = {}
        # A model drafter's acceptance over every request, slowly moving: the prior a new request starts at and an
        # idle one drifts back to (`prior`). A fixed prior of one half left a request whose rate had dipped idle
        # (or a new one never started) under a drafter that is accepted most of the time, until a probe, 16 or more
        # steps later, measured it again.
        self._overall = Acceptance(decay=0.95)
        self._idle: dict[str, int] = {}  # steps since a request last drafted, for the probes of costly drafters
        self._probe_wait: dict[str, int] = {}  # idle steps before its next probe (PROBE_EVERY when absent)

    def propose(self, running: Sequence[Request]) -> None:
        """Set the drafts of every running request that is one token behind (decoding); others get none."""
        decoding = [r for r in running if r.status is RequestStatus.RUNNING
                    and r.num_computed_tokens == r.num_tokens - 1]
        self._guarded = None
        if self.guard is not None and decoding:
            allowed = self.guard.allow(len(decoding))
            self._guarded = (len(decoding), allowed, self._clock())
            if not allowed:  # what the requests' acceptance and probes know stays as it is
                self.stats.num_held_steps += 1
                for request in decoding:
                    request.draft_token_ids, request.draft_parents = [], []
                return
        # Rows the step has without drafts: prefill chunks too, as far as the token budget lets them in.
        base_rows = min(sum(max(1, r.num_tokens - r.num_computed_tokens) for r in running), self.max_step_tokens)
        limits = [self._limit(r) for r in decoding]
        guesses: Sequence[list[int] | DraftTree]
        try:
            if self.proposer.free:  # guesses cost nothing: take all there are, then keep what pays
                guesses = self.proposer.propose_batch(self._asks(decoding, limits))
                if self.cost is not None:
                    lengths = self._lengths(decoding, [len(g) for g in guesses], base_rows)
                    guesses = [g[:k] for g, k in zip(guesses, lengths, strict=True)]
            else:  # each guess costs a draft step: decide the lengths first, then have them drafted
                lengths = limits
                if self.cost is not None:
                    lengths = self._costly_lengths(decoding, limits, base_rows)
                guesses = self._guess(decoding, lengths)
        except Exception:  # a drafter's failure (a draft model's step) costs this step its drafts, nothing more
            logger.exception("%s failed; this step runs without drafts", type(self.proposer).__name__)
            guesses = [[] for _ in decoding]
        if self.cost is not None:
            for request, guess in zip(decoding, guesses, strict=True):
                if not (guess.token_ids if isinstance(guess, DraftTree) else guess):
                    self._of(request.request_id).forget(prior=self.prior)
        for request, guess in zip(decoding, guesses, strict=True):
            if isinstance(guess, DraftTree):
                request.draft_token_ids, request.draft_parents = list(guess.token_ids), list(guess.parents)
            else:
                request.draft_token_ids, request.draft_parents = guess, []

    def _guess(self, decoding: Sequence[Request], lengths: Sequence[int]) -> Sequence[list[int] | DraftTree]:
        """A costly proposer's drafts of the chosen lengths: chains, or trees around chains of those lengths."""
        if self.tree_width == 1:
            return self.proposer.propose_batch(self._asks(decoding, lengths))
        return self.proposer.propose_trees(self._asks(decoding, lengths), self.tree_width, MAX_TREE_ROWS - 1)

    @property
    def prior(self) -> float:
        """A costly drafter's acceptance rate over all requests so far (one half before any verify step); one half
        for a free one (a lookup), whose guesses come and go with each request's text (its acceptance over all
        requests says little about the next one: measured no better, docs/benchmarks.md)."""
        return 0.5 if self.proposer.free else self._overall.rate

    def _of(self, request_id: str) -> Acceptance:
        """The request's acceptance estimate, a new one starting at the prior."""
        if request_id not in self._acceptance:
            self._acceptance[request_id] = Acceptance.at(self.prior)
        return self._acceptance[request_id]

    def _rates(self, decoding: Sequence[Request]) -> list[float]:
        return [self._of(r.request_id).rate for r in decoding]

    def _lengths(self, decoding: Sequence[Request], available: Sequence[int], base_rows: int) -> list[int]:
        """A free proposer's: how many of the guesses it has pay."""
        assert self.cost is not None
        return choose_draft_lengths(self._rates(decoding), available, base_rows, self.cost)

    def _costly_lengths(self, decoding: Sequence[Request], limits: Sequence[int], base_rows: int) -> list[int]:
        """A costly proposer's lengths, its draft steps and catch-ups paid, and a probe where one is due."""
        assert self.cost is not None
        rates = self._rates(decoding)
        starts = self._start_costs(decoding, limits, rates)
        lengths = choose_draft_lengths(rates, limits, base_rows, self.cost, self.proposer.draft_seconds, starts)
        return self._probe(decoding, limits, lengths, lambda i: self._could_draft(limits, rates, starts, i,
                                                                                   decoding[i], base_rows))

    def _start_costs(self, decoding: Sequence[Request], available: Sequence[int],
                     rates: Sequence[float]) -> list[float]:
        """Per request, its drafter's catch-up spread over the steps it would pay for (CATCH_UP_HORIZON)."""
        return [self._start_cost(r, k, rate) for r, k, rate in zip(decoding, available, rates, strict=True)]

    def _start_cost(self, request: Request, available: int, rate: float) -> float:
        seconds = self.proposer.catch_up_seconds(request.request_id, request.num_tokens)
        if not seconds:
            return 0.0
        left = min(request.params.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens)
        per_step = sum(rate**j for j in range(available + 1))
        return seconds / min(max(1.0, left / per_step), CATCH_UP_HORIZON)

    def _probe(self, decoding: Sequence[Request], limits: Sequence[int], lengths: list[int],
               could_draft: Callable[[int], bool]) -> list[int]:
        """`lengths` with a probe draft for the request idle longest, once it has been idle its probe wait
        (PROBE_EVERY steps, doubled by each probe the cost model did not follow with drafts) and if the probe
        could pay (`could_draft(i)`); a request whose probe could not waits its probe wait again."""
        for request, k in zip(decoding, lengths, strict=True):
            self._idle[request.request_id] = 0 if k else self._idle.get(request.request_id, 0) + 1
            if k:  # the cost model drafts for it again: probes, when they are needed, start over
                self._probe_wait.pop(request.request_id, None)
        waiting = [i for i, r in enumerate(decoding) if limits[i] > 0
                   and self._idle[r.request_id] >= self._probe_wait.get(r.request_id, PROBE_EVERY)]
        if waiting:
            i = max(waiting, key=lambda j: self._idle[decoding[j].request_id])
            request_id = decoding[i].request_id
            self._idle[request_id] = 0
            if could_draft(i):
                lengths = list(lengths)
                lengths[i] = min(limits[i], PROBE_TOKENS)
                self._probe_wait[request_id] = min(2 * self._probe_wait.get(request_id, PROBE_EVERY),
                                                   PROBE_EVERY_MAX)
        return lengths

    def _could_draft(self, limits: Sequence[int], rates: Sequence[float], starts: Sequence[float], i: int,
                     request: Request, base_rows: int) -> bool:
        """Whether the cost model would draft for request i after a probe whose tokens were all accepted, the
        other requests' rates and start costs as they are."""
        hoped = replace(self._acceptance[request.request_id])
        hoped.observe(PROBE_TOKENS, PROBE_TOKENS)
        rates, starts = list(rates), list(starts)
        rates[i] = hoped.rate
        starts[i] = self._start_cost(request, limits[i], hoped.rate)
        assert self.cost is not None
        return choose_draft_lengths(rates, limits, base_rows, self.cost, self.proposer.draft_seconds, starts)[i] > 0

    def _limit(self, request: Request) -> int:
        params = request.params
        # A draft past max_tokens or the context is never used: the target's own token after the drafts is the last.
        return max(0, min(self.max_draft_tokens, params.max_tokens - request.num_output_tokens - 1,
                          self.max_model_len - request.num_tokens - 1))

    def _asks(self, decoding: Sequence[Request], lengths: Sequence[int]) -> list[DraftRequest]:
        tables = self.target_tables  # a copy of the request's table each (KVCacheManager.block_table)
        return [DraftRequest(r.request_id, r.prompt_token_ids, r.output_token_ids, k,
                             () if tables is None else tables(r.request_id),
                             0 if tables is None else r.num_computed_tokens)
                for r, k in zip(decoding, lengths, strict=True)]

    def step_done(self, plan: StepPlan, result: StepResult) -> None:
        """The engine has handed out the step's tokens: the guard gets the step's time from its drafting to here
        (the output handling counts, since a step with drafts hands out more tokens), when its rows were the decodes
        (and drafts) of the requests it was asked about, nothing else (a prefill chunk or a request the plan left
        out would make it another step)."""
        if self.guard is None or self._guarded is None:
            return
        num_decoding, allowed, started = self._guarded
        self._guarded = None
        if len(plan.seqs) == num_decoding and _decodes_only(plan):
            drafted = any(seq.draft_token_ids for seq in plan.seqs)
            tokens = sum(len(sample.token_ids) for sample in result.samples)
            self.guard.record(num_decoding, allowed, drafted, tokens, self._clock() - started)

    def release(self, request_id: str) -> None:
        """The request is finished: its proposer state (a draft model's KV blocks) goes now, not a step later."""
        self.proposer.drop(request_id)
        self._acceptance.pop(request_id, None)
        self._idle.pop(request_id, None)
        self._probe_wait.pop(request_id, None)

    def observe(self, plan: StepPlan, result: StepResult, seconds: float | None = None) -> None:
        """Count what the step verified and forget finished requests; `seconds`, what the step took, moves the
        step-time model when every row of the step was a decode or a draft (prefill chunks cost otherwise)."""
        for request_id in plan.finished_request_ids:
            self.release(request_id)
        if seconds is not None and isinstance(self.cost, StepCostModel) and plan.seqs and _decodes_only(plan):
            self.cost.observe(plan.num_tokens, seconds)
        samples = {s.request_id: s for s in result.samples}
        for seq in plan.seqs:
            sample = samples.get(seq.request_id)
            if not seq.draft_token_ids or sample is None:
                continue
            accepted = len(sample.token_ids) - 1
            if sample.choices is not None and not seq.draft_parents:
                self.proposer.observe(seq.request_id, seq.draft_token_ids, sample.choices, accepted)
            self.stats.num_drafts += 1
            self.stats.num_draft_tokens += len(seq.draft_token_ids)
            self.stats.num_accepted_tokens += accepted
            for i in range(min(accepted, len(self.stats.accepted_per_position))):
                self.stats.accepted_per_position[i] += 1
            # A tree's acceptance is its chain's: the depth it was drafted to, and how deep it was accepted.
            depth = spine_length(seq.draft_parents) if seq.draft_parents else len(seq.draft_token_ids)
            self._of(seq.request_id).observe(depth, min(accepted, depth))
            self._overall.observe(depth, min(accepted, depth))


def _decodes_only(plan: StepPlan) -> bool:
    """Every row of the step is a decode or a draft: each sequence's rows all yield a token (no prefill chunk)."""
    return all(seq.num_samples == seq.num_tokens for seq in plan.seqs)
