"""Serving metrics from per-request timelines, as `../shared/benchmarking.md` defines them. Pure functions.

A request's timeline is a `RequestRecord`: when it was sent, when each chunk that carried generated tokens arrived
and how many tokens it carried (counted from the server's reported usage, not from text), and when the response
ended. Times are `time.perf_counter()` seconds; every summary below is in milliseconds or per-second rates.

- TTFT: send → first chunk carrying a generated token.
- E2E latency: send → the chunk carrying the last generated token.
- TPOT: `(e2e − ttft) / (output_tokens − 1)`, only for requests with more than one output token.
- ITL, per token: a chunk carrying k tokens that arrives g seconds after the previous token-carrying chunk gives
  one gap of g (its first token) and k − 1 gaps of 0 (its other tokens arrived in the same instant); the extra
  tokens of the very first chunk give gaps of 0 too. So a request with n output tokens has n − 1 ITLs, they sum to
  `e2e − ttft`, and their mean is its TPOT. The wait before a burst stays visible in the tail percentiles instead
  of being spread over the burst (g/k each would hide a 300 ms stall behind three 100 ms "gaps").
- Throughput: over the wall time from the first send to the last completion (the end of the last response):
  requests/s, output tokens/s, total (input + output) tokens/s.
- Goodput: requests meeting every SLO, per second of the same wall time; SLO attainment = their fraction.
- Percentiles: linear interpolation between order statistics (numpy's default "linear" method).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0)


@dataclass
class RequestRecord:
    """One request's timeline and token counts, as the client saw them."""

    send_time: float
    prompt_tokens: int
    output_tokens: int = 0  # the server's final count (usage), else the sum of chunk_tokens
    chunk_times: list[float] = field(default_factory=list)  # arrival of each chunk that carried >= 1 new token
    chunk_tokens: list[int] = field(default_factory=list)  # new tokens in that chunk
    end_time: float | None = None  # the response ended (stream closed / generate returned)
    success: bool = True
    error: str | None = None
    expected_output_tokens: int | None = None  # what the workload asked for (max_tokens)
    token_counting: str = "usage"  # usage: per-chunk server usage; chunks: one token per content chunk; engine
    generated_text: str = ""  # kept for multi-turn follow-ups; not written to JSON
    scheduled_time: float | None = None  # when the arrival process released it (before any concurrency wait)
    session: int = 0
    turn: int = 0

    def add_chunk(self, when: float, tokens: int) -> None:
        if tokens > 0:
            self.chunk_times.append(when)
            self.chunk_tokens.append(tokens)

    def to_json(self) -> dict[str, Any]:
        return {"send_time": self.send_time, "scheduled_time": self.scheduled_time, "end_time": self.end_time,
                "prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens,
                "expected_output_tokens": self.expected_output_tokens, "success": self.success, "error": self.error,
                "token_counting": self.token_counting, "session": self.session, "turn": self.turn,
                "ttft_s": ttft(self), "tpot_s": tpot(self), "e2e_s": e2e_latency(self),
                "chunk_offsets_s": [t - self.send_time for t in self.chunk_times], "chunk_tokens": self.chunk_tokens}


# ---- per request --------------------------------------------------------------------------------------------------


def ttft(r: RequestRecord) -> float | None:
    """Time to first token (s): send → first chunk carrying a generated token; None if none arrived."""
    return r.chunk_times[0] - r.send_time if r.chunk_times else None


def e2e_latency(r: RequestRecord) -> float | None:
    """End-to-end latency (s): send → the chunk carrying the last generated token."""
    return r.chunk_times[-1] - r.send_time if r.chunk_times else None


def tpot(r: RequestRecord) -> float | None:
    """Time per output token (s) after the first: (e2e − ttft) / (output_tokens − 1); None for ≤ 1 token."""
    first, last = ttft(r), e2e_latency(r)
    if first is None or last is None or r.output_tokens < 2:
        return None
    return (last - first) / (r.output_tokens - 1)


def inter_token_latencies(r: RequestRecord) -> list[float]:
    """Per-token gaps (s): a k-token chunk after a gap g gives [g, 0, ..., 0] (see the module docstring)."""
    gaps: list[float] = []
    for i, (when, count) in enumerate(zip(r.chunk_times, r.chunk_tokens, strict=True)):
        if i:
            gaps.append(when - r.chunk_times[i - 1])
        gaps.extend([0.0] * (count - 1))
    return gaps


def decode_tokens_per_s(r: RequestRecord) -> float | None:
    """One request's decode speed: tokens after the first / time after the first (= 1 / TPOT)."""
    value = tpot(r)
    return 1.0 / value if value else None


# ---- statistics ---------------------------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0 ≤ q ≤ 100) with linear interpolation between the closest ranks (numpy 'linear')."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(values: Iterable[float | None], scale: float = 1.0) -> dict[str, float | int | None]:
    """count, mean, median, p90, p99, min, max of the non-None values, each multiplied by `scale`."""
    data = [v * scale for v in values if v is not None]
    if not data:
        return {"count": 0, "mean": None, "median": None, "p90": None, "p99": None, "min": None, "max": None}
    return {"count": len(data), "mean": math.fsum(data) / len(data), "median": percentile(data, 50),
            "p90": percentile(data, 90), "p99": percentile(data, 99), "min": min(data), "max": max(data)}


# ---- SLOs and whole runs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SLO:
    """Per-request latency objectives in seconds; None means no objective on that metric."""

    ttft_s: float | None = None
    tpot_s: float | None = None
    e2e_s: float | None = None

    @property
    def empty(self) -> bool:
        return self.ttft_s is None and self.tpot_s is None and self.e2e_s is None

    def met_by(self, r: RequestRecord) -> bool:
        """A failed request never meets it; a one-token output has no TPOT and passes the TPOT objective."""
        if not r.success or not r.chunk_times:
            return False
        checks = ((self.ttft_s, ttft(r)), (self.tpot_s, tpot(r)), (self.e2e_s, e2e_latency(r)))
        return all(limit is None or value is None or value <= limit for limit, value in checks)

    def to_json(self) -> dict[str, float | None]:
        return {"ttft_ms": _ms(self.ttft_s), "tpot_ms": _ms(self.tpot_s), "e2e_ms": _ms(self.e2e_s)}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def wall_time(records: Sequence[RequestRecord]) -> float:
    """First send → last completion (s), over every request that was sent."""
    if not records:
        return 0.0
    start = min(r.send_time for r in records)
    end = max((r.end_time if r.end_time is not None else (r.chunk_times[-1] if r.chunk_times else r.send_time))
              for r in records)
    return end - start


def compute_metrics(records: Sequence[RequestRecord], slo: SLO | None = None) -> dict[str, Any]:
    """Everything the report shows for one run: counts, throughputs, goodput and latency summaries (ms)."""
    done = [r for r in records if r.success]
    duration = wall_time(records)
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: None)
    input_tokens = sum(r.prompt_tokens for r in done)
    output_tokens = sum(r.output_tokens for r in done)
    itls = [gap for r in done for gap in inter_token_latencies(r)]
    counting = sorted({r.token_counting for r in done})
    metrics: dict[str, Any] = {
        "num_requests": len(records), "completed": len(done), "failed": len(records) - len(done),
        "duration_s": duration, "input_tokens": input_tokens, "output_tokens": output_tokens,
        "request_throughput": per_s(len(done)), "output_throughput": per_s(output_tokens),
        "total_token_throughput": per_s(input_tokens + output_tokens),
        "ttft_ms": summarize((ttft(r) for r in done), 1000), "tpot_ms": summarize((tpot(r) for r in done), 1000),
        "itl_ms": summarize(itls, 1000), "e2e_ms": summarize((e2e_latency(r) for r in done), 1000),
        "decode_tok_per_s": summarize(decode_tokens_per_s(r) for r in done),
        "token_counting": counting,
        "output_length_mismatches": sum(1 for r in done if r.expected_output_tokens is not None
                                        and r.output_tokens != r.expected_output_tokens),
    }
    if slo is not None and not slo.empty:
        good = sum(1 for r in records if slo.met_by(r))
        metrics["slo"] = slo.to_json()
        metrics["goodput"] = per_s(good)
        metrics["slo_attainment"] = good / len(records) if records else None
    errors = [r.error for r in records if not r.success and r.error]
    if errors:
        metrics["first_errors"] = errors[:3]
    return metrics


def passes_slo(metrics: dict[str, Any], attainment: float) -> bool:
    """True when no request failed and at least `attainment` (e.g. 0.99) of the requests met every SLO."""
    value = metrics.get("slo_attainment")
    return metrics["failed"] == 0 and value is not None and value >= attainment
