"""SJF's trade-off between mean latency and each request's wait, swept in simulated time (tokenmill.bench.schedsim).

1. Fit: the ShareGPT requests of `benchmarks/scheduling.py --experiments sjf` (same filter, seed and prompt cut;
   replies at their own lengths by default, where scheduling.py scales them by 0.25) sent at once to the real engine
   under FCFS, every step timed; a linear step-cost model is fitted on those steps (the first few, warm-up, left
   out), and the simulated makespan of the same run is printed beside the measured one.
2. Sweep: Poisson arrivals at each `--load` times the capacity (the same arrivals as scheduling.py), replayed through
   the engine's scheduler under FCFS, SJF with each aging and wait bound, SJF with pausing (each `--pause` ratio and
   budget, without aging, at each `--pause-bound`), and `DeadlineSJF` due at arrival + b times each request's own
   queueing time (arrival to admission) in the simulated FCFS run: a wait bound whose estimate of the FCFS wait is
   exact. Each line: mean latency change, per request the largest wait (to the first token) and latency over its
   FCFS ones, and the longest time a request spent out of the batch after its admission (paused).
3. `--validate AGING,BOUND[,RATIO:BUDGET]`: the first load on the real engine too (FCFS, then SJF with that aging,
   wait bound and pausing (off unless given), through scheduling.py's drive loop), to set beside its simulation.

    .venv/bin/python benchmarks/scheduling_sim.py [--requests 192] [--load 1.5,2,3] [--validate 0,2,4:1.5]
        [--pause 4:1.5,4:1] [--pause-bound 2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from tokenmill.bench.machine import machine_description
from tokenmill.bench.metrics import percentile
from tokenmill.bench.report import write_json
from tokenmill.bench.schedsim import FEATURES, DeadlineSJF, SimRequest, SimRun, Simulation, StepCost, timed_steps
from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams
from tokenmill.scheduler.scheduler import SchedulerConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scheduling  # noqa: E402  (the real-engine drive loop, for --validate)

WARMUP_STEPS = 8


def make_engine(args: argparse.Namespace, policy: str = "fcfs", aging: float = 0.0, bound: float = 2.0,
                pause: tuple[float, float] = (0.0, 1.5)) -> LLMEngine:
    return LLMEngine(EngineConfig(dtype=args.dtype, num_threads=args.threads, max_num_seqs=args.max_num_seqs,
                                  num_kv_blocks=args.kv_blocks, scheduling_policy=policy, sjf_aging=aging,
                                  sjf_wait_bound=bound, sjf_pause_ratio=pause[0], sjf_pause_budget=pause[1]))


def fit(args: argparse.Namespace, engine: LLMEngine, shape: list[SimRequest]) -> tuple[StepCost, dict[str, Any]]:
    for i, r in enumerate(shape):
        engine.add_request(list(r.prompt), SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True),
                           request_id=f"fit{i}")
    start = time.perf_counter()
    rows = timed_steps(engine)
    measured = time.perf_counter() - start
    # A fresh engine's first steps pay one-time costs (first touches of the KV pages, lazy initialisation).
    cost = StepCost.fit(rows[WARMUP_STEPS:])
    simulated = simulation(args, engine, cost).run(shape).seconds
    bias, rms = cost.relative_error(rows[WARMUP_STEPS:])
    info = {"coefficients_ms": dict(zip(FEATURES, (c * 1e3 for c in cost.coefficients), strict=True)),
            "steps": len(rows), "relative_error_mean": bias, "relative_error_rms": rms,
            "makespan_measured_s": measured, "makespan_simulated_s": simulated}
    print(f"fit: {len(rows)} steps, per-step error mean {bias:+.1%}, rms {rms:.1%}; all at once: measured "
          f"{measured:.1f}s, simulated {simulated:.1f}s; ms per " +
          ", ".join(f"{k} {v:.5f}" for k, v in info["coefficients_ms"].items()))
    return cost, info


def simulation(args: argparse.Namespace, engine: LLMEngine, cost: StepCost) -> Simulation:
    config = engine.scheduler.config
    return Simulation(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, config.max_model_len,
                                      config.enable_chunked_prefill, "fcfs"),
                      cost, args.kv_blocks, engine.config.block_size, engine.config.enable_prefix_caching)


def summarize(waits: list[float], latencies: list[float], fcfs: dict[str, Any] | None,
              stalled: float | None = None) -> dict[str, Any]:
    out = {"mean_latency": statistics.fmean(latencies), "p99_latency": percentile(latencies, 99),
           "longest_wait": max(waits), "waits": waits, "latencies": latencies}
    if stalled is not None:
        out["longest_stall"] = stalled
    if fcfs is not None:
        out |= {"mean_change": out["mean_latency"] / fcfs["mean_latency"] - 1,
                "wait_ratio": scheduling.wait_ratios(fcfs["waits"], waits),
                "latency_ratio": scheduling.latency_ratios(fcfs["latencies"], latencies)}
    return out


def simulated(run: SimRun, fcfs: dict[str, Any] | None) -> dict[str, Any]:
    return summarize([t.wait for t in run.traces], [t.latency for t in run.traces], fcfs,
                     max(t.stalled for t in run.traces))


def line(label: str, r: dict[str, Any]) -> str:
    ratio, slow = r.get("wait_ratio"), r.get("latency_ratio")
    tail = (f"  {r['mean_change']:+.1%}  wait ratio max {ratio['max'] or 0:.2f} ({ratio['over_3x']} of "
            f"{ratio['compared']} over 3x)  latency ratio max {slow['max']:.2f} ({slow['over_3x']} over 3x)"
            ) if ratio is not None else ""
    stall = f"  longest stall {r['longest_stall']:4.1f}s" if "longest_stall" in r else ""
    return (f"{label:<28} mean {r['mean_latency']:5.1f}s  p99 {r['p99_latency']:5.1f}s  longest wait "
            f"{r['longest_wait']:5.1f}s{tail}{stall}")


def sweep(args: argparse.Namespace, sim: Simulation, arrivals: list[SimRequest]) -> dict[str, Any]:
    config = sim.config
    fcfs_run = sim.run(arrivals)
    fcfs = simulated(fcfs_run, None)
    results = {"fcfs": fcfs}
    print(line("fcfs", fcfs))
    settings = [(f"sjf aging {aging:g} bound {bound:g}",
                 {"sjf_aging": aging, "sjf_wait_bound": bound, "sjf_pause_ratio": 0.0})
                for aging in floats(args.aging) for bound in floats(args.bound)]
    settings += [(f"sjf pause {ratio:g}:{budget:g} bound {bound:g}",
                  {"sjf_wait_bound": bound, "sjf_pause_ratio": ratio, "sjf_pause_budget": budget})
                 for ratio, budget in pauses(args.pause) for bound in floats(args.pause_bound)]
    for label, options in settings:
        sjf = dataclasses.replace(config, policy="sjf", **options)
        results[label] = r = simulated(dataclasses.replace(sim, config=sjf).run(arrivals), fcfs)
        print(line(label, r))
    for b in floats(args.oracle):
        deadlines = [t.arrival + b * (t.admitted - t.arrival) for t in fcfs_run.traces]
        run = sim.run(arrivals, lambda d=deadlines: DeadlineSJF(config.max_num_batched_tokens, config.max_model_len,
                                                                 d, sim.clock))
        results[f"exact deadline b {b:g}"] = r = simulated(run, fcfs)
        print(line(f"exact deadline b {b:g}", r))
    return results


def floats(values: str) -> list[float]:
    return [float(x) for x in values.split(",") if x]


def pauses(values: str) -> list[tuple[float, float]]:
    """`RATIO:BUDGET,...` pairs."""
    return [(float(r), float(b)) for r, b in (item.split(":") for item in values.split(",") if item)]


def validate(args: argparse.Namespace, sim: Simulation, arrivals: list[SimRequest]) -> dict[str, Any]:
    """The real engine on the same arrivals: FCFS, then SJF with the `--validate` aging, wait bound and pausing."""
    aging, bound, *rest = args.validate.split(",")
    pause = pauses(rest[0])[0] if rest else (0.0, 1.5)  # none given: off
    real = [scheduling.Arrival(a.arrival, list(a.prompt), a.max_tokens) for a in arrivals]
    out: dict[str, Any] = {}
    for policy in ("fcfs", "sjf"):
        traces, _ = scheduling.drive(make_engine(args, policy, float(aging), float(bound), pause), real, tags=False)
        waits, latencies = [t.ttft for t in traces], [t.latency for t in traces]
        if None in waits or None in latencies:
            raise RuntimeError("a request did not finish its max_tokens")  # ignore_eos: every one should
        out[f"real {policy}"] = r = summarize([w for w in waits if w is not None],
                                              [x for x in latencies if x is not None], out.get("real fcfs"))
        r["longest_gap"] = max(scheduling.longest_gap(t) for t in traces)
        label = f" aging {aging} bound {bound}" + (f" pause {rest[0]}" if rest else "") if policy == "sjf" else ""
        print(line(f"real {policy}{label}", r) + f"  longest gap between tokens {r['longest_gap']:.1f}s")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=192)
    parser.add_argument("--load", default="1.5,2,3", help="arrival rates, times the capacity (comma-separated)")
    parser.add_argument("--aging", default="1,0.25,0", help="sjf_aging values swept")
    parser.add_argument("--bound", default="0,2,3", help="sjf_wait_bound values swept")
    parser.add_argument("--oracle", default="2,2.5,3", help="b of the exact-deadline policy")
    parser.add_argument("--pause", default="4:1.5,4:1,2:1.5,8:1.5,4:2",
                        help="sjf_pause_ratio:sjf_pause_budget pairs swept (aging 0)")
    parser.add_argument("--pause-bound", default="2", help="sjf_wait_bound values with pausing")
    parser.add_argument("--validate", default=None, metavar="AGING,BOUND[,RATIO:BUDGET]",
                        help="also run the first load on the real engine: FCFS and SJF with this aging and bound")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=1024)
    parser.add_argument("--max-input", type=int, default=512)
    parser.add_argument("--output-scale", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/scheduling_sim.json"))
    args = parser.parse_args()
    engine = make_engine(args)
    shape = [SimRequest(0.0, tuple(prompt), max_tokens) for prompt, max_tokens in scheduling.sharegpt_shape(
        engine.tokenizer, args.requests, args.seed, args.max_input, args.output_scale)]
    cost, info = fit(args, engine, shape)
    sim = simulation(args, engine, cost)
    capacity = len(shape) / info["makespan_measured_s"]
    report: dict[str, Any] = {"machine": machine_description(), "args": {k: str(v) for k, v in vars(args).items()},
                              "fit": info, "capacity_rps": capacity}
    for n, load in enumerate(float(x) for x in args.load.split(",")):
        times = scheduling.arrival_times(args.seed + 2, load * capacity, len(shape))  # scheduling.py's arrivals
        arrivals = [SimRequest(t, a.prompt, a.max_tokens) for t, a in zip(times, shape, strict=True)]
        print(f"-- load {load:g} ({load * capacity:.2f} req/s), simulated")
        report[f"load {load:g}"] = sweep(args, sim, arrivals)
        if args.validate is not None and n == 0:
            report[f"load {load:g}"] |= validate(args, sim, arrivals)
        write_json(report, args.out)
    print(json.dumps({k: v for k, v in report.items() if k not in ("machine", "args")}, default=str)[:600])


if __name__ == "__main__":
    main()
