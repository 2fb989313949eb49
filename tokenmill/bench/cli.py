"""`tokenmill bench`: arguments and the driver. `add_bench_args(parser)` also adds the engine arguments.

    python -m tokenmill.bench --scenario offline --backend tokenmill --backend transformers
    python -m tokenmill.bench --scenario serve --request-rate 0.5,1,2,4 --slo-ttft-ms 1000 --slo-tpot-ms 100 \\
        --search-max-rate --backend tokenmill-server --backend llama.cpp
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import shlex
import sys
import time
from pathlib import Path
from typing import Any

from tokenmill.bench import workloads as wl
from tokenmill.bench.backends import EOS_MODES, Backend, InProcessBackend, OpenAIHTTPBackend
from tokenmill.bench.metrics import SLO, passes_slo
from tokenmill.bench.scenarios import SCENARIOS, RunResult, RunSpec, run_once, search_max_rate
from tokenmill.entrypoints.args import add_engine_args, engine_config

BACKEND_HELP = ("tokenmill (in-process engine), tokenmill-server (starts `tokenmill serve` on loopback), llama.cpp "
                "(starts llama-cpp-python's server), transformers (HF generate), or an OpenAI-compatible endpoint "
                "as URL or NAME=URL; repeat to compare side by side (runs alternate A, B, A, B)")


def _rates(text: str) -> list[float]:
    try:
        rates = [math.inf if part.strip().lower() in ("inf", "infinity") else float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated rates (req/s) or inf, got {text!r}") from None
    if not rates or any(r <= 0 for r in rates):
        raise argparse.ArgumentTypeError(f"rates must be > 0, got {text!r}")
    return rates


def _ints(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"values must be >= 1, got {text!r}")
    return values


def _length(text: str) -> wl.LengthRange:
    try:
        return wl.parse_range(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_bench_args(parser: argparse.ArgumentParser) -> None:
    """Benchmark arguments plus the engine arguments (`--model`, `--dtype`, `--threads`, ...) of `tokenmill`."""
    g = parser.add_argument_group("scenario")
    g.add_argument("--scenario", choices=SCENARIOS, default="offline",
                   help="offline: all requests at t=0; serve: Poisson/gamma arrivals; latency: one at a time; "
                        "concurrency: N closed-loop clients")
    g.add_argument("--backend", action="append", default=None, metavar="SPEC", help=BACKEND_HELP)
    g.add_argument("--request-rate", type=_rates, default=[math.inf], metavar="R[,R...]",
                   help="serve: requests/s (a list sweeps; inf = all at once)")
    g.add_argument("--burstiness", type=float, default=1.0, help="serve: gamma shape (1 = Poisson, <1 burstier)")
    g.add_argument("--max-concurrency", type=int, default=None, help="offline/serve: at most this many in flight")
    g.add_argument("--concurrency", type=_ints, default=[1], metavar="N[,N...]",
                   help="concurrency: closed-loop clients (a list sweeps)")
    g.add_argument("--repeats", type=int, default=1, help="runs per configuration and backend, interleaved")
    g.add_argument("--seed", type=int, default=0, help="workload and arrival-process seed")

    g = parser.add_argument_group("SLOs (goodput and the max-rate search)")
    g.add_argument("--slo-ttft-ms", type=float, default=None)
    g.add_argument("--slo-tpot-ms", type=float, default=None)
    g.add_argument("--slo-e2e-ms", type=float, default=None)
    g.add_argument("--slo-attainment", type=float, default=0.99,
                   help="fraction of requests that must meet every SLO for a rate to pass (default 0.99)")
    g.add_argument("--search-max-rate", action="store_true",
                   help="serve: after the sweep, bisect for the highest rate that passes the SLOs, per backend")
    g.add_argument("--search-iterations", type=int, default=3)

    g = parser.add_argument_group("workload")
    g.add_argument("--workload", choices=wl.WORKLOADS, default="synthetic")
    g.add_argument("--dataset-path", default=None,
                   help="sharegpt: ShareGPT JSON/JSONL; jsonl: prompt file; multi-turn: JSONL with `turns` (optional)")
    g.add_argument("--num-requests", type=int, default=64, help="requests (multi-turn: conversations x turns)")
    g.add_argument("--input-len", type=_length, default=(128, 128), metavar="N|LOW,HIGH",
                   help="synthetic prompt tokens (shared-prefix: suffix; multi-turn: each user turn)")
    g.add_argument("--output-len", type=_length, default=(128, 128), metavar="N|LOW,HIGH", help="max_tokens")
    g.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let EOS end requests early (default: every request generates its output length)")
    g.add_argument("--prefix-len", type=int, default=512, help="shared-prefix: prefix tokens")
    g.add_argument("--num-prefixes", type=int, default=1, help="shared-prefix: distinct prefixes")
    g.add_argument("--turns", type=int, default=3, help="multi-turn: user turns per conversation")
    g.add_argument("--prompt-field", default=None, help="jsonl: the field holding the prompt (default: auto)")
    g.add_argument("--sharegpt-output-len", type=int, default=None,
                   help="sharegpt: fixed output length instead of the reference reply's")

    g = parser.add_argument_group("peers and endpoints")
    g.add_argument("--api-key", default=None, help="bearer key for URL endpoints")
    g.add_argument("--http-eos-mode", choices=EOS_MODES, default="ignore_eos",
                   help="how URL endpoints are told to ignore EOS (llama.cpp started here always uses min_tokens)")
    g.add_argument("--llama-cpp-n-ctx", type=int, default=4096)
    g.add_argument("--llama-cpp-threads", type=int, default=None,
                   help="llama.cpp threads (default: --threads, else all cores); its threads spin while waiting, so "
                        "on cores shared with other work fewer threads can be much faster")
    g.add_argument("--llama-cpp-args", default="", help="extra arguments for llama_cpp.server (one string)")
    g.add_argument("--hf-batch-size", type=int, default=64, help="transformers: requests per generate batch")
    g.add_argument("--keep-prefix-cache", action="store_true",
                   help="do not reset the in-process engine's prefix cache before each run")

    g = parser.add_argument_group("output")
    g.add_argument("--output-dir", default="benchmarks/results/bench")
    g.add_argument("--name", default=None, help="file name stem (default: SCENARIO-WORKLOAD)")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--no-records", action="store_true", help="leave per-request timelines out of the JSON")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--no-ceilings", action="store_true", help="skip measuring memory bandwidth / matmul ceilings")
    add_engine_args(parser)


def check_args(args: argparse.Namespace) -> str | None:
    if args.num_requests < 1 or args.repeats < 1 or args.hf_batch_size < 1:
        return "--num-requests, --repeats and --hf-batch-size must be >= 1"
    if args.workload in ("sharegpt", "jsonl") and not args.dataset_path:
        return f"--workload {args.workload} needs --dataset-path"
    if args.dataset_path and not Path(args.dataset_path).exists():
        return f"--dataset-path {args.dataset_path} does not exist"
    if args.search_max_rate and (args.scenario != "serve" or not _slo(args)):
        return "--search-max-rate needs --scenario serve and at least one --slo-*-ms"
    if not 0 < args.slo_attainment <= 1:
        return "--slo-attainment must be in (0, 1]"
    if args.burstiness <= 0:
        return "--burstiness must be > 0"
    return None


def _slo(args: argparse.Namespace) -> SLO | None:
    slo = SLO(*(None if v is None else v / 1000 for v in (args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)))
    return None if slo.empty else slo


def serve_spec(args: argparse.Namespace, rate: float) -> RunSpec:
    return RunSpec("serve", request_rate=rate, burstiness=args.burstiness, max_concurrency=args.max_concurrency,
                   ignore_eos=args.ignore_eos, seed=args.seed)


def run_specs(args: argparse.Namespace) -> list[RunSpec]:
    common = {"ignore_eos": args.ignore_eos, "seed": args.seed}
    if args.scenario == "serve":
        return [serve_spec(args, rate) for rate in args.request_rate]
    if args.scenario == "concurrency":
        return [RunSpec("concurrency", concurrency=n, **common) for n in args.concurrency]
    return [RunSpec(args.scenario, max_concurrency=args.max_concurrency, **common)]


# ---- building the workload and the backends -----------------------------------------------------------------------


def load_tokenizer(model_path: Path) -> Any:
    from tokenmill.bench.roofline import gguf_file
    from tokenmill.tokenizer import Tokenizer

    return Tokenizer.from_gguf_metadata(gguf_file(str(model_path)).metadata)


def build_workload(args: argparse.Namespace, tokenizer: Any) -> wl.Workload:
    n, seed = args.num_requests, args.seed
    if args.workload == "synthetic":
        return wl.synthetic(tokenizer, n, args.input_len, args.output_len, seed)
    if args.workload == "sharegpt":
        return wl.sharegpt(tokenizer, args.dataset_path, n, seed, args.sharegpt_output_len, args.max_model_len)
    if args.workload == "jsonl":
        return wl.jsonl_prompts(tokenizer, args.dataset_path, n, args.output_len, seed, args.prompt_field,
                                args.max_model_len)
    if args.workload == "shared-prefix":
        return wl.shared_prefix(tokenizer, n, args.prefix_len, args.input_len, args.output_len, args.num_prefixes,
                                seed)
    return wl.multi_turn(tokenizer, max(1, n // args.turns), args.turns, args.input_len, args.output_len, seed,
                         args.dataset_path)


def _run_dtype(args: argparse.Namespace) -> str:
    return str(engine_config(args).torch_dtype()).removeprefix("torch.")


def _server_engine_args(args: argparse.Namespace, model_path: Path) -> list[str]:
    out = ["--model", str(model_path), "--dtype", args.dtype, "--device", args.device,
           "--max-num-seqs", str(args.max_num_seqs), "--max-num-batched-tokens", str(args.max_num_batched_tokens),
           "--kv-cache-memory-gib", str(args.kv_cache_memory_gib), "--weight-format", args.weight_format,
           "--int4-group-size", str(args.int4_group_size)]
    for flag, value in (("--num-kv-blocks", args.num_kv_blocks), ("--max-model-len", args.max_model_len),
                        ("--threads", args.threads)):
        if value is not None:
            out += [flag, str(value)]
    return (out + (["--no-chunked-prefill"] if args.no_chunked_prefill else [])
            + (["--no-prefix-caching"] if args.no_prefix_caching else [])
            + (["--enforce-eager"] if args.enforce_eager else []))


def build_backends(args: argparse.Namespace, model_path: Path, tokenizer: Any,
                   servers: list[Any]) -> list[Backend]:
    """Backends for the --backend specs; peer servers are started here and appended to `servers`."""
    from tokenmill.bench import peers
    from tokenmill.bench.roofline import dense_memory_model, gguf_memory_model, model_config

    out_dir = Path(args.output_dir)
    threads = args.threads or os.cpu_count() or 1
    backends: list[Backend] = []
    for spec in args.backend or ["tokenmill"]:
        if spec == "tokenmill":
            backends.append(InProcessBackend(engine_config(args, model=str(model_path))))
        elif spec == "tokenmill-server":
            server = peers.tokenmill_server(_server_engine_args(args, model_path),
                                            log_path=out_dir / "logs" / "tokenmill-server.log")
            servers.append(server.start())
            # Quantized formats' bytes are only known from the loaded model, which lives in the server process.
            memory = (dense_memory_model(model_config(model_path), _run_dtype(args))
                      if args.weight_format == "float" else None)
            backends.append(OpenAIHTTPBackend(server.url, "tokenmill-server", eos_mode="ignore_eos", memory=memory))
        elif spec in ("llama.cpp", "llama-cpp", "llamacpp"):
            server = peers.llama_cpp_server(model_path, threads=args.llama_cpp_threads or threads,
                                            n_ctx=args.llama_cpp_n_ctx,
                                            extra_args=shlex.split(args.llama_cpp_args),
                                            log_path=out_dir / "logs" / "llama-cpp-server.log")
            servers.append(server.start())
            backends.append(OpenAIHTTPBackend(server.url, "llama.cpp", eos_mode="min_tokens",
                                              stop_token_ids=sorted(tokenizer.stop_token_ids),
                                              memory=gguf_memory_model(model_path)))
        elif spec == "transformers":
            backends.append(peers.TransformersBackend(model_path, _run_dtype(args), args.hf_batch_size, threads))
        elif "://" in spec:
            name, _, url = spec.rpartition("=") if "=" in spec.split("://")[0] else ("", "", spec)
            backends.append(OpenAIHTTPBackend(url, name or None, api_key=args.api_key, eos_mode=args.http_eos_mode,
                                              stop_token_ids=sorted(tokenizer.stop_token_ids)))
        else:
            raise ValueError(f"unknown backend {spec!r}: {BACKEND_HELP}")
    names = [b.name for b in backends]
    if len(set(names)) != len(names):
        raise ValueError(f"backend names must differ, got {names} (name URL endpoints as NAME=URL)")
    return backends


# ---- running ------------------------------------------------------------------------------------------------------


async def run_all(args: argparse.Namespace, backends: list[Backend], workload: wl.Workload,
                  report: dict[str, Any]) -> list[RunResult]:
    slo = _slo(args)
    progress = not args.no_progress
    runs: list[RunResult] = []

    async def run(backend: Backend, spec: RunSpec, repeat: int) -> RunResult:
        if isinstance(backend, InProcessBackend) and not args.keep_prefix_cache:
            backend.reset_prefix_cache()
        await backend.resume()
        try:
            result = await run_once(backend, workload, spec, progress, slo, repeat)
        finally:
            await backend.pause()
        runs.append(result)
        m = result.metrics
        print(f"{backend.name} · {spec.label} · repeat {repeat + 1}: {m['completed']}/{m['num_requests']} ok, "
              f"{m['duration_s']:.2f} s, {m['output_throughput'] or 0:.1f} output tok/s, "
              f"median TTFT {m['ttft_ms']['median'] or 0:.0f} ms, median TPOT {m['tpot_ms']['median'] or 0:.1f} ms",
              file=sys.stderr, flush=True)
        return result

    specs = run_specs(args)
    for spec in specs:
        for repeat in range(args.repeats):
            for backend in backends:
                await run(backend, spec, repeat)
    if args.search_max_rate:
        assert slo is not None
        report["search"] = {}
        for backend in backends:
            known = {r.spec.request_rate: passes_slo(r.metrics, args.slo_attainment)
                     for r in runs if r.backend == backend.name and r.repeat == 0}

            async def passes(rate: float, backend: Backend = backend) -> bool:
                return passes_slo((await run(backend, serve_spec(args, rate), 0)).metrics, args.slo_attainment)

            report["search"][backend.name] = await search_max_rate(passes, known, args.search_iterations)
    return runs


async def _main(args: argparse.Namespace) -> int:
    from tokenmill.bench import machine
    from tokenmill.bench import report as rep
    from tokenmill.model.gguf_file import resolve_model_path

    warning = machine.busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    model_path = resolve_model_path(args.model)
    tokenizer = load_tokenizer(model_path)
    workload = build_workload(args, tokenizer)
    slo = _slo(args)
    report: dict[str, Any] = {"benchmark": "tokenmill bench", "scenario": args.scenario,
                              "machine": machine.machine_description(), "model": str(model_path),
                              "args": {k: v for k, v in vars(args).items() if k != "func"},
                              "workload": workload.summary(), "slo": slo.to_json() if slo else None,
                              "slo_attainment": args.slo_attainment}
    if not args.no_ceilings:
        report["ceilings"] = machine.measure_ceilings(_run_dtype(args), args.threads)
    servers: list[Any] = []
    backends: list[Backend] = []
    started = time.perf_counter()
    try:
        backends = build_backends(args, model_path, tokenizer, servers)
        for backend in backends:
            began = time.perf_counter()
            await backend.start()
            await backend.pause()  # one in-process backend's threads at a time (WorkerThreadBackend)
            print(f"{backend.name}: ready in {time.perf_counter() - began:.1f} s", file=sys.stderr, flush=True)
        report["backends"] = {b.name: b.describe() | {"memory": b.memory.to_json() if b.memory else None}
                              for b in backends}
        runs = await run_all(args, backends, workload, report)
    finally:
        for backend in backends:
            await backend.stop()
        for server in servers:
            server.stop()
    report["wall_s"] = time.perf_counter() - started
    report["notes"] = rep.notes(report, runs)
    if warning:
        report["notes"].insert(0, warning)
    report["runs"] = [r.to_json(with_records=not args.no_records) for r in runs]
    out_dir = Path(args.output_dir)
    name = args.name or f"{args.scenario}-{args.workload}"
    table = rep.markdown(report, runs)
    rep.write_json(report, out_dir / f"{name}.json")
    (out_dir / f"{name}.md").write_text(table)
    written = [out_dir / f"{name}.json", out_dir / f"{name}.md"]
    if not args.no_plots:
        written += rep.plots(report, runs, out_dir, name)
    print(table)
    print("wrote " + ", ".join(str(p) for p in written))
    failed = sum(r.metrics["failed"] for r in runs)
    return 1 if failed and failed == sum(r.metrics["num_requests"] for r in runs) else 0


def cmd_bench(args: argparse.Namespace) -> int:
    problem = check_args(args)
    if problem:
        print(f"tokenmill bench: error: {problem}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_main(args))
    except (RuntimeError, ValueError) as exc:
        print(f"tokenmill bench: error: {exc}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cmd_bench(build_parser().parse_args(argv))
