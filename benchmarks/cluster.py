"""tokenmill on Ray Serve: routing policies and replica counts, through the OpenAI endpoint, on one machine.

Each configuration is deployed fresh (cold prefix caches) on a local Ray cluster and driven by the bench harness
(`OpenAIHTTPBackend`, Poisson arrivals) with the same seeded workloads; configurations alternate (A, B, A, B).
Prefix-cache hit rates are the replicas' own counters (prompt tokens served from cache / prompt tokens looked up).

  routing   2 replicas; prefix affinity vs round-robin (or power-of-two) on a shared-prefix workload (16 system
            prompts of 512 tokens, in random order) and a multi-turn one, with per-replica caches that hold about
            60% of the distinct prefixes: the regime in which where a request goes decides whether it hits
  replicas  1 replica with all cores vs one replica per core, offline throughput on a synthetic workload
  pd        streams decoding while long prompts arrive: 2 co-located replicas vs 1 prefill + 1 decode replica
            (prefill/decode disaggregation); the streams' inter-token latency

    .venv/bin/python benchmarks/cluster.py [--parts routing,replicas,pd] [--repeats 2]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import statistics
from pathlib import Path
from typing import Any

from tokenmill.bench.backends import OpenAIHTTPBackend
from tokenmill.bench.cli import load_tokenizer
from tokenmill.bench.machine import machine_description
from tokenmill.bench.report import write_json
from tokenmill.bench.scenarios import RunResult, RunSpec, run_once
from tokenmill.bench.workloads import Workload, multi_turn, shared_prefix, synthetic
from tokenmill.model.gguf_file import default_model_path
from tokenmill.ports import free_port

RESULTS = Path(__file__).resolve().parent / "results" / "cluster.json"


def deploy(replicas: int, kv_blocks: int | None = None, **cluster: Any) -> None:
    """A fresh application (cold caches): `replicas` engine replicas and the other `ClusterConfig` fields given."""
    from ray import serve

    from tokenmill.cluster.deploy import ClusterConfig, build_app
    from tokenmill.config import EngineConfig
    from tokenmill.server.config import ServerConfig

    serve.delete("tokenmill")
    config = ClusterConfig(replicas=replicas, max_ongoing_requests=64, max_queued_requests=1024, **cluster)
    serve.run(build_app(EngineConfig(num_kv_blocks=kv_blocks), ServerConfig(), config), name="tokenmill",
              route_prefix="/")


def cache_counters() -> dict[str, int]:
    from tokenmill.cluster.deploy import replica_stats

    stats = replica_stats("tokenmill")
    return {"queries": sum(s["prefix_cache_queries"] for s in stats),
            "hits": sum(s["prefix_cache_hits"] for s in stats), "replicas": len(stats)}


def run(url: str, workload: Workload, spec: RunSpec) -> dict[str, Any]:
    before = cache_counters()
    result = asyncio.run(_run(OpenAIHTTPBackend(url, name="cluster"), workload, spec))
    after = cache_counters()
    queries = after["queries"] - before["queries"]
    m = result.metrics
    return {"hit_rate": (after["hits"] - before["hits"]) / queries if queries else 0.0,
            "ttft_p50_ms": m["ttft_ms"]["median"], "ttft_p99_ms": m["ttft_ms"]["p99"],
            "tpot_p50_ms": m["tpot_ms"]["median"], "output_tok_s": m["output_throughput"],
            "completed": m["completed"], "failed": m["failed"], "duration_s": m["duration_s"]}


async def _run(backend: OpenAIHTTPBackend, workload: Workload, spec: RunSpec) -> RunResult:
    await backend.start()  # its warm-up request is not measured
    try:
        return await run_once(backend, workload, spec, progress=False)
    finally:
        await backend.stop()


def summary(rows: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("hit_rate", "ttft_p50_ms", "ttft_p99_ms", "tpot_p50_ms", "output_tok_s")
    return {k: statistics.median(r[k] for r in rows if r[k] is not None) for k in keys}


def part_routing(url: str, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    workloads = {
        "shared-prefix": shared_prefix(tokenizer, args.requests, args.prefix_len, (48, 96), (32, 32),
                                       num_prefixes=args.num_prefixes, seed=1),
        "multi-turn": multi_turn(tokenizer, args.requests // 3, 3, (64, 128), (32, 32), seed=2),
    }
    for workload in workloads.values():  # arrivals in random order, not prefix after prefix in turn
        random.Random(0).shuffle(workload.sessions)
    spec = RunSpec("serve", request_rate=args.rate, seed=3)
    routers = args.routers.split(",")
    results: dict[str, dict[str, list[dict[str, Any]]]] = {w: {r: [] for r in routers} for w in workloads}
    for repeat in range(args.repeats):
        for router in routers:
            deploy(2, args.kv_blocks, router=router)
            for name, workload in workloads.items():
                row = run(url, workload, spec)
                results[name][router].append(row)
                print(f"  repeat {repeat} {router:>12} {name:>13}: hit rate {row['hit_rate']:.1%}, "
                      f"TTFT p50 {row['ttft_p50_ms']:.0f} ms, p99 {row['ttft_p99_ms']:.0f} ms, "
                      f"{row['output_tok_s']:.1f} tok/s, failed {row['failed']}", flush=True)
    return {"spec": spec.to_json(), "workloads": {n: w.params for n, w in workloads.items()}, "runs": results,
            "median": {n: {r: summary(rows) for r, rows in per.items()} for n, per in results.items()}}


def part_replicas(url: str, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    workload = synthetic(tokenizer, args.requests, (128, 128), (64, 64), seed=4)
    spec = RunSpec("offline", seed=5)
    configs = {f"1 replica x {cores} threads": (1, float(cores)), f"{cores} replicas x 1 thread": (cores, 1.0)}
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for label, (replicas, cpus) in configs.items():
            deploy(replicas, replica_cpus=cpus)
            row = run(url, workload, spec)
            results[label].append(row)
            print(f"  repeat {repeat} {label}: {row['output_tok_s']:.1f} output tok/s, TPOT p50 "
                  f"{row['tpot_p50_ms']:.0f} ms, failed {row['failed']}", flush=True)
    return {"spec": spec.to_json(), "workload": workload.params, "runs": results,
            "median": {c: summary(rows) for c, rows in results.items()}}


def part_pd(url: str, args: argparse.Namespace, tokenizer: Any) -> dict[str, Any]:
    """Running streams while long prompts arrive: co-located replicas (each prefills what it decodes) vs one
    prefill and one decode replica. The streams' inter-token latency is the point."""
    streams = synthetic(tokenizer, args.pd_streams, (32, 32), (args.pd_stream_tokens,) * 2, seed=6)
    prompts = synthetic(tokenizer, args.pd_long_prompts, (args.pd_prompt_len,) * 2, (8, 8), seed=7)
    configs = {"co-located: 2 replicas": {"replicas": 2}, "P/D: 1 prefill + 1 decode": {"replicas": 1,
                                                                                       "prefill_replicas": 1}}
    results: dict[str, list[dict[str, Any]]] = {c: [] for c in configs}
    for repeat in range(args.repeats):
        for label, shape in configs.items():
            deploy(**shape)
            row = asyncio.run(_mixed(url, streams, prompts, args.pd_rate))
            results[label].append(row)
            print(f"  repeat {repeat} {label}: streams ITL p50 {row['stream_itl_p50_ms']:.0f} ms, p99 "
                  f"{row['stream_itl_p99_ms']:.0f} ms, TPOT p99 {row['stream_tpot_p99_ms']:.0f} ms; long prompts "
                  f"TTFT p50 {row['prompt_ttft_p50_ms']:.0f} ms; failed {row['failed']}", flush=True)
    keys = list(next(iter(results.values()))[0])
    return {"streams": streams.params, "prompts": prompts.params, "rate": args.pd_rate, "runs": results,
            "median": {c: {k: statistics.median(r[k] for r in rows) for k in keys} for c, rows in results.items()}}


async def _mixed(url: str, streams: Workload, prompts: Workload, rate: float) -> dict[str, Any]:
    stream_backend, prompt_backend = OpenAIHTTPBackend(url, name="streams"), OpenAIHTTPBackend(url, name="long")
    await stream_backend.start()
    await prompt_backend.start()
    try:
        async def late_prompts() -> RunResult:
            await asyncio.sleep(1.0)  # once the streams are decoding
            return await run_once(prompt_backend, prompts, RunSpec("serve", request_rate=rate, seed=8),
                                  progress=False)

        s, p = await asyncio.gather(run_once(stream_backend, streams, RunSpec("offline"), progress=False),
                                    late_prompts())
    finally:
        await stream_backend.stop()
        await prompt_backend.stop()
    return {"stream_itl_p50_ms": s.metrics["itl_ms"]["median"], "stream_itl_p99_ms": s.metrics["itl_ms"]["p99"],
            "stream_tpot_p50_ms": s.metrics["tpot_ms"]["median"], "stream_tpot_p99_ms": s.metrics["tpot_ms"]["p99"],
            "prompt_ttft_p50_ms": p.metrics["ttft_ms"]["median"], "prompt_ttft_p99_ms": p.metrics["ttft_ms"]["p99"],
            "failed": s.metrics["failed"] + p.metrics["failed"]}


def _table(header: list[str], rows: list[list[str]]) -> None:
    print("\n| " + " | ".join(header) + " |\n|" + "---|" * len(header))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def print_tables(report: dict[str, Any]) -> None:
    if "routing" in report:
        _table(["workload", "router", "prefix-cache hit rate", "TTFT p50 (ms)", "TTFT p99 (ms)", "output tok/s"],
               [[name, router, f"{m['hit_rate']:.1%}", f"{m['ttft_p50_ms']:.0f}", f"{m['ttft_p99_ms']:.0f}",
                 f"{m['output_tok_s']:.1f}"]
                for name, per in report["routing"]["median"].items() for router, m in per.items()])
    if "pd" in report:
        _table(["configuration", "streams ITL p50 (ms)", "ITL p99 (ms)", "TPOT p99 (ms)",
                "long prompts TTFT p50 (ms)"],
               [[label, f"{m['stream_itl_p50_ms']:.0f}", f"{m['stream_itl_p99_ms']:.0f}",
                 f"{m['stream_tpot_p99_ms']:.0f}", f"{m['prompt_ttft_p50_ms']:.0f}"]
                for label, m in report["pd"]["median"].items()])
    if "replicas" in report:
        _table(["configuration", "output tok/s", "TPOT p50 (ms)", "TTFT p50 (ms)"],
               [[label, f"{m['output_tok_s']:.1f}", f"{m['tpot_p50_ms']:.0f}", f"{m['ttft_p50_ms']:.0f}"]
                for label, m in report["replicas"]["median"].items()])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default="routing,replicas,pd")
    parser.add_argument("--routers", default="affinity,round-robin")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--prefix-len", type=int, default=512)
    parser.add_argument("--num-prefixes", type=int, default=16)
    parser.add_argument("--kv-blocks", type=int, default=320,
                        help="routing: KV blocks per replica (16 tokens each); the default holds about 60%% of "
                             "the shared-prefix workload's distinct prefixes, so a replica cannot cache them all")
    parser.add_argument("--rate", type=float, default=2.0, help="routing: requests (sessions) per second")
    parser.add_argument("--pd-streams", type=int, default=8, help="pd: running streams")
    parser.add_argument("--pd-stream-tokens", type=int, default=256, help="pd: tokens each stream generates")
    parser.add_argument("--pd-long-prompts", type=int, default=6, help="pd: long prompts arriving meanwhile")
    parser.add_argument("--pd-prompt-len", type=int, default=1536)
    parser.add_argument("--pd-rate", type=float, default=0.5, help="pd: long prompts per second")
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args()

    import ray
    from ray import serve

    tokenizer = load_tokenizer(default_model_path())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}"
    report: dict[str, Any] = {"machine": machine_description(), "args": vars(args)}
    try:
        for part in args.parts.split(","):
            print(f"{part}:", flush=True)
            report[part] = {"routing": part_routing, "replicas": part_replicas, "pd": part_pd}[part](
                url, args, tokenizer)
    finally:
        serve.shutdown()
        ray.shutdown()
    print_tables(report)
    write_json(report, Path(args.output))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
