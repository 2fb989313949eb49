"""One token budget per step: running requests first (oldest first), then waiting ones (FCFS).

Every request only asks for `num_tokens - num_computed_tokens` more tokens of compute, capped by what is left of the
step's budget. Prefill, chunked prefill, decode and recompute after preemption are all that one rule.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from tokenmill.request import Request, RequestStatus
from tokenmill.scheduler.kv_cache_manager import KVCacheManager


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048
    enable_chunked_prefill: bool = True

    def __post_init__(self) -> None:
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_model_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValueError("without chunked prefill, max_num_batched_tokens must be >= max_model_len "
                             f"({self.max_num_batched_tokens} < {self.max_model_len})")


@dataclass
class ScheduledRequest:
    request: Request
    num_new_tokens: int
    block_table: list[int]

    @property
    def samples(self) -> bool:
        """Whether this step brings the request up to date, so its last position yields a new token."""
        return self.request.num_computed_tokens + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    block_copies: list[tuple[int, int]] = field(default_factory=list)  # (src, dst): copy-on-write of forks

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, config: SchedulerConfig, kv_cache: KVCacheManager) -> None:
        self.config = config
        self.kv_cache = kv_cache
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions = 0

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        scheduled_ids: set[str] = set()
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self._allocate_or_preempt(request, num_new, out):
                break  # the request preempted itself: everything after it is gone too
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv_cache.block_table(request.request_id)))
            scheduled_ids.add(request.request_id)
            budget -= num_new
            index += 1
        # Admitting new work in a step that had to preempt would only thrash the cache.
        if not out.preempted:
            self._admit_waiting(budget, out)
        return out

    def _allocate_or_preempt(self, request: Request, num_new: int, out: SchedulerOutput) -> bool:
        while not self.kv_cache.allocate_slots(request, num_new):
            victim = self.running[-1]  # FCFS: the latest arrival yields first
            self._preempt(victim)
            out.preempted.append(victim.request_id)
            out.scheduled = [s for s in out.scheduled if s.request is not victim]
            if victim is request:
                return False
        return True

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv_cache.free(request)
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(request)

    def _admit_waiting(self, budget: int, out: SchedulerOutput) -> None:
        while self.waiting and budget > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting[0]
            parent = self._fork_parent(request)
            num_new = self._admit_fork(request, parent, out) if parent is not None else self._admit(request, budget)
            if num_new is None:
                break
            self.waiting.popleft()
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, self.kv_cache.block_table(request.request_id)))
            budget -= num_new

    def _admit(self, request: Request, budget: int) -> int | None:
        """Allocate for a waiting request after reusing its longest cached prefix; None if it must wait."""
        cached = self.kv_cache.find_cached_prefix(request)
        num_cached = len(cached) * self.kv_cache.block_size
        remaining = request.num_tokens - request.num_computed_tokens - num_cached
        if not self.config.enable_chunked_prefill and remaining > budget:
            return None
        num_new = min(remaining, budget)
        if not self.kv_cache.allocate_slots(request, num_new, cached):
            return None
        self.kv_cache.record_lookup(request, cached)
        request.num_computed_tokens += num_cached
        request.num_cached_tokens = num_cached
        return num_new

    def _fork_parent(self, request: Request) -> Request | None:
        """The running sibling to fork from, if the request has one; a sibling still prefilling means wait."""
        parent = self.requests.get(request.fork_of) if request.fork_of else None
        return parent if parent is not None and parent.status is RequestStatus.RUNNING else None

    def _admit_fork(self, request: Request, parent: Request, out: SchedulerOutput) -> int | None:
        # The child recomputes only its last prompt token (its logits are needed); the KV before it is the parent's.
        shared = request.num_prompt_tokens - 1
        if parent.num_computed_tokens < shared:
            return None  # FCFS: wait at the head until the sibling's prompt is in the cache
        copies = self.kv_cache.fork(parent, request, shared)
        if copies is None:
            return None
        request.num_computed_tokens = shared
        if not self.kv_cache.allocate_slots(request, 1):
            self.kv_cache.free(request)
            request.num_computed_tokens = 0
            return None
        out.block_copies.extend(copies)
        request.num_cached_tokens = shared
        return 1

    def update_computed(self, out: SchedulerOutput) -> None:
        """Called after the model ran the step: the scheduled tokens now have KV in the cache."""
        for item in out.scheduled:
            item.request.num_computed_tokens += item.num_new_tokens
            self.kv_cache.cache_full_blocks(item.request)

    def finish(self, request_id: str, status: RequestStatus) -> Request | None:
        """Remove a request (finished or aborted) and free its blocks. Unknown ids are ignored."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        if request in self.running:
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        self.kv_cache.free(request)
        self.kv_cache.forget(request)
        request.status = status
        return request
