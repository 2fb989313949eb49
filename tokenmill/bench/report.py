"""Results as JSON, Markdown tables and PNG plots (matplotlib, Agg backend; plots are skipped without it)."""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.bench.metrics import RequestRecord, e2e_latency, inter_token_latencies, tpot, ttft
from tokenmill.bench.scenarios import RunResult

Group = tuple[str, str]  # (run label, backend)


def group_runs(runs: list[RunResult]) -> dict[Group, list[RunResult]]:
    """Repeats of the same configuration on the same backend, in first-run order."""
    groups: dict[Group, list[RunResult]] = {}
    for run in runs:
        groups.setdefault((run.spec.label, run.backend), []).append(run)
    return groups


def _get(metrics: dict[str, Any], path: str) -> float | None:
    value: Any = metrics
    for key in path.split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def median_of(runs: list[RunResult], path: str) -> float | None:
    values = [v for v in (_get(r.metrics, path) for r in runs) if v is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}"


def _spread(runs: list[RunResult], path: str, digits: int) -> str:
    values = [v for v in (_get(r.metrics, path) for r in runs) if v is not None]
    if not values:
        return "–"
    text = _fmt(statistics.median(values), digits)
    return text if len(values) == 1 else f"{text} ({_fmt(min(values), digits)}–{_fmt(max(values), digits)})"


def paired_ratio(groups: dict[Group, list[RunResult]], label: str, backend: str, reference: str,
                 path: str = "output_throughput") -> float | None:
    """Median over repeats of this backend's value / the reference backend's value in the same repeat."""
    mine, theirs = groups.get((label, backend)), groups.get((label, reference))
    if not mine or not theirs:
        return None
    ratios = []
    for a in mine:
        b = next((r for r in theirs if r.repeat == a.repeat), None)
        va, vb = _get(a.metrics, path), _get(b.metrics, path) if b else None
        if va is not None and vb:
            ratios.append(va / vb)
    return statistics.median(ratios) if ratios else None


def _stat_cell(runs: list[RunResult], metric: str) -> str:
    return " / ".join(_fmt(median_of(runs, f"{metric}.{q}")) for q in ("mean", "median", "p90", "p99"))


def markdown(report: dict[str, Any], runs: list[RunResult]) -> str:
    groups = group_runs(runs)
    backends = list(dict.fromkeys(r.backend for r in runs))
    has_slo = any("goodput" in r.metrics for r in runs)
    lines = [f"## tokenmill bench: {report['scenario']} — {report['workload']['workload']} workload", ""]
    head = ["backend", "run", "ok/failed", "wall s", "req/s", "output tok/s", "total tok/s"]
    if has_slo:
        head += ["goodput req/s", "SLO met"]
    head += ["GB/s", f"output tok/s vs {backends[0]}"]
    lines += ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for (label, backend), group in groups.items():
        cells = [backend, label, f"{median_of(group, 'completed'):.0f}/{median_of(group, 'failed'):.0f}",
                 _fmt(median_of(group, "duration_s"), 2), _fmt(median_of(group, "request_throughput"), 2),
                 _spread(group, "output_throughput", 1), _fmt(median_of(group, "total_token_throughput"), 1)]
        if has_slo:
            attained = median_of(group, "slo_attainment")
            cells += [_fmt(median_of(group, "goodput"), 2), "–" if attained is None else f"{100 * attained:.0f}%"]
        bandwidth = median_of(group, "decode_gb_per_s.median")
        if bandwidth is None:
            bandwidth = median_of(group, "weights_gb_per_s")
        ratio = paired_ratio(groups, label, backend, backends[0])
        cells += [_fmt(bandwidth, 1), "–" if ratio is None else f"{ratio:.2f}×"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Latency, ms: mean / median / p90 / p99", "",
              "| backend | run | TTFT | TPOT | ITL | E2E | decode tok/s (median) |", "|---|---|---|---|---|---|---|"]
    for (label, backend), group in groups.items():
        lines.append(f"| {backend} | {label} | {_stat_cell(group, 'ttft_ms')} | {_stat_cell(group, 'tpot_ms')} | "
                     f"{_stat_cell(group, 'itl_ms')} | {_stat_cell(group, 'e2e_ms')} | "
                     f"{_fmt(median_of(group, 'decode_tok_per_s.median'))} |")
    search = report.get("search") or {}
    if search:
        slo = report.get("slo") or {}
        lines += ["", f"Highest Poisson rate meeting the SLOs (TTFT ≤ {_fmt(slo.get('ttft_ms'), 0)} ms, TPOT ≤ "
                  f"{_fmt(slo.get('tpot_ms'), 0)} ms, E2E ≤ {_fmt(slo.get('e2e_ms'), 0)} ms) for ≥ "
                  f"{100 * report['slo_attainment']:g}% of requests:", "",
                  "| backend | max rate req/s | lowest failing rate | rates tried (✓ met, ✗ missed) |",
                  "|---|---|---|---|"]
        for backend, found in search.items():
            tried = ", ".join(f"{_rate(float(r))}{'✓' if ok else '✗'}" for r, ok in found["evaluated"].items())
            lines.append(f"| {backend} | {_rate(found['max_rate'])} | {_rate(found['first_failing'])} | {tried} |")
    lines += ["", *[f"- {note}" for note in report.get("notes", [])]]
    return "\n".join(lines) + "\n"


def _rate(rate: float | None) -> str:
    if rate is None:
        return "–"
    return "inf" if math.isinf(rate) else f"{rate:.3g}"


def notes(report: dict[str, Any], runs: list[RunResult]) -> list[str]:
    """How tokens were counted, length mismatches, failures, the machine and the roofline definitions."""
    out = []
    counting: dict[str, set[str]] = {}
    for run in runs:
        counting.setdefault(run.backend, set()).update(run.metrics["token_counting"])
    explain = {"usage": "server-reported usage in every chunk", "engine": "engine outputs (in-process)",
               "streamer": "generate's streamer, one token per row per step (in-process)",
               "chunks+length": "no usage while streaming: one token per content chunk, total = max_tokens "
                                "(finish_reason length)",
               "chunks+final-usage": "no per-chunk usage: one token per content chunk, total from the final usage",
               "chunks": "no usage at all: one token per content chunk"}
    for backend, kinds in counting.items():
        out.append(f"{backend}: tokens counted from " + "; ".join(explain.get(k, k) for k in sorted(kinds)))
    for run in runs:
        m = run.metrics
        if m["failed"]:
            out.append(f"{run.backend} {run.spec.label}: {m['failed']} failed requests, e.g. "
                       f"{(m.get('first_errors') or ['?'])[0]}")
        if m["output_length_mismatches"]:
            out.append(f"{run.backend} {run.spec.label}: {m['output_length_mismatches']} requests generated a "
                       f"different number of tokens than requested")
    machine = report.get("machine") or {}
    if machine:
        out.append(f"machine: {machine.get('cpu')}, {machine.get('cores')} cores, load average at start "
                   f"{(machine.get('load_average_at_start') or ['?'])[0]}, tokenmill {machine.get('tokenmill_git')}")
    ceilings = report.get("ceilings")
    if ceilings:
        out.append(f"measured ceilings: read {ceilings['read_gb_per_s']:.1f} GB/s, {ceilings['dtype']} matmul "
                   f"{ceilings['matmul_gflop_per_s']:.0f} GFLOP/s ({ceilings['threads']} threads)")
    out.append("GB/s: single stream = (weights + KV of the mean decode context) bytes per step / TPOT (median over "
               "requests); in-process batched runs = weight bytes × forward steps/s (KV excluded)")
    return out


def write_json(report: dict[str, Any], path: Path) -> None:
    """Strict JSON: infinite rates become "inf", other non-finite numbers null, numeric keys strings."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {_key(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return "inf" if value == math.inf else None
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "to_json"):
        return _jsonable(value.to_json())
    return str(value)


def _key(key: Any) -> str:
    if isinstance(key, float):
        return "inf" if math.isinf(key) else repr(key)
    return str(key)


# ---- plots --------------------------------------------------------------------------------------------------------


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plots(report: dict[str, Any], runs: list[RunResult], out_dir: Path, name: str) -> list[Path]:
    """Latency CDFs; throughput/goodput and p99 latencies vs request rate; vs concurrency; peers side by side."""
    plt = _pyplot()
    if plt is None or not runs:
        return []
    written = [_latency_cdfs(plt, runs, out_dir / f"{name}_latency_cdf.png")]
    rates = {r.spec.request_rate for r in runs if r.spec.scenario == "serve" and not math.isinf(r.spec.request_rate)}
    if len(rates) > 1:
        written.append(_versus(plt, runs, lambda r: r.spec.request_rate, "request rate (req/s)", report,
                               out_dir / f"{name}_vs_rate.png"))
    levels = {r.spec.concurrency for r in runs if r.spec.scenario == "concurrency"}
    if len(levels) > 1:
        written.append(_versus(plt, runs, lambda r: r.spec.concurrency, "concurrent clients", report,
                               out_dir / f"{name}_vs_concurrency.png"))
    if len({r.backend for r in runs}) > 1:
        written.append(_peers(plt, runs, out_dir / f"{name}_peers.png"))
    return [p for p in written if p is not None]


def _cdf(ax: Any, values: list[float], label: str) -> None:
    if not values:
        return
    ordered = sorted(values)
    ax.step(ordered, [(i + 1) / len(ordered) for i in range(len(ordered))], where="post", label=label)


def _latency_cdfs(plt: Any, runs: list[RunResult], path: Path) -> Path:
    extractors: list[tuple[str, Callable[[RequestRecord], list[float]]]] = [
        ("TTFT (ms)", lambda r: [x * 1000 for x in [ttft(r)] if x is not None]),
        ("TPOT (ms)", lambda r: [x * 1000 for x in [tpot(r)] if x is not None]),
        ("ITL per token (ms)", lambda r: [x * 1000 for x in inter_token_latencies(r)]),
        ("E2E latency (s)", lambda r: [x for x in [e2e_latency(r)] if x is not None])]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    for ax, (title, extract) in zip(axes.flat, extractors, strict=True):
        for (label, backend), group in group_runs(runs).items():
            values = [v for run in group for r in run.records if r.success for v in extract(r)]
            _cdf(ax, values, f"{backend} · {label}")
        ax.set_xlabel(title)
        ax.set_ylabel("fraction of " + ("tokens" if "ITL" in title else "requests"))
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle("Latency CDFs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _versus(plt: Any, runs: list[RunResult], key: Callable[[RunResult], float], xlabel: str,
            report: dict[str, Any], path: Path) -> Path:
    slo = report.get("slo") or {}
    goodput = any("goodput" in r.metrics for r in runs)
    panels = [("output tokens/s", "output_throughput", None),
              ("goodput (req/s meeting SLOs)" if goodput else "requests/s",
               "goodput" if goodput else "request_throughput", None),
              ("p99 TTFT (ms)", "ttft_ms.p99", slo.get("ttft_ms")),
              ("p99 TPOT (ms)", "tpot_ms.p99", slo.get("tpot_ms"))]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5))
    backends = list(dict.fromkeys(r.backend for r in runs))
    for ax, (title, metric, limit) in zip(axes.flat, panels, strict=True):
        for backend in backends:
            points: dict[float, list[float]] = {}
            for run in runs:
                value = _get(run.metrics, metric)
                x = key(run)
                if run.backend == backend and value is not None and not math.isinf(x):
                    points.setdefault(x, []).append(value)
            xs = sorted(points)
            ax.plot(xs, [statistics.median(points[x]) for x in xs], marker="o", label=backend)
        if limit is not None:
            ax.axhline(limit, color="red", linestyle="--", linewidth=1, label="SLO")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(title)
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _peers(plt: Any, runs: list[RunResult], path: Path) -> Path:
    groups = group_runs(runs)
    labels = list(dict.fromkeys(label for label, _ in groups))
    backends = list(dict.fromkeys(backend for _, backend in groups))
    panels = [("output tokens/s", "output_throughput"), ("median TTFT (ms)", "ttft_ms.median"),
              ("median TPOT (ms)", "tpot_ms.median")]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.5))
    width = 0.8 / len(backends)
    for ax, (title, metric) in zip(axes, panels, strict=True):
        for i, backend in enumerate(backends):
            values = [median_of(groups.get((label, backend), []), metric) or 0.0 for label in labels]
            ax.bar([x + i * width for x in range(len(labels))], values, width, label=backend)
        ax.set_xticks([x + width * (len(backends) - 1) / 2 for x in range(len(labels))])
        ax.set_xticklabels(labels, rotation=20, fontsize=8)
        ax.set_title(title)
        ax.grid(alpha=0.3, axis="y")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
