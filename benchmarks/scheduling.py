"""Scheduling policies against FCFS on the real model, with timed arrivals (open loop) driven in-process.

- fair: VTC's two-client setup. Client A sends at rate r, client B at `--heavy-ratio` times r; together they overload
  the engine, so both stay backlogged. Service W(t) = w_in * prompt tokens (counted when the first token comes out)
  + w_out * output tokens. Reported: the largest service gap between the clients over the time both are backlogged,
  VTC's bound 2 * max(w_in * L_input, w_out * M) (M = the KV cache's tokens), output throughput against FCFS, and a
  PNG of the service curves.
- priority: 2x overload, `--high-fraction` of the requests at high priority. Reported: their p99 TTFT under FCFS
  and under the priority policy, against the same high-priority arrivals alone (unloaded).
- sjf: ShareGPT prompts (cut at --sharegpt-max-input tokens) and reply lengths scaled by --sharegpt-output-scale,
  Poisson at each of `--sjf-load` times the capacity. Reported: mean and p99 latency, the longest wait (arrival to
  first token), per request its wait and its latency against FCFS's, the longest gap between two tokens of a
  stream, and how many pauses (`--sjf-pause-ratio`).

Capacity (requests/s of each workload's shape) is measured first with every request sent at once under FCFS. Runs
of the policies alternate (FCFS, policy, FCFS, policy) when --repeats > 1.

    .venv/bin/python benchmarks/scheduling.py [--experiments fair,priority,sjf] [--repeats 1]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.bench.machine import machine_description
from tokenmill.bench.metrics import percentile
from tokenmill.bench.report import write_json
from tokenmill.bench.workloads import TextSampler, sharegpt
from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams
from tokenmill.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass
class Arrival:
    time: float
    prompt: list[int]
    max_tokens: int
    client: str = "A"
    priority: int = 0


@dataclass
class Trace:
    arrival: Arrival
    token_times: list[float] = field(default_factory=list)

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival.time if self.token_times else None

    @property
    def latency(self) -> float | None:
        done = len(self.token_times) == self.arrival.max_tokens
        return self.token_times[-1] - self.arrival.time if done else None


def make_engine(args: argparse.Namespace, policy: str, num_kv_blocks: int | None = None) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=args.dtype, num_threads=args.threads, max_num_seqs=args.max_num_seqs,
                                  num_kv_blocks=num_kv_blocks or args.num_kv_blocks, scheduling_policy=policy,
                                  sjf_aging=args.sjf_aging, sjf_wait_bound=args.sjf_wait_bound,
                                  sjf_pause_ratio=args.sjf_pause_ratio, sjf_pause_budget=args.sjf_pause_budget))


def drive(engine: LLMEngine, arrivals: list[Arrival], horizon: float | None = None, tags: bool = True,
          until: Callable[[list[Trace]], bool] | None = None) -> tuple[list[Trace], float]:
    """Send each arrival at its time, step until all finish, or until `horizon` s or `until(traces)` (checked every
    second), when the rest is aborted; returns the traces and the wall time. `tags`: pass client and priority (FCFS
    refuses non-zero priorities)."""
    traces = {f"q{i}": Trace(a) for i, a in enumerate(arrivals)}
    pending = list(traces.items())
    start = time.perf_counter()
    checked = 0.0
    while True:
        now = time.perf_counter() - start
        if until is not None and now - checked >= 1.0:
            checked = now
            if until(list(traces.values())):
                horizon = now
        if horizon is not None and now >= horizon:
            for rid in traces:
                engine.abort(rid)  # unknown or finished ids are ignored
            break
        while pending and pending[0][1].arrival.time <= now:
            rid, trace = pending.pop(0)
            a = trace.arrival
            engine.add_request(a.prompt, SamplingParams(temperature=0.0, max_tokens=a.max_tokens, ignore_eos=True),
                               request_id=rid, client_id=a.client if tags else None,
                               priority=a.priority if tags else 0)
        if not engine.has_unfinished_requests():
            if not pending:
                break
            time.sleep(max(0.0, pending[0][1].arrival.time - now))
            continue
        outputs = engine.step()
        stamp = time.perf_counter() - start
        for out in outputs:
            traces[out.request_id].token_times += [stamp] * len(out.delta_token_ids)
    return list(traces.values()), time.perf_counter() - start


def capacity(args: argparse.Namespace, arrivals: list[Arrival], num_kv_blocks: int | None = None) -> float:
    """Requests/s of this shape with every request sent at once (FCFS)."""
    engine = make_engine(args, "fcfs", num_kv_blocks)
    _, seconds = drive(engine, [Arrival(0.0, a.prompt, a.max_tokens) for a in arrivals])
    return len(arrivals) / seconds


def poisson_times(rng: np.random.Generator, rate: float, duration: float) -> list[float]:
    times, t = [], 0.0
    while (t := t + rng.exponential(1.0 / rate)) < duration:
        times.append(t)
    return times


# ---- fair ------------------------------------------------------------------------------------------------------


def service_curves(traces: list[Trace], w_in: float, w_out: float) -> tuple[list[float], dict[str, list[float]]]:
    """Cumulative service per client at every token time."""
    events = sorted(((t, i, tr) for tr in traces for i, t in enumerate(tr.token_times)), key=lambda e: e[:2])
    clients = sorted({tr.arrival.client for tr in traces})
    totals = dict.fromkeys(clients, 0.0)
    times: list[float] = []
    curves: dict[str, list[float]] = {c: [] for c in clients}
    for t, index, trace in events:
        totals[trace.arrival.client] += w_out + (w_in * len(trace.arrival.prompt) if index == 0 else 0.0)
        times.append(t)
        for c in clients:
            curves[c].append(totals[c])
    return times, curves


def backlogged_window(traces: list[Trace], clients: list[str], horizon: float) -> tuple[float, float, float]:
    """From the first to the last moment (on a 0.1 s grid) at which every client has a request waiting (arrived,
    no token yet), and the fraction of that window's grid points at which they all do (VTC's bound holds over
    intervals where both clients stay backlogged: a fraction below 1 means the window is not one)."""
    grid = np.arange(0.0, horizon, 0.1)
    both = []
    for t in grid:
        waiting = {tr.arrival.client for tr in traces
                   if tr.arrival.time <= t and (not tr.token_times or tr.token_times[0] > t)}
        both.append(all(c in waiting for c in clients))
    hits = np.flatnonzero(both)
    if not len(hits):
        return 0.0, 0.0, 0.0
    return float(grid[hits[0]]), float(grid[hits[-1]]), len(hits) / (hits[-1] - hits[0] + 1)


def fair_experiment(args: argparse.Namespace, tokens: TextSampler) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed)
    shape = [Arrival(0.0, tokens.tokenizer.encode(tokens.text(rng, args.input_len)), args.output_len)
             for _ in range(2 * args.max_num_seqs)]
    cap = capacity(args, shape)
    # A asks for load / (1 + ratio) of the capacity and B for ratio times that: above half each, both stay backlogged.
    light = args.fair_load * cap / (1 + args.heavy_ratio)
    arrivals = [Arrival(t, shape[i % len(shape)].prompt, args.output_len, client)
                for client, rate in (("A", light), ("B", light * args.heavy_ratio))
                for i, t in enumerate(poisson_times(rng, rate, args.horizon))]
    arrivals.sort(key=lambda a: a.time)
    w_in, w_out = 1.0, 2.0
    bound = 2 * max(w_in * args.input_len, w_out * args.num_kv_blocks * 16)
    runs: list[dict[str, Any]] = []
    for repeat in range(args.repeats):
        for policy in ("fcfs", "fair"):
            traces, _ = drive(make_engine(args, policy), arrivals, horizon=args.horizon)
            times, curves = service_curves(traces, w_in, w_out)
            t0, t1, coverage = backlogged_window(traces, ["A", "B"], args.horizon)
            window = [i for i, t in enumerate(times) if t0 <= t <= t1]
            base = window[0] if window else 0
            gaps = [abs((curves["A"][i] - curves["A"][base]) - (curves["B"][i] - curves["B"][base])) for i in window]
            out_tokens = sum(len(tr.token_times) for tr in traces)
            runs.append({"policy": policy, "repeat": repeat, "max_gap": max(gaps, default=0.0),
                         "backlogged_s": [t0, t1], "backlogged_fraction": coverage,
                         "output_tok_s": out_tokens / args.horizon,
                         "service": {c: curves[c][-1] for c in curves},
                         "curve": {"t": times[::20], **{c: v[::20] for c, v in curves.items()}}})
            print(f"fair/{policy} #{repeat}: gap {runs[-1]['max_gap']:.0f} (bound {bound:.0f}) over {t0:.1f}-"
                  f"{t1:.1f}s, both backlogged {coverage:.0%} of it, "
                  f"{runs[-1]['output_tok_s']:.1f} out tok/s, service A {curves['A'][-1]:.0f} B {curves['B'][-1]:.0f}")
    return {"capacity_rps": cap, "rates_rps": {"A": light, "B": light * args.heavy_ratio}, "bound": bound,
            "weights": [w_in, w_out], "runs": runs}


def plot_service(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, policy in zip(axes, ("fcfs", "fair"), strict=True):
        run = next(r for r in result["runs"] if r["policy"] == policy)
        for client in ("A", "B"):
            ax.plot(run["curve"]["t"], run["curve"][client], label=f"client {client}")
        ax.set_title(f"{policy}: max gap {run['max_gap']:.0f} (VTC bound {result['bound']:.0f})")
        ax.set_xlabel("time (s)")
        ax.legend()
    axes[0].set_ylabel("service (w_in * input + w_out * output tokens)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- priority --------------------------------------------------------------------------------------------------


def priority_experiment(args: argparse.Namespace, tokens: TextSampler) -> dict[str, Any]:
    rng = np.random.default_rng(args.seed + 1)
    shape = [Arrival(0.0, tokens.tokenizer.encode(tokens.text(rng, args.input_len)), args.output_len)
             for _ in range(2 * args.max_num_seqs)]
    cap = capacity(args, shape)
    times = poisson_times(rng, 2.0 * cap, args.priority_horizon)
    arrivals = [Arrival(t, shape[i % len(shape)].prompt, args.output_len, "A",
                        0 if rng.random() < args.high_fraction else 1) for i, t in enumerate(times)]
    high = [a for a in arrivals if a.priority == 0]

    def high_ttfts(traces: list[Trace]) -> list[float]:
        return [tr.ttft for tr in traces if tr.arrival.priority == 0 and tr.ttft is not None]

    results: dict[str, Any] = {"capacity_rps": cap, "rate_rps": 2.0 * cap, "num_high": len(high),
                               "num_requests": len(arrivals)}
    alone, _ = drive(make_engine(args, "priority"), high)
    results["unloaded"] = summary(high_ttfts(alone))
    def high_done(traces: list[Trace]) -> bool:
        return all(tr.latency is not None for tr in traces if tr.arrival.priority == 0)

    for repeat in range(args.repeats):
        for policy in ("fcfs", "priority"):
            # The run ends when the last high-priority request is done: the low-priority backlog is then aborted.
            traces, _ = drive(make_engine(args, policy), arrivals, tags=policy == "priority", until=high_done)
            ttfts = high_ttfts(traces)
            results[f"{policy}#{repeat}"] = {**summary(ttfts), "finished_high": len(ttfts)}
            print(f"priority/{policy} #{repeat}: high-priority TTFT p99 {results[f'{policy}#{repeat}']['p99']:.2f}s "
                  f"({len(ttfts)}/{len(high)} got a token; unloaded p99 {results['unloaded']['p99']:.2f}s)")
    return results


def summary(values: list[float]) -> dict[str, float]:
    if not values:
        return {"mean": float("nan"), "p50": float("nan"), "p99": float("nan"), "max": float("nan")}
    return {"mean": statistics.fmean(values), "p50": percentile(values, 50), "p99": percentile(values, 99),
            "max": max(values)}


# ---- sjf -------------------------------------------------------------------------------------------------------


def sharegpt_shape(tokenizer: Tokenizer, num_requests: int, seed: int, max_input: int,
                   output_scale: float) -> list[tuple[list[int], int]]:
    """(prompt ids, max_tokens) of ShareGPT first turns: prompts cut at `max_input` tokens, replies scaled."""
    workload = sharegpt(tokenizer, DATA / "sharegpt_v3_first_turn.jsonl", num_requests, seed)
    return [(tokenizer.encode(s.turns[0].prompt)[:max_input], max(2, round(s.turns[0].output_len * output_scale)))
            for s in workload.sessions]


def arrival_times(seed: int, rate: float, n: int) -> list[float]:
    """n Poisson arrivals at `rate` per second, the first at 0 (the same seed gives the same sequence, scaled)."""
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [float(t) for t in np.cumsum(gaps) - gaps[0]]


def wait_ratios(fcfs: list[float], other: list[float]) -> dict[str, Any]:
    """Per request (the same arrivals in both runs): its wait under another policy over its wait under FCFS, for
    requests that waited at least a second under FCFS (a ratio to a near-zero wait says nothing)."""
    ratios = [b / a for a, b in zip(fcfs, other, strict=True) if a >= 1.0]
    return {"max": max(ratios, default=None), "over_3x": sum(r > 3 for r in ratios), "compared": len(ratios)}


def latency_ratios(fcfs: list[float], other: list[float]) -> dict[str, Any]:
    """Per request (the same arrivals in both runs): its latency under another policy over its latency under FCFS;
    what pausing a running request costs it shows here, not in its wait for the first token."""
    ratios = [b / a for a, b in zip(fcfs, other, strict=True)]
    return {"max": max(ratios), "over_2x": sum(r > 2 for r in ratios), "over_3x": sum(r > 3 for r in ratios)}


def longest_gap(trace: Trace) -> float:
    """The longest time between two of the request's tokens: a paused stream's stall."""
    times = trace.token_times
    return max((b - a for a, b in itertools.pairwise(times)), default=0.0)


def sjf_experiment(args: argparse.Namespace, tokens: TextSampler) -> dict[str, Any]:
    shape = [Arrival(0.0, prompt, max_tokens) for prompt, max_tokens in sharegpt_shape(
        tokens.tokenizer, args.sjf_requests, args.seed, args.sharegpt_max_input, args.sharegpt_output_scale)]
    cap = capacity(args, shape, args.sjf_kv_blocks)
    results: dict[str, Any] = {"capacity_rps": cap, "output_lens": summary([float(a.max_tokens) for a in shape])}
    for load in (float(x) for x in args.sjf_load.split(",")):
        times = arrival_times(args.seed + 2, load * cap, len(shape))
        arrivals = [Arrival(t, a.prompt, a.max_tokens) for t, a in zip(times, shape, strict=True)]
        results[f"load {load:g}"] = sjf_runs(args, arrivals, f"load {load:g}")
    return results


def sjf_runs(args: argparse.Namespace, arrivals: list[Arrival], label: str) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for repeat in range(args.repeats):
        for policy in ("fcfs", "sjf"):
            engine = make_engine(args, policy, args.sjf_kv_blocks)
            traces, seconds = drive(engine, arrivals)
            waits = [tr.ttft for tr in traces if tr.ttft is not None]
            latencies = [tr.latency for tr in traces if tr.latency is not None]
            if len(latencies) < len(traces):
                raise RuntimeError("a request did not finish its max_tokens")  # ignore_eos: every one should
            gap, pauses = max(longest_gap(tr) for tr in traces), engine.stats().num_pauses
            results[f"{policy}#{repeat}"] = {"latency": summary(latencies), "wait": summary(waits),
                                             "waits": waits, "latencies": latencies, "seconds": seconds,
                                             "longest_gap": gap, "pauses": pauses}
            print(f"sjf/{label}/{policy} #{repeat}: latency mean {statistics.fmean(latencies):.1f}s p99 "
                  f"{percentile(latencies, 99):.1f}s, longest wait {max(waits):.1f}s, longest gap between tokens "
                  f"{gap:.1f}s, {pauses} pauses, {seconds:.0f}s")
        fcfs, sjf = results[f"fcfs#{repeat}"], results[f"sjf#{repeat}"]
        results[f"wait_ratio#{repeat}"] = wait_ratios(fcfs["waits"], sjf["waits"]) | {
            "longest_over_longest": max(sjf["waits"]) / max(fcfs["waits"])}
        results[f"latency_ratio#{repeat}"] = latency_ratios(fcfs["latencies"], sjf["latencies"])
        print(f"sjf/{label}/wait ratios #{repeat}: {results[f'wait_ratio#{repeat}']}; latency ratios: "
              f"{results[f'latency_ratio#{repeat}']}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiments", default="fair,priority,sjf")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int, default=128, help="of 16 tokens: M in VTC's bound")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--horizon", type=float, default=60.0, help="seconds of arrivals and of the run (fair)")
    parser.add_argument("--priority-horizon", type=float, default=40.0, help="seconds of arrivals (priority)")
    parser.add_argument("--fair-load", type=float, default=3.0, help="both clients' load, times the capacity")
    parser.add_argument("--heavy-ratio", type=float, default=3.0, help="client B's rate over client A's")
    parser.add_argument("--high-fraction", type=float, default=0.2)
    parser.add_argument("--sjf-requests", type=int, default=48)
    parser.add_argument("--sjf-load", default="1.5,3", help="arrival rates, times the capacity (comma-separated)")
    parser.add_argument("--sjf-aging", type=float, default=0.0, help="sjf_aging, as the engine")
    parser.add_argument("--sjf-wait-bound", type=float, default=2.0, help="sjf_wait_bound (0: off), as the engine")
    parser.add_argument("--sjf-pause-ratio", type=float, default=4.0, help="sjf_pause_ratio (0: off), as the engine")
    parser.add_argument("--sjf-pause-budget", type=float, default=1.5, help="sjf_pause_budget, as the engine")
    parser.add_argument("--sjf-kv-blocks", type=int, default=1024, help="ShareGPT requests are longer")
    parser.add_argument("--sharegpt-max-input", type=int, default=512)
    parser.add_argument("--sharegpt-output-scale", type=float, default=0.25,
                        help="ShareGPT reply lengths times this (the mix of short and long kept, the run shorter)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scheduling.json"))
    args = parser.parse_args()
    report: dict[str, Any] = {"machine": machine_description(), "args": {k: str(v) for k, v in vars(args).items()}}
    tokens = TextSampler(make_engine(args, "fcfs").tokenizer)
    experiments = {"fair": fair_experiment, "priority": priority_experiment, "sjf": sjf_experiment}
    for name in args.experiments.split(","):
        report[name] = experiments[name](args, tokens)
        write_json(report, args.out)
    if "fair" in report:
        plot_service(report["fair"], args.out.with_name("scheduling_service.png"))
    print(json.dumps({k: v for k, v in report.items() if k != "machine"}, default=str)[:2000])


if __name__ == "__main__":
    main()
