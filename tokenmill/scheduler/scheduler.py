"""One token budget per step: running requests first, then waiting ones, in the order of the scheduling policy.

Every request only asks for `num_tokens + len(draft_token_ids) - num_computed_tokens` more tokens of compute, capped
by what is left of the step's budget. Prefill, chunked prefill, decode, recompute after preemption and speculative
verification (the last real token and k drafts: 1 + k tokens, drafts trimmed when the budget is short, the rejected
ones rolled back in `update`) are all that one rule.

The scheduler is also the request registry: requests enter through `add_request` and leave through `finish` (done
or aborted); preemption sends them back to the waiting queue. It hands the runner a `StepPlan` and takes the step's
outcome back through `update`, or through `step_failed` when running the plan raised: then the plan's requests run
one per step until each has passed or failed alone, so a request that breaks a step fails by itself.

The policy (scheduler/policy.py) owns the waiting queue and ranks the running list: budget goes from the front, and
when KV blocks run out the back of the list is preempted (recomputed later). FCFS, the default, admits in arrival
order and preempts the latest admitted.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.config import check_scheduling
from tokenmill.kv.manager import KVCacheManager
from tokenmill.kv.streaming import KVShift
from tokenmill.request import Request, RequestStatus
from tokenmill.sampler.sampler import has_penalties
from tokenmill.scheduler.clients import ClientLedger, ClientUsage, client_of
from tokenmill.scheduler.fair import FairPolicy
from tokenmill.scheduler.plan import PromptLogprobRows, SamplingInputs, ScheduledSeq, StepPlan, StepResult
from tokenmill.scheduler.policy import FCFSPolicy, PriorityPolicy, SchedulingPolicy
from tokenmill.scheduler.sjf import SJFPolicy
from tokenmill.spec.tree import depths


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True
    policy: str = "fcfs"  # fcfs | priority | fair | sjf
    sjf_aging: float = 0.0  # steps of predicted work forgiven per step waited (sjf.py)
    fair_input_weight: float = 1.0  # VTC's charge per prompt token (fair.py)
    fair_output_weight: float = 2.0  # and per output token
    sjf_wait_bound: float = 2.0  # 0: off; else how much later than FCFS a request may be admitted (sjf.py)
    sjf_pause_ratio: float = 4.0  # 0: off; else pause a running request with this many times a waiting one's work
    sjf_pause_budget: float = 1.5  # steps a request may spend paused per step of its own predicted work
    readmit_whole: bool = True  # a preempted request back only when its recompute fits (_fits_recompute)

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        check_scheduling(self.policy, self.sjf_aging, self.fair_input_weight, self.fair_output_weight,
                         self.sjf_wait_bound, self.sjf_pause_ratio, self.sjf_pause_budget)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({self.max_num_batched_tokens} < {self.max_model_len})")


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.policy = make_policy(config)
        self.running: list[Request] = []
        self.paused: list[Request] = []  # out of the batch, holding their KV, in the policy's queue
        self.requests: dict[str, Request] = {}  # every live request, waiting or running
        self.clients = ClientLedger()
        self.num_preemptions = 0
        self.num_pauses = 0
        self.num_steps = 0
        self._finished_ids: list[str] = []  # finished since the last plan
        self._pending_copies: list[tuple[int, int]] = []  # block copies of a failed plan, not yet made
        self._suspects: list[str] = []  # requests of a failed plan, each to be run alone
        # Key rotations after streaming-window evictions, for the step that schedules their request.
        self._shifts: dict[str, KVShift] = {}

    @property
    def waiting(self) -> SchedulingPolicy:
        """The waiting requests (new or preempted): the policy's queue."""
        return self.policy

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def get(self, request_id: str) -> Request | None:
        return self.requests.get(request_id)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        request.arrival_step = self.num_steps
        self.policy.add(request)

    # ---- planning ----

    def schedule(self) -> StepPlan:
        self.num_steps += 1
        self.policy.begin_step(self.num_steps)
        batch: list[tuple[Request, int]] = []  # (request, tokens to compute this step)
        copies, self._pending_copies = self._pending_copies, []
        preempted: list[str] = []
        budget = self.config.max_num_batched_tokens
        suspect = self._next_suspect()
        if suspect is not None:
            suspect.draft_token_ids = []  # alone and plain: a failed step is not retried with guesses
            num_new = self._allocate_or_preempt(suspect, budget, preempted)
            if num_new is not None:
                batch.append((suspect, num_new))
            return self._plan(batch, copies, preempted)
        self.policy.rank(self.running)
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = self._allocate_or_preempt(request, budget, preempted)
            if num_new is None:
                break  # the request preempted itself: everything after it is gone too
            batch.append((request, num_new))
            budget -= num_new
            index += 1
        # Admitting new work in a step that had to preempt would only thrash the cache.
        if not preempted:
            self._admit_waiting(budget, batch, copies, preempted)
        return self._plan(batch, copies, preempted)

    def _allocate_or_preempt(self, request: Request, budget: int, preempted: list[str]) -> int | None:
        """Slots for the request's next tokens within `budget`; the number scheduled, or None if it was preempted.

        Drafts are given up before anyone is preempted for them."""
        room = self.kv_cache.max_drafts(request)
        if room is not None and len(request.draft_token_ids) > room:
            request.draft_token_ids = request.draft_token_ids[:room]
        num_new = self._cap(request, min(request.num_tokens + len(request.draft_token_ids)
                                         - request.num_computed_tokens, budget))
        self._evict(request, num_new)
        # The victim is always the last running request, which is not in this step's batch yet (the loop over
        # running requests has not reached it), so nothing scheduled needs taking back.
        while not self.kv_cache.allocate_slots(request, num_new):
            if request.draft_token_ids:
                request.draft_token_ids = []
                num_new = self._cap(request, min(request.num_tokens - request.num_computed_tokens, budget))
                continue
            if self._reclaim_paused(preempted):
                continue  # a paused request's KV goes before any running request's
            victim = self.running[-1]  # the policy's first victim
            self._preempt(victim)
            preempted.append(victim.request_id)
            if victim is request:
                return None
        return num_new

    def _evict(self, request: Request, num_new: int) -> None:
        """Let the KV manager's eviction policy make room for `num_new` more entries; a rotation it needs goes with
        the step that schedules the request."""
        shift = self.kv_cache.evict(request, num_new)
        if shift is not None:
            self._shifts[request.request_id] = shift

    def _cap(self, request: Request, num_new: int) -> int:
        """At most what the KV manager lets one step add (a streaming window's room)."""
        limit = self.kv_cache.max_new_entries(request)
        return num_new if limit is None else min(num_new, limit)

    def _preempt(self, request: Request) -> None:
        paused = request.status is RequestStatus.PAUSED
        (self.paused if paused else self.running).remove(request)
        request.draft_token_ids = []
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        if not paused:
            self.policy.requeue(request)  # a paused one is in the queue already, and keeps its place there

    def _next_suspect(self) -> Request | None:
        """The next request of a failed plan still to run alone; suspects that finished or were preempted since are
        dropped (a preempted one runs batched again, and is isolated again if it breaks another step)."""
        while self._suspects:
            request = self.requests.get(self._suspects[0])
            if request is not None and request.status is RequestStatus.RUNNING:
                return request
            self._suspects.pop(0)
        return None

    def _admit_waiting(self, budget: int, batch: list[tuple[Request, int]], copies: list[tuple[int, int]],
                       preempted: list[str]) -> None:
        while budget > 0 and (request := self.policy.head()) is not None:
            paused = request.status is RequestStatus.PAUSED
            parent = None if paused else self._fork_parent(request)
            if parent is not None and parent.num_computed_tokens < request.num_prompt_tokens - 1:
                break  # at the head until its sibling's prompt is in the cache
            num_new = None
            seated = len(self.running) < self.config.max_num_seqs
            if seated:
                num_new = (self._resume(request, budget) if paused
                           else self._admit_fork(request, parent, copies) if parent is not None
                           else self._admit(request, budget))
            if num_new is None:
                refund = self._make_room(request, seated, batch, preempted)
                if refund is None:
                    break
                budget += refund
                continue
            self.policy.pop()
            if paused:
                self.paused.remove(request)
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            batch.append((request, num_new))
            budget -= num_new

    def _make_room(self, request: Request, seated: bool, batch: list[tuple[Request, int]],
                   preempted: list[str]) -> int | None:
        """Room for the head `request`, which found no seat (`seated` False) or no KV: a paused request's KV is
        taken back first; then the policy may let the head preempt or pause the back of the running list. Returns
        the budget handed back from this step's batch, or None if nothing was freed."""
        if seated and self._reclaim_paused(preempted, keep=request):
            return 0
        if not self.running:
            return None
        self.policy.rank(self.running)
        victim = self.running[-1]
        if self.policy.may_preempt_for(request, victim):
            refund = _unschedule(victim, batch)
            self._preempt(victim)
            preempted.append(victim.request_id)
            return refund
        if not seated and self.kv_cache.pauses and self.policy.may_pause_for(request, victim):
            refund = _unschedule(victim, batch)
            self._pause(victim)
            return refund
        return None

    def _pause(self, request: Request) -> None:
        self.running.remove(request)
        request.draft_token_ids, request.draft_parents = [], []
        request.status = RequestStatus.PAUSED
        self.num_pauses += 1
        self.paused.append(request)
        self.policy.pause(request)

    def _reclaim_paused(self, preempted: list[str], keep: Request | None = None) -> bool:
        """Preempt the paused request the policy ranks last (other than `keep`), freeing its KV; False if none."""
        candidates = [r for r in self.paused if r is not keep]
        if not candidates:
            return False
        self.policy.rank(candidates)
        self._preempt(candidates[-1])
        preempted.append(candidates[-1].request_id)
        return True

    def _resume(self, request: Request, budget: int) -> int | None:
        """Slots for a paused request's next tokens: its KV is still in place, so it goes on where it stopped."""
        num_new = self._cap(request, min(request.num_tokens - request.num_computed_tokens, budget))
        self._evict(request, num_new)
        return num_new if self.kv_cache.allocate_slots(request, num_new) else None

    def _admit(self, request: Request, budget: int) -> int | None:
        """Allocate for a waiting request after reusing its longest cached prefix; None if it must wait."""
        cached = self.kv_cache.find_cached_prefix(request)
        num_cached = len(cached) * self.kv_cache.block_size
        remaining = request.num_tokens - request.num_computed_tokens - num_cached
        if not self.config.enable_chunked_prefill and remaining > budget:
            return None
        if request.num_preemptions and not self._fits_recompute(request, remaining, cached):
            return None
        num_new = self._cap(request, min(remaining, budget))  # nothing to evict yet: it holds no entries
        if not self.kv_cache.allocate_slots(request, num_new, cached):
            return None
        self.kv_cache.record_lookup(request, cached)
        request.num_computed_tokens += num_cached
        request.num_cached_tokens = num_cached
        return num_new

    def _fits_recompute(self, request: Request, remaining: int, cached: list[int]) -> bool:
        """A preempted request that the policy would rank last comes back only when all it must recompute fits,
        with a block to spare for each running request and itself. Let in a chunk at a time, it would be the first
        victim when the others' next blocks find none free, and recompute again (a thrash that can cost more steps
        than it runs). Alone, ranked before a running request, under an eviction policy that bounds its entries,
        or with `readmit_whole` off, it comes back as any request does."""
        if not self.config.readmit_whole or not self.running or self.kv_cache.max_new_entries(request) is not None:
            return True
        ranked = [*self.running, request]
        self.policy.rank(ranked)
        if ranked[-1] is not request:
            return True
        return self.kv_cache.can_allocate(request, remaining, cached, spare=len(self.running) + 1)

    def _fork_parent(self, request: Request) -> Request | None:
        """The running sibling to fork from, if the request has one; a sibling still prefilling means wait."""
        if request.params.prompt_logprobs is not None or not self.kv_cache.forks:
            # A fork skips its prompt's logits (scoring it means computing it), and the cache may not allow forks
            # (KVCacheManager.forks).
            return None
        parent = self.requests.get(request.fork_of) if request.fork_of else None
        return parent if parent is not None and parent.status is RequestStatus.RUNNING else None

    def _admit_fork(self, request: Request, parent: Request, copies: list[tuple[int, int]]) -> int | None:
        # The child recomputes only its last prompt token (its logits are needed); the KV before it is the parent's.
        shared = request.num_prompt_tokens - 1
        block_copies = self.kv_cache.fork(parent, request, shared)
        if block_copies is None:
            return None
        if not self.kv_cache.allocate_slots(request, 1):
            self.kv_cache.free(request)
            return None
        request.num_computed_tokens = shared
        copies.extend(block_copies)
        request.num_cached_tokens = shared
        return 1

    def _plan(self, batch: list[tuple[Request, int]], copies: list[tuple[int, int]],
              preempted: list[str]) -> StepPlan:
        seqs: list[ScheduledSeq] = []
        token_ids: list[int] = []
        positions: list[int] = []
        slot_mapping: list[int] = []
        lane_copies: list[torch.Tensor] = []
        # Single-token sequences first (a stable partition keeps FCFS order within each part).
        for request, num_new in sorted(batch, key=lambda item: item[1] != 1):
            start, end = request.num_computed_tokens, request.num_computed_tokens + num_new
            real_end = min(end, request.num_tokens)
            drafts = tuple(request.draft_token_ids[: end - real_end])
            parents = tuple(request.draft_parents[: len(drafts)]) if drafts and request.draft_parents else ()
            request.draft_token_ids, request.draft_parents = [], []  # consumed: the next step's are proposed afresh
            entries = self.kv_cache.num_entries(request.request_id)
            samples = 1 + len(drafts) if end >= request.num_tokens else 0
            seqs.append(ScheduledSeq(request.request_id, len(token_ids), num_new, entries + num_new,
                                     tuple(self.kv_cache.block_table(request.request_id)), samples,
                                     _sampling_inputs(request) if samples else None, drafts,
                                     _prompt_logprob_rows(request, start, real_end),
                                     self.kv_cache.lane_tables(request.request_id), parents))
            moves = self.kv_cache.pop_lane_copies(request.request_id)
            if moves is not None:
                lane_copies.append(moves)
            token_ids.extend(request.token_ids(start, real_end))
            token_ids.extend(drafts)
            shift = self.kv_cache.position_shift(request.request_id)
            positions.extend(range(start - shift, real_end - shift))
            # A draft sits at its depth past the last real token (a chain's i-th draft at depth i + 1).
            positions.extend(real_end - 1 - shift + d for d in depths(parents, len(drafts)))
            slot_mapping.extend(self.kv_cache.slots(request.request_id, entries, entries + num_new))
        finished, self._finished_ids = self._finished_ids, []
        # A request preempted since its eviction had its blocks freed: its rotation is moot. One paused since keeps
        # its rotation for the step that resumes it (its keys are not read before then).
        shifts = tuple(self._shifts.pop(r.request_id) for r, _ in batch if r.request_id in self._shifts)
        self._shifts = {rid: shift for rid, shift in self._shifts.items()
                        if (r := self.requests.get(rid)) is not None and r.status is RequestStatus.PAUSED}
        return StepPlan(tuple(seqs), tuple(token_ids), tuple(positions), tuple(slot_mapping), tuple(copies),
                        tuple(finished), tuple(preempted), kv_shifts=shifts,
                        lane_copies=torch.cat(lane_copies) if lane_copies else None,
                        collect_attention=self.kv_cache.collects_attention)

    # ---- outcome ----

    def update(self, plan: StepPlan, result: StepResult | None = None) -> None:
        """Called after the model ran the plan: its tokens now have KV in the cache, except rejected drafts, whose
        entries are rolled back (their slots are written again by the next step)."""
        if len(plan.seqs) == 1 and self._suspects and self._suspects[0] == plan.seqs[0].request_id:
            self._suspects.pop(0)  # it ran alone and passed
        emitted = {s.request_id: len(s.token_ids) for s in result.samples} if result is not None else {}
        for seq in plan.seqs:
            request = self.requests[seq.request_id]
            rejected = len(seq.draft_token_ids) - (emitted.get(seq.request_id, 1) - 1)
            self._charge(request, seq.num_tokens - len(seq.draft_token_ids),
                         emitted.get(seq.request_id, 1) if seq.num_samples else 0)
            request.num_computed_tokens += seq.num_tokens - rejected
            self.kv_cache.commit(request, seq.num_tokens)
            if result is not None and seq.request_id in result.attention_mass:
                self.kv_cache.add_attention(seq.request_id, result.attention_mass[seq.request_id])
            if rejected:
                self.kv_cache.truncate(request, self.kv_cache.num_entries(request.request_id) - rejected)
            self.kv_cache.cache_full_blocks(request)

    def _charge(self, request: Request, num_real: int, num_emitted: int) -> None:
        """Meter the service of a step to the request's client: its prompt tokens computed for the first time (not
        recomputed ones, nor prefix-cache hits, which skip compute) and the tokens it emitted."""
        prompt_end = min(request.num_computed_tokens + num_real, request.num_prompt_tokens)
        new_prompt = max(0, prompt_end - max(request.num_computed_tokens, request.num_prompt_tokens_charged))
        request.num_prompt_tokens_charged = max(request.num_prompt_tokens_charged, prompt_end)
        if new_prompt or num_emitted:
            self.policy.charge(request, new_prompt, num_emitted)
            self.clients.charge(client_of(request), new_prompt, num_emitted)

    def client_usage(self) -> dict[str, ClientUsage]:
        """Per-client service so far (the most recently served clients), with the fair policy's counters."""
        return self.clients.snapshot(self.policy.client_counters())

    def step_failed(self, plan: StepPlan) -> None:
        """Running `plan` raised before `update`: nothing of it counts. Its block copies and finished ids go into the
        next plan again, and each of its requests runs alone next (the model's KV writes are idempotent, so running
        the same tokens again is safe). Its key rotations and H2O row moves are not repeated: the runner applies them
        before the model runs, and a rotation applied twice would move keys twice (a move, read a freed block that
        may have been written since)."""
        self._pending_copies[:0] = plan.block_copies
        self._finished_ids[:0] = plan.finished_request_ids
        if len(plan.seqs) > 1:
            self._suspects.extend(seq.request_id for seq in plan.seqs)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a request (finished or aborted) and free its blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request.status is RequestStatus.RUNNING:
            self.running.remove(request)  # at most max_num_seqs long
        else:
            self.policy.remove(request)
            if request.status is RequestStatus.PAUSED:
                self.paused.remove(request)
        self.kv_cache.free(request)
        self.kv_cache.forget(request)
        request.status = status
        self._finished_ids.append(request_id)
        return request


def _unschedule(request: Request, batch: list[tuple[Request, int]]) -> int:
    """Take the request out of this step's batch; the budget it held (0 if it was not in it)."""
    for i, (scheduled, num_new) in enumerate(batch):
        if scheduled is request:
            del batch[i]
            return num_new
    return 0


def _sampling_inputs(request: Request) -> SamplingInputs:
    params = request.params
    blocked: tuple[int, ...] = ()
    blocked_rows = params.min_tokens - request.num_output_tokens
    if blocked_rows > 0:
        blocked = (*params.stop_token_ids, *(() if params.ignore_eos else sorted(request.eos_token_ids)))
    if not has_penalties(params):
        return SamplingInputs(params, blocked_token_ids=blocked, blocked_rows=max(blocked_rows, 0))
    # Only the output matters to presence/frequency penalties; repetition also reads the prompt.
    prompt = tuple(request.prompt_token_ids) if params.repetition_penalty != 1.0 else ()
    return SamplingInputs(params, prompt, tuple(request.output_token_ids), blocked, max(blocked_rows, 0))


def _prompt_logprob_rows(request: Request, start: int, end: int) -> PromptLogprobRows | None:
    """The rows of tokens [start, end) that score a prompt token not scored yet: row p predicts prompt token p + 1."""
    if request.params.prompt_logprobs is None:
        return None
    first = max(start, request.num_prompt_logprobs)
    last = min(end, request.num_prompt_tokens - 1)
    if first >= last:
        return None
    return PromptLogprobRows(first - start, tuple(request.prompt_token_ids[first + 1 : last + 1]),
                             request.params.prompt_logprobs)


def make_policy(config: SchedulerConfig) -> SchedulingPolicy:
    if config.policy == "priority":
        return PriorityPolicy()
    if config.policy == "fair":
        return FairPolicy(config.fair_input_weight, config.fair_output_weight)
    if config.policy == "sjf":
        return SJFPolicy(config.max_num_batched_tokens, config.max_model_len, config.sjf_aging, config.sjf_wait_bound,
                         config.sjf_pause_ratio, config.sjf_pause_budget)
    return FCFSPolicy()
