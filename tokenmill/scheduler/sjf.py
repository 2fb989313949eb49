"""Shortest predicted remaining work first, with aging so that long requests are not starved.

The prediction, in steps: the tokens still to compute (prompt, or prompt and output again after a preemption)
divided by the step's token budget, plus the output tokens the request may still produce, which is its own bound
`max_tokens` capped by the context. A client that sets `max_tokens` close to what it needs is ranked by its true
length; one that leaves the default bound is ranked by that bound. No output-length model is learned.

Aging: a waiting request's standing improves by `aging` steps of work for every scheduler step it has waited since
it arrived. Ranked at arrival step a by `work + aging * a`, which orders requests exactly as `work - aging * waited`
does at any later step, so the key is fixed and the queue is a heap. A request with work W arriving at step a is
passed only by requests arriving before step a + W / aging; none waits forever.
"""

from __future__ import annotations

from tokenmill.request import Request
from tokenmill.scheduler.policy import KeyedPolicy


class SJFPolicy(KeyedPolicy):
    name = "sjf"

    def __init__(self, max_num_batched_tokens: int, max_model_len: int, aging: float = 1.0) -> None:
        super().__init__()
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.aging = aging

    def predicted_work(self, request: Request) -> float:
        to_compute = request.num_tokens - request.num_computed_tokens
        outputs_left = min(request.params.max_tokens - request.num_output_tokens,
                           self.max_model_len - request.num_tokens)
        return to_compute / self.max_num_batched_tokens + max(outputs_left, 0)

    def key(self, request: Request) -> tuple[float, ...]:
        return (self.predicted_work(request) + self.aging * request.arrival_step,)

    def rank(self, running: list[Request]) -> None:
        # The most work left last: it yields first when KV runs out.
        running.sort(key=self.predicted_work)
