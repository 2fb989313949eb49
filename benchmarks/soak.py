"""Soak test of `tokenmill serve`: many concurrent clients for a set time, mixing valid requests with aborts, invalid
requests and slow readers. Passes when no request that should work failed, no KV block is still in use after the
drain, and the server's resident memory stayed flat.

Each of `--concurrency` client tasks loops until `--duration` is over, each time drawing one kind of request
(`--seed`, one RNG per task so the sequence of kinds does not depend on timing):

- stream: a streamed chat or text completion read to `data: [DONE]` and checked as SSE (every event well formed, one
  finish_reason per choice, nothing after [DONE], a usage chunk consistent with max_tokens);
- nonstream: the same without streaming;
- abort: a stream dropped at its headers or after 1-5 events, or a non-streaming request cancelled after 0.05-1 s;
- invalid: bad JSON, wrong types, n=0, temperature=-1, max_tokens or a prompt beyond the context, an unknown model,
  ...: the answer must be a 4xx with an OpenAI error body, never a 5xx;
- slow: a stream read with a 0.2-1 s pause after every event.

A 503 (overloaded) is counted as "refused", apart from errors, and the client waits its Retry-After. Every second the
server's RSS, open file descriptors and threads, and /metrics (running/waiting requests, KV usage, token counters)
are sampled. After the duration no new request starts; once the ones in flight are done the KV usage and the
running/waiting gauges must come back to 0, and one more request of each valid kind must succeed.

    .venv/bin/python benchmarks/soak.py                                  # 60 s, 256 clients, starts its own server
    .venv/bin/python benchmarks/soak.py --duration 1800                  # the run quoted in docs/server.md
    .venv/bin/python benchmarks/soak.py --server-args "--dtype bfloat16 --threads 2"
    .venv/bin/python benchmarks/soak.py --url http://127.0.0.1:8000 --server-pid 1234   # a server already running

Prints a Markdown table per kind, writes JSON (`--out`), a PNG of RSS and throughput over time (`--png`) and keeps the
server's log beside them; exits 1 when a check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenmill.bench.machine import busy_warning, machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
KINDS = ("stream", "nonstream", "abort", "invalid", "slow")
ABORT_VARIANTS = ("at-headers", "mid-stream", "nonstream")
VALID_KINDS = ("stream", "nonstream", "slow")
FINISH_REASONS = frozenset({"stop", "length"})
METRIC = "tokenmill:"

# Plain words so that prompt lengths in tokens track the word counts; a few shared system prompts give the prefix
# cache hits, and so cached-then-freed blocks, to account for after the drain.
WORDS = ("the", "a", "river", "mountain", "city", "engine", "token", "cache", "quiet", "bright", "paper", "window",
         "garden", "number", "story", "music", "winter", "summer", "yellow", "market", "letter", "bridge", "forest",
         "signal", "station", "island", "memory", "orange", "silver", "question", "answer", "simple", "careful",
         "over", "under", "before", "after", "because", "while", "and", "or", "but", "write", "explain", "count",
         "describe", "list", "compare", "seven", "twelve", "hundred", "small", "large", "old", "new", "green")
_system_rng = random.Random(1234)
SYSTEM_PROMPTS = tuple("You are a helpful assistant. Context: " + " ".join(_system_rng.choices(WORDS, k=150))
                       for _ in range(4))


# ---- arguments ----------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=60.0, help="seconds of load (default 60)")
    p.add_argument("--concurrency", type=int, default=256, help="client tasks, each one request at a time")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mix", default="stream=35,nonstream=20,abort=15,invalid=15,slow=15",
                   help="relative weights of the request kinds")
    p.add_argument("--abort-variants", default=",".join(ABORT_VARIANTS),
                   help="how clients give up: at-headers, mid-stream (after 1-5 events), nonstream (after 0.05-1 s)")
    p.add_argument("--max-tokens-range", default="8,64", help="max_tokens of valid requests, uniform")
    p.add_argument("--slow-max-tokens-range", default="8,32", help="max_tokens of slow readers")
    p.add_argument("--slow-pause-range", default="0.2,1.0", help="seconds a slow reader waits after every event")
    p.add_argument("--max-prompt-words", type=int, default=300,
                   help="prompt lengths are log-uniform between 1 word and this")
    p.add_argument("--request-timeout", type=float, default=900.0,
                   help="seconds without a byte before a request counts as failed (a non-streamed request sends "
                        "nothing until done, and 256 clients queue for minutes on two cores)")
    p.add_argument("--drain-timeout", type=float, default=None,
                   help="seconds the requests in flight at the end get to finish (default: --request-timeout, so "
                        "that only a request the client would have given up on counts as stuck)")
    p.add_argument("--settle-timeout", type=float, default=30.0,
                   help="seconds after the drain for the gauges to reach 0")
    p.add_argument("--sample-interval", type=float, default=1.0)
    p.add_argument("--progress-interval", type=float, default=10.0, help="seconds between progress lines")
    p.add_argument("--max-rss-growth-mib", type=float, default=64.0,
                   help="memory is not flat when the late RSS median exceeds the early one by more than this ...")
    p.add_argument("--max-rss-growth-pct", type=float, default=10.0, help="... or by more than this percentage")
    server = p.add_argument_group("server")
    server.add_argument("--url", default=None, help="soak a server already running here instead of starting one")
    server.add_argument("--server-pid", type=int, default=None, help="with --url: the pid whose memory to watch")
    server.add_argument("--server-args", default="",
                        help="extra `tokenmill serve` arguments for the server this script starts")
    server.add_argument("--max-waiting-requests", type=int, default=1024,
                        help="passed to the server this script starts, so the clients are not refused")
    server.add_argument("--startup-timeout", type=float, default=600.0,
                        help="seconds to wait for /health (the first start may build the CPU kernels)")
    out = p.add_argument_group("output")
    out.add_argument("--out", type=Path, default=RESULTS / "soak.json")
    out.add_argument("--png", type=Path, default=RESULTS / "soak.png")
    out.add_argument("--server-log", type=Path, default=RESULTS / "soak_server.log")
    args = p.parse_args(argv)
    args.mix_weights = _mix(p, args.mix)
    if args.drain_timeout is None:
        args.drain_timeout = args.request_timeout
    args.abort_variant_list = [v.strip() for v in args.abort_variants.split(",") if v.strip()]
    if not args.abort_variant_list or not set(args.abort_variant_list) <= set(ABORT_VARIANTS):
        p.error(f"--abort-variants: a comma-separated subset of {', '.join(ABORT_VARIANTS)}")
    for name in ("max_tokens_range", "slow_max_tokens_range"):
        setattr(args, name, _pair(p, name, getattr(args, name), int))
    args.slow_pause_range = _pair(p, "slow_pause_range", args.slow_pause_range, float)
    if args.concurrency < 1 or args.duration <= 0:
        p.error("--concurrency and --duration must be positive")
    if args.server_pid is not None and args.url is None:
        p.error("--server-pid goes with --url")
    return args


def _mix(p: argparse.ArgumentParser, text: str) -> dict[str, float]:
    weights = dict.fromkeys(KINDS, 0.0)
    for item in text.split(","):
        name, _, value = item.partition("=")
        if name.strip() not in weights:
            p.error(f"--mix: unknown kind {name!r}; kinds are {', '.join(KINDS)}")
        try:
            weights[name.strip()] = float(value)
        except ValueError:
            p.error(f"--mix: expected KIND=WEIGHT, got {item!r}")
    if sum(weights.values()) <= 0:
        p.error("--mix: all weights are 0")
    return weights


def _pair(p: argparse.ArgumentParser, name: str, text: str, kind: type) -> tuple[Any, Any]:
    try:
        low, high = (kind(v) for v in text.split(","))
    except ValueError:
        p.error(f"--{name.replace('_', '-')}: expected LOW,HIGH, got {text!r}")
    if low > high or low < 0:
        p.error(f"--{name.replace('_', '-')}: expected 0 <= LOW <= HIGH, got {text!r}")
    return low, high


# ---- the server ---------------------------------------------------------------------------------------------------


@dataclass
class ServerProcess:
    """A `tokenmill serve` this script started, its output going to a log file."""

    proc: subprocess.Popen[bytes]
    url: str
    command: list[str]
    log_path: Path

    @classmethod
    def start(cls, args: argparse.Namespace) -> ServerProcess:
        port = _free_port()
        command = [sys.executable, "-m", "tokenmill.entrypoints.cli", "serve", "--host", "127.0.0.1", "--port",
                   str(port), "--max-waiting-requests", str(args.max_waiting_requests), "--no-access-log",
                   *shlex.split(args.server_args)]
        args.server_log.parent.mkdir(parents=True, exist_ok=True)
        with args.server_log.open("wb") as log:
            # A session of its own: Ctrl-C on the soak must not reach the server before the soak's own shutdown.
            proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)
        return cls(proc, f"http://127.0.0.1:{port}", command, args.server_log)

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode} while starting:\n{self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=2.0).status_code == 200:
                    return
            time.sleep(0.5)
        raise RuntimeError(f"the server was not healthy after {timeout:.0f} s:\n{self.log_tail()}")

    def stop(self, timeout: float = 60.0) -> dict[str, Any]:
        """SIGTERM (the server's graceful drain), then SIGKILL if it does not exit in time."""
        started = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                return {"exit_code": self.proc.returncode, "seconds": time.monotonic() - started, "killed": True}
        return {"exit_code": self.proc.returncode, "seconds": time.monotonic() - started, "killed": False}

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def scan_server_log(path: Path) -> dict[str, Any]:
    """Tracebacks and ERROR lines, grouped by (the line before, the exception): the server logs every unhandled
    exception, even one no client saw."""
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    problems: Counter[str] = Counter()
    tracebacks = 0
    for i, line in enumerate(lines):
        if line.startswith("Traceback"):
            tracebacks += 1
            end = i + 1
            while end < len(lines) and (lines[end].startswith((" ", "Traceback")) or not lines[end].strip()):
                end += 1
            exception = lines[end] if end < len(lines) else "?"
            problems[_unaddressed(f"{lines[i - 1] if i else ''} -> {exception}")] += 1
        elif "ERROR" in line and not (i + 1 < len(lines) and lines[i + 1].startswith("Traceback")):
            problems[_unaddressed(line)] += 1
    return {"path": str(path), "tracebacks": tracebacks, "error_lines": sum(problems.values()),
            "problems": dict(problems.most_common(20))}


def _unaddressed(line: str) -> str:
    """Without memory addresses and request ids, so that the same failure groups under one line."""
    line = re.sub(r"0x[0-9a-f]+", "0x...", line)
    return re.sub(r"\b(chatcmpl|cmpl)-[0-9a-f]{8,}(-\d+)*", r"\1-...", line)[:300]


def torch_threads(server_args: str) -> int:
    """The torch threads the server runs with: --threads, or torch's default, which only torch itself knows."""
    parts = shlex.split(server_args)
    for i, part in enumerate(parts):
        if part == "--threads" and i + 1 < len(parts):
            return int(parts[i + 1])
        if part.startswith("--threads="):
            return int(part.split("=", 1)[1])
    out = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"], capture_output=True,
                         text=True, check=False)
    return int(out.stdout.strip()) if out.returncode == 0 else -1


# ---- process memory -----------------------------------------------------------------------------------------------


def process_sample(pid: int | None) -> dict[str, Any]:
    """RSS (MiB), open file descriptors and threads, from /proc so nothing beyond the standard library is needed."""
    if pid is None:
        return {}
    try:
        status = Path(f"/proc/{pid}/status").read_text()
        fds = len(os.listdir(f"/proc/{pid}/fd"))
        cpu = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return {}
    fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    ticks = os.sysconf("SC_CLK_TCK")
    return {"rss_mib": int(fields["VmRSS"].split()[0]) / 1024, "threads": int(fields["Threads"]), "fds": fds,
            # utime and stime, fields 14 and 15 of stat (11 and 12 after the command name)
            "cpu_s": (int(cpu[11]) + int(cpu[12])) / ticks}


# ---- requests -----------------------------------------------------------------------------------------------------


@dataclass
class Outcome:
    result: str  # "ok", "error" or "refused"
    latency: float
    detail: str = ""
    tokens: int = 0
    ttft: float | None = None
    variant: str = ""
    status: int | None = None
    retry_after: float = 0.0


@dataclass
class KindStats:
    count: int = 0
    ok: int = 0
    errors: int = 0
    refused: int = 0
    latencies: list[float] = field(default_factory=list)
    ttfts: list[float] = field(default_factory=list)
    variants: Counter[str] = field(default_factory=Counter)
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    error_details: Counter[str] = field(default_factory=Counter)

    def add(self, outcome: Outcome) -> None:
        self.count += 1
        if outcome.variant:
            self.variants[outcome.variant] += 1
            status = str(outcome.status) if outcome.status is not None else "no answer"
            self.statuses.setdefault(outcome.variant, Counter())[status] += 1
        if outcome.result == "ok":
            self.ok += 1
            self.latencies.append(outcome.latency)
            if outcome.ttft is not None:
                self.ttfts.append(outcome.ttft)
        elif outcome.result == "refused":
            self.refused += 1
        else:
            self.errors += 1
            detail = f"{outcome.variant + ': ' if outcome.variant else ''}{_unaddressed(outcome.detail)}"
            self.error_details[detail[:300]] += 1

    def summary(self) -> dict[str, Any]:
        return {"count": self.count, "ok": self.ok, "errors": self.errors, "refused": self.refused,
                "latency_s": _distribution(self.latencies), "ttft_s": _distribution(self.ttfts),
                "variants": dict(self.variants), "statuses": {k: dict(v) for k, v in self.statuses.items()},
                "errors_by_detail": dict(self.error_details.most_common(20))}


@dataclass
class Soak:
    """What every client task shares: the HTTP client, the server's facts, the deadline and the tallies."""

    args: argparse.Namespace
    client: httpx.AsyncClient
    model: str
    max_model_len: int
    deadline: float = 0.0
    stats: dict[str, KindStats] = field(default_factory=dict)
    completed: int = 0
    output_tokens: int = 0

    def record(self, kind: str, outcome: Outcome) -> None:
        self.stats.setdefault(kind, KindStats()).add(outcome)
        if outcome.result == "ok" and kind in VALID_KINDS:
            self.completed += 1
            self.output_tokens += outcome.tokens


def _prompt(rng: random.Random, max_words: int) -> str:
    words = max(1, round(math.exp(rng.uniform(0.0, math.log(max_words)))))
    return " ".join(rng.choices(WORDS, k=words))


def valid_body(soak: Soak, rng: random.Random, *, stream: bool, max_tokens: int) -> tuple[str, dict[str, Any], int]:
    """A random valid chat or text completion: (path, body, n)."""
    n = 2 if rng.random() < 0.15 else 1
    body: dict[str, Any] = {"model": soak.model, "max_tokens": max_tokens, "n": n}
    if rng.random() < 0.5:
        body["temperature"] = 0.0
    else:
        body.update(temperature=0.8, top_p=0.95, seed=rng.randrange(2**31))
    if stream:
        body.update(stream=True, stream_options={"include_usage": True})
    text = _prompt(rng, soak.args.max_prompt_words)
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < 0.5 else None
    if rng.random() < 0.5:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return "/v1/chat/completions", {**body, "messages": messages}, n
    return "/v1/completions", {**body, "prompt": f"{system}\n\n{text}" if system else text}, n


def http_failure(response: httpx.Response, latency: float, variant: str = "") -> Outcome:
    status, text = response.status_code, response.text
    if status == 503:
        try:
            retry_after = float(response.headers.get("retry-after", "1"))
        except ValueError:
            retry_after = 1.0
        return Outcome("refused", latency, f"HTTP 503: {text[:200]}", variant=variant, status=status,
                       retry_after=min(retry_after, 10.0))
    return Outcome("error", latency, f"HTTP {status}: {text[:200]}", variant=variant, status=status)


def _transport_error(exc: Exception, started: float, variant: str = "") -> Outcome:
    return Outcome("error", time.monotonic() - started, f"{type(exc).__name__}: {exc}"[:300], variant=variant)


class SSECheck:
    """Checks a streamed reply as it arrives: `data:` events ended by a blank line, JSON chunks of one reply id, one
    finish_reason per choice and nothing for a choice after it, `[DONE]` last, usage consistent with max_tokens."""

    def __init__(self, n: int, max_tokens: int, started: float) -> None:
        self.n, self.max_tokens, self.started = n, max_tokens, started
        self.pending: list[str] = []
        self.events = 0
        self.done = False
        self.finish: dict[int, str] = {}
        self.usage: dict[str, Any] | None = None
        self.reply_id: str | None = None
        self.ttft: float | None = None
        self.problem: str | None = None

    def feed(self, line: str) -> None:
        if self.problem:
            return
        if line == "":
            if self.pending:
                self._event("\n".join(self.pending))
                self.pending = []
        elif line.startswith(":"):
            pass  # an SSE comment, e.g. a keep-alive
        elif line.startswith("data:"):
            self.pending.append(line[5:].removeprefix(" "))
        else:
            self.problem = f"not an SSE data line: {line[:120]!r}"

    def _event(self, data: str) -> None:
        self.events += 1
        if self.done:
            self.problem = f"an event after [DONE]: {data[:120]!r}"
            return
        if data == "[DONE]":
            self.done = True
            return
        try:
            chunk = json.loads(data)
        except ValueError:
            self.problem = f"an event that is not JSON: {data[:120]!r}"
            return
        if not isinstance(chunk, dict) or "error" in chunk:
            self.problem = f"an error event: {data[:200]}"
            return
        if self.reply_id is None:
            self.reply_id = chunk.get("id")
        elif chunk.get("id") != self.reply_id:
            self.problem = f"the reply id changed from {self.reply_id!r} to {chunk.get('id')!r}"
            return
        choices = chunk.get("choices")
        if not isinstance(choices, list):
            self.problem = f"a chunk without a choices list: {data[:200]}"
        elif not choices:
            self.usage = chunk.get("usage")
            if not isinstance(self.usage, dict):
                self.problem = f"a chunk with neither choices nor usage: {data[:200]}"
        else:
            for choice in choices:
                self._choice(choice)

    def _choice(self, choice: Any) -> None:
        index = choice.get("index") if isinstance(choice, dict) else None
        if not isinstance(index, int) or not 0 <= index < self.n:
            self.problem = f"a choice with index {index!r}, n={self.n}"
            return
        if index in self.finish:
            self.problem = f"choice {index} went on after its finish_reason {self.finish[index]!r}"
            return
        text = choice.get("text") if "text" in choice else (choice.get("delta") or {}).get("content")
        if text and self.ttft is None:
            self.ttft = time.monotonic() - self.started
        reason = choice.get("finish_reason")
        if reason is not None:
            if reason not in FINISH_REASONS:
                self.problem = f"choice {index} finished with {reason!r}"
            self.finish[index] = reason

    def verdict(self) -> str | None:
        """None when the stream was complete and consistent, else what was wrong."""
        if self.problem:
            return self.problem
        if self.pending:
            return "the stream ended in the middle of an event"
        if not self.done:
            return f"the stream ended without data: [DONE] after {self.events} events"
        if len(self.finish) != self.n:
            return f"finish_reason for {len(self.finish)} of {self.n} choices"
        return usage_problem(self.usage, self.n, self.max_tokens, list(self.finish.values()))


def usage_problem(usage: Any, n: int, max_tokens: int, reasons: list[str]) -> str | None:
    tokens = usage.get("completion_tokens") if isinstance(usage, dict) else None
    if not isinstance(tokens, int):
        return f"no usage.completion_tokens: {usage!r}"
    if tokens > n * max_tokens or (all(r == "length" for r in reasons) and tokens != n * max_tokens):
        return f"completion_tokens {tokens} with n={n}, max_tokens={max_tokens}, finish_reasons {reasons}"
    return None


def reply_problem(reply: Any, n: int, max_tokens: int) -> str | None:
    """None when a non-streamed reply has n well-formed choices and consistent usage."""
    choices = reply.get("choices") if isinstance(reply, dict) else None
    if not isinstance(choices, list) or len(choices) != n:
        return f"expected {n} choices: {str(reply)[:200]}"
    reasons = []
    for i, choice in enumerate(choices):
        text = choice.get("text") if "text" in choice else (choice.get("message") or {}).get("content")
        if choice.get("index") != i or not isinstance(text, str):
            return f"malformed choice {i}: {str(choice)[:200]}"
        if choice.get("finish_reason") not in FINISH_REASONS:
            return f"choice {i} finished with {choice.get('finish_reason')!r}"
        reasons.append(choice["finish_reason"])
    return usage_problem(reply.get("usage"), n, max_tokens, reasons)


async def run_stream(soak: Soak, rng: random.Random, *, slow: bool = False) -> Outcome:
    low, high = soak.args.slow_max_tokens_range if slow else soak.args.max_tokens_range
    max_tokens = rng.randint(low, high)
    path, body, n = valid_body(soak, rng, stream=True, max_tokens=max_tokens)
    started = time.monotonic()
    check = SSECheck(n, max_tokens, started)
    try:
        async with soak.client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return http_failure(response, time.monotonic() - started)
            if not response.headers.get("content-type", "").startswith("text/event-stream"):
                return Outcome("error", time.monotonic() - started,
                               f"content-type {response.headers.get('content-type')!r}", status=200)
            async with contextlib.aclosing(response.aiter_lines()) as lines:
                async for line in lines:
                    check.feed(line)
                    if slow and line == "":
                        await asyncio.sleep(rng.uniform(*soak.args.slow_pause_range))
    except httpx.HTTPError as exc:
        return _transport_error(exc, started)
    latency = time.monotonic() - started
    problem = check.verdict()
    if problem:
        return Outcome("error", latency, problem, status=200)
    return Outcome("ok", latency, tokens=int(check.usage["completion_tokens"]) if check.usage else 0, ttft=check.ttft,
                   status=200)


async def run_nonstream(soak: Soak, rng: random.Random) -> Outcome:
    max_tokens = rng.randint(*soak.args.max_tokens_range)
    path, body, n = valid_body(soak, rng, stream=False, max_tokens=max_tokens)
    started = time.monotonic()
    try:
        response = await soak.client.post(path, json=body)
    except httpx.HTTPError as exc:
        return _transport_error(exc, started)
    latency = time.monotonic() - started
    if response.status_code != 200:
        return http_failure(response, latency)
    try:
        reply = response.json()
    except ValueError:
        return Outcome("error", latency, f"a 200 reply that is not JSON: {response.text[:200]!r}", status=200)
    problem = reply_problem(reply, n, max_tokens)
    if problem:
        return Outcome("error", latency, problem, status=200)
    return Outcome("ok", latency, tokens=int(reply["usage"]["completion_tokens"]), status=200)


async def run_abort(soak: Soak, rng: random.Random) -> Outcome:
    """Gives up on a request the way a client does: closing the connection. Long max_tokens so that it is still
    generating then; a request that finished first still counts as ok (variant `...-finished`)."""
    variant = rng.choice(soak.args.abort_variant_list)
    max_tokens = soak.args.max_tokens_range[1]
    path, body, _ = valid_body(soak, rng, stream=variant != "nonstream", max_tokens=max_tokens)
    started = time.monotonic()
    try:
        if variant == "nonstream":
            try:
                response = await asyncio.wait_for(soak.client.post(path, json=body), rng.uniform(0.05, 1.0))
            except TimeoutError:
                return Outcome("ok", time.monotonic() - started, variant=variant)
            if response.status_code != 200:
                return http_failure(response, time.monotonic() - started, variant)
            return Outcome("ok", time.monotonic() - started, variant=variant + "-finished", status=200)
        async with soak.client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return http_failure(response, time.monotonic() - started, variant)
            keep = 0 if variant == "at-headers" else rng.randint(1, 5)
            events = 0
            if keep:
                async with contextlib.aclosing(response.aiter_lines()) as lines:
                    async for line in lines:
                        events += line == ""
                        if events >= keep:
                            break
                    else:
                        variant += "-finished"
        # Leaving the block with the body unread closes the connection: the server sees a disconnect.
    except httpx.HTTPError as exc:
        return _transport_error(exc, started, variant)
    return Outcome("ok", time.monotonic() - started, variant=variant, status=200)


@dataclass(frozen=True)
class InvalidCase:
    name: str
    expect: int
    build: Callable[[Soak], dict[str, Any]]  # keyword arguments of httpx's request()
    method: str = "POST"
    path: str = "/v1/chat/completions"


def _chat(soak: Soak, **fields: Any) -> dict[str, Any]:
    return {"json": {"model": soak.model, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 8,
                     **fields}}


INVALID_CASES = (
    InvalidCase("bad-json", 400, lambda s: {"content": b'{"messages": [{"role": "user", "content": "hi"',
                                            "headers": {"content-type": "application/json"}}),
    InvalidCase("not-json", 400, lambda s: {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    InvalidCase("empty-body", 400, lambda s: {"content": b""}),
    InvalidCase("not-an-object", 400, lambda s: {"json": [1, 2, 3]}),
    InvalidCase("messages-not-list", 400, lambda s: {"json": {"model": s.model, "messages": "hello"}}),
    InvalidCase("max-tokens-string", 400, lambda s: _chat(s, max_tokens="ten")),
    InvalidCase("n-zero", 400, lambda s: _chat(s, n=0)),
    InvalidCase("temperature-negative", 400, lambda s: _chat(s, temperature=-1)),
    InvalidCase("top-p-zero", 400, lambda s: _chat(s, top_p=0)),
    InvalidCase("max-tokens-beyond-context", 400, lambda s: _chat(s, max_tokens=4 * s.max_model_len)),
    InvalidCase("max-tokens-negative", 400, lambda s: _chat(s, max_tokens=-5)),
    InvalidCase("unknown-model", 404, lambda s: _chat(s, model="no-such-model")),
    InvalidCase("empty-messages", 400, lambda s: {"json": {"model": s.model, "messages": []}}),
    InvalidCase("bad-role", 400, lambda s: {"json": {"messages": [{"role": "robot", "content": "hi"}]}}),
    InvalidCase("stop-token-out-of-vocab", 400, lambda s: _chat(s, stop_token_ids=[10**9])),
    InvalidCase("top-logprobs-without-logprobs", 400, lambda s: _chat(s, top_logprobs=3)),
    InvalidCase("prompt-beyond-context", 400, lambda s: {"json": {"model": s.model, "max_tokens": 8,
                                                                  "prompt": [42] * (s.max_model_len + 1)}},
                path="/v1/completions"),
    InvalidCase("token-id-out-of-vocab", 400, lambda s: {"json": {"model": s.model, "prompt": [10**9],
                                                                  "max_tokens": 8}}, path="/v1/completions"),
    InvalidCase("empty-prompt", 400, lambda s: {"json": {"model": s.model, "prompt": "", "max_tokens": 8}},
                path="/v1/completions"),
    InvalidCase("logprobs-too-many", 400, lambda s: {"json": {"model": s.model, "prompt": "hi", "logprobs": 99}},
                path="/v1/completions"),
    InvalidCase("wrong-method", 405, lambda s: {}, method="GET"),
    InvalidCase("unknown-route", 404, lambda s: _chat(s), path="/v1/chat/completion"),
)


async def run_invalid(soak: Soak, rng: random.Random) -> Outcome:
    """Any 4xx with an OpenAI error body passes (the expected status is only tallied); a 2xx or 5xx fails."""
    case = rng.choice(INVALID_CASES)
    started = time.monotonic()
    try:
        response = await soak.client.request(case.method, case.path, **case.build(soak))
    except httpx.HTTPError as exc:
        return _transport_error(exc, started, case.name)
    latency = time.monotonic() - started
    status = response.status_code
    if status == 503 or not 400 <= status < 500:
        return http_failure(response, latency, case.name)
    try:
        error = response.json().get("error")
    except (ValueError, AttributeError):
        error = None
    if not isinstance(error, dict) or not isinstance(error.get("message"), str):
        return Outcome("error", latency, f"HTTP {status} without an OpenAI error body: {response.text[:200]!r}",
                       variant=case.name, status=status)
    return Outcome("ok", latency, variant=case.name, status=status)


RUNNERS: dict[str, Callable[[Soak, random.Random], Awaitable[Outcome]]] = {
    "stream": run_stream,
    "nonstream": run_nonstream,
    "abort": run_abort,
    "invalid": run_invalid,
    "slow": lambda soak, rng: run_stream(soak, rng, slow=True),
}


async def client_loop(soak: Soak, index: int) -> None:
    rng = random.Random(f"{soak.args.seed}-{index}")
    kinds = list(soak.args.mix_weights)
    weights = list(soak.args.mix_weights.values())
    while time.monotonic() < soak.deadline:
        kind = rng.choices(kinds, weights)[0]
        try:
            outcome = await RUNNERS[kind](soak, rng)
        except Exception as exc:  # a surprise must show in the tally, not silently end a client
            outcome = Outcome("error", 0.0, f"unexpected {type(exc).__name__}: {exc}"[:300])
        soak.record(kind, outcome)
        if outcome.result == "refused":
            await asyncio.sleep(outcome.retry_after)


# ---- sampling -----------------------------------------------------------------------------------------------------


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text format, summed over label sets (each engine-wide metric has one)."""
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(METRIC):
            continue
        series, _, value = line.rpartition(" ")
        name = series.split("{", 1)[0]
        with contextlib.suppress(ValueError):
            values[name] = values.get(name, 0.0) + float(value)
    return values


def finish_reasons(text: str) -> dict[str, float]:
    counts: dict[str, float] = {}
    for match in re.finditer(r'^tokenmill:request_success_total\{[^}]*finished_reason="([^"]*)"[^}]*\} (\S+)$', text,
                             re.MULTILINE):
        counts[match.group(1)] = counts.get(match.group(1), 0.0) + float(match.group(2))
    return counts


async def scrape(probe: httpx.AsyncClient) -> tuple[dict[str, float], str]:
    try:
        response = await probe.get("/metrics")
        response.raise_for_status()
    except httpx.HTTPError:
        return {}, ""
    return parse_metrics(response.text), response.text


async def sampler(soak: Soak, probe: httpx.AsyncClient, pid: int | None, start: float, samples: list[dict[str, Any]],
                  stop: asyncio.Event) -> None:
    """One sample per interval, on a fixed grid so that a slow scrape does not shift the time axis."""
    interval = soak.args.sample_interval
    next_progress = soak.args.progress_interval
    tick = 0
    while not stop.is_set():
        metrics, _ = await scrape(probe)
        t = time.monotonic() - start
        sample: dict[str, Any] = {"t": t, "completed": soak.completed, "output_tokens": soak.output_tokens,
                                  **process_sample(pid),
                                  "running": metrics.get(METRIC + "num_requests_running"),
                                  "waiting": metrics.get(METRIC + "num_requests_waiting"),
                                  "kv_usage": metrics.get(METRIC + "kv_cache_usage_perc"),
                                  "generation_tokens": metrics.get(METRIC + "generation_tokens_total"),
                                  "prompt_tokens": metrics.get(METRIC + "prompt_tokens_total"),
                                  "preemptions": metrics.get(METRIC + "num_preemptions_total")}
        samples.append(sample)
        if t >= next_progress:
            next_progress += soak.args.progress_interval
            print(progress_line(soak, samples), file=sys.stderr, flush=True)
        tick += 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), max(0.0, start + tick * interval - time.monotonic()))


def progress_line(soak: Soak, samples: list[dict[str, Any]]) -> str:
    last = samples[-1]
    window = [s for s in samples if s["t"] >= last["t"] - 10.0]
    rate = _rate(window, "generation_tokens")
    errors = sum(s.errors for s in soak.stats.values())
    refused = sum(s.refused for s in soak.stats.values())
    rss = f"{last['rss_mib']:.0f} MiB" if "rss_mib" in last else "?"
    return (f"[soak] t={last['t']:6.0f}s rss={rss} gen={rate:7.1f} tok/s running={_fmt(last['running'], 0)} "
            f"waiting={_fmt(last['waiting'], 0)} kv={_fmt(last['kv_usage'], 3)} ok={soak.completed} errors={errors} "
            f"refused={refused}")


def _rate(window: list[dict[str, Any]], key: str) -> float:
    points = [(s["t"], s[key]) for s in window if s.get(key) is not None]
    if len(points) < 2 or points[-1][0] <= points[0][0]:
        return 0.0
    return (points[-1][1] - points[0][1]) / (points[-1][0] - points[0][0])


def add_rates(samples: list[dict[str, Any]]) -> None:
    """Per-interval rates from the cumulative counters."""
    for prev, cur in zip(samples, samples[1:], strict=False):
        dt = cur["t"] - prev["t"]
        for key, rate in (("generation_tokens", "gen_tok_s"), ("output_tokens", "client_tok_s"),
                          ("completed", "completed_per_s")):
            if dt > 0 and cur.get(key) is not None and prev.get(key) is not None:
                cur[rate] = (cur[key] - prev[key]) / dt


# ---- the run ------------------------------------------------------------------------------------------------------


async def model_card(probe: httpx.AsyncClient) -> tuple[str, int]:
    response = await probe.get("/v1/models")
    response.raise_for_status()
    card = response.json()["data"][0]
    return card["id"], int(card.get("max_model_len") or 2048)


async def settle(probe: httpx.AsyncClient, timeout: float) -> dict[str, Any]:
    """Wait for the gauges to reach 0: aborts reach the engine thread asynchronously, so give them a moment."""
    started = time.monotonic()
    metrics: dict[str, float] = {}
    while True:
        metrics, _ = await scrape(probe)
        idle = bool(metrics) and all(metrics.get(METRIC + name) == 0 for name in
                                     ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"))
        if idle or time.monotonic() - started > timeout:
            break
        await asyncio.sleep(0.2)
    return {"settled": idle, "seconds_to_settle": time.monotonic() - started,
            "running": metrics.get(METRIC + "num_requests_running"),
            "waiting": metrics.get(METRIC + "num_requests_waiting"),
            "kv_cache_usage": metrics.get(METRIC + "kv_cache_usage_perc")}


async def run(args: argparse.Namespace, url: str, pid: int | None) -> dict[str, Any]:
    # Sized so that no client ever waits for a pooled connection: the pool must not hide server queueing.
    limits = httpx.Limits(max_connections=args.concurrency + 16, max_keepalive_connections=args.concurrency + 16)
    timeout = httpx.Timeout(args.request_timeout, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client, \
            httpx.AsyncClient(base_url=url, timeout=30.0) as probe:
        model, max_model_len = await model_card(probe)
        soak = Soak(args, client, model, max_model_len)
        warm = await run_nonstream(soak, random.Random(args.seed))  # not counted: the first step may be slow
        if warm.result != "ok":
            raise RuntimeError(f"the warm-up request failed: {warm.detail}")
        _, metrics_before = await scrape(probe)
        samples: list[dict[str, Any]] = []
        stop = asyncio.Event()
        start = time.monotonic()
        soak.deadline = start + args.duration
        sampling = asyncio.create_task(sampler(soak, probe, pid, start, samples, stop))
        tasks = [asyncio.create_task(client_loop(soak, i)) for i in range(args.concurrency)]
        await asyncio.sleep(args.duration)
        _, pending = await asyncio.wait(tasks, timeout=args.drain_timeout)
        drain_s = time.monotonic() - soak.deadline
        # Stuck clients beyond what the engine still holds are requests the server lost, not merely slow ones.
        in_engine, _ = await scrape(probe) if pending else ({}, "")
        for task in pending:  # a request that outlived the drain timeout: counted, then dropped
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        gauges = await settle(probe, args.settle_timeout)
        stop.set()
        await sampling
        after = {"stream": await run_stream(soak, random.Random(-1)),
                 "nonstream": await run_nonstream(soak, random.Random(-2))}
        _, metrics_after = await scrape(probe)
    add_rates(samples)
    return {"model": model, "max_model_len": max_model_len, "soak": soak, "samples": samples,
            "drain": {"seconds": drain_s, "stuck_clients": len(pending),
                      "engine_at_timeout": {k: in_engine.get(METRIC + f"num_requests_{k}") for k in ("running",
                                                                                                    "waiting")},
                      **gauges},
            "after_drain": {k: {"result": o.result, "detail": o.detail} for k, o in after.items()},
            "finish_reasons": _delta(finish_reasons(metrics_after), finish_reasons(metrics_before)),
            "server_counters": _delta(parse_metrics(metrics_after), parse_metrics(metrics_before),
                                      ("generation_tokens_total", "prompt_tokens_total", "num_preemptions_total",
                                       "prefix_cache_queries_total", "prefix_cache_hits_total"))}


def _delta(after: dict[str, float], before: dict[str, float], names: tuple[str, ...] | None = None
           ) -> dict[str, float]:
    keys = [METRIC + n for n in names] if names else list(after)
    return {k.removeprefix(METRIC): after.get(k, 0.0) - before.get(k, 0.0) for k in keys}


# ---- analysis and report ------------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    pos = q / 100 * (len(ordered) - 1)
    low = math.floor(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _distribution(values: list[float]) -> dict[str, float | None]:
    return {"p50": _percentile(values, 50), "p90": _percentile(values, 90), "p99": _percentile(values, 99),
            "max": max(values) if values else None, "mean": statistics.fmean(values) if values else None}


def memory_check(samples: list[dict[str, Any]], duration: float, max_mib: float, max_pct: float) -> dict[str, Any]:
    """Late RSS (last 20% of the load) against early RSS (20-40%, after warm-up), medians; plus the fitted slope
    after warm-up, which a short run's noise hides less well than a long run's."""
    points = [(s["t"], s["rss_mib"]) for s in samples if "rss_mib" in s and s["t"] <= duration]
    early = [rss for t, rss in points if 0.2 * duration <= t < 0.4 * duration]
    late = [rss for t, rss in points if t >= 0.8 * duration]
    if not early or not late:
        return {"measured": False, "flat": None}
    early_mib, late_mib = statistics.median(early), statistics.median(late)
    growth = late_mib - early_mib
    growth_pct = 100 * growth / early_mib
    load = {name: [statistics.median(v) if v else None for v in (
        [s[name] for s in samples if s.get(name) is not None and 0.2 * duration <= s["t"] < 0.4 * duration],
        [s[name] for s in samples if s.get(name) is not None and 0.8 * duration <= s["t"] <= duration])]
        for name in ("running", "waiting", "kv_usage")}
    tail = [(t, rss) for t, rss in points if t >= 0.2 * duration]
    slope = statistics.linear_regression([t for t, _ in tail], [rss for _, rss in tail]).slope if len(tail) > 2 \
        else 0.0
    return {"measured": True, "flat": growth <= max_mib and growth_pct <= max_pct, "early_median_mib": early_mib,
            "late_median_mib": late_mib, "growth_mib": growth, "growth_pct": growth_pct,
            "slope_mib_per_min": 60 * slope, "peak_mib": max(rss for _, rss in points),
            "start_mib": points[0][1], "thresholds": {"mib": max_mib, "pct": max_pct},
            # Medians of the gauges in the same two windows: growth while the batch is still filling up is not a
            # leak, so a verdict is only worth quoting when they match.
            "load_in_windows": load, "steady": _steady(load["running"]) and _steady(load["waiting"])}


def _steady(pair: list[float | None], tolerance: float = 0.25) -> bool:
    early, late = pair
    if early is None or late is None:
        return False
    return abs(late - early) <= tolerance * max(early, late, 1.0)


def failures(result: dict[str, Any], memory: dict[str, Any], log: dict[str, Any] | None,
             shutdown: dict[str, Any] | None) -> list[str]:
    out = []
    stats: dict[str, KindStats] = result["soak"].stats
    for kind, kind_stats in stats.items():
        if kind_stats.errors:
            out.append(f"{kind_stats.errors} {kind} requests failed")
    drain = result["drain"]
    if drain["stuck_clients"]:
        held = drain["engine_at_timeout"]
        out.append(f"{drain['stuck_clients']} requests unanswered {drain['seconds']:.0f} s after the load ended "
                   f"(the engine held {_fmt(held['running'], 0)} running, {_fmt(held['waiting'], 0)} waiting)")
    if not drain["settled"]:
        out.append(f"after the drain: KV usage {drain['kv_cache_usage']}, running {drain['running']}, "
                   f"waiting {drain['waiting']} (all should be 0)")
    out += [f"{kind} request after the drain: {o['detail']}" for kind, o in result["after_drain"].items()
            if o["result"] != "ok"]
    if memory.get("flat") is False:
        out.append(f"RSS not flat: {memory['growth_mib']:+.1f} MiB ({memory['growth_pct']:+.1f}%) from the 20-40% "
                   f"window to the last 20%")
    if log and log["error_lines"]:
        out.append(f"the server logged {log['error_lines']} errors ({log['tracebacks']} tracebacks), see {log['path']}")
    # uvicorn re-raises the signal it handled once it has shut down, so -SIGTERM is a clean exit too.
    if shutdown and (shutdown["exit_code"] not in (0, -signal.SIGTERM) or shutdown["killed"]):
        out.append(f"the server's shutdown: exit code {shutdown['exit_code']}, killed={shutdown['killed']}")
    return out


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def table(stats: dict[str, KindStats]) -> str:
    rows = ["| kind | requests | ok | errors | refused | p50 s | p99 s |", "|---|---:|---:|---:|---:|---:|---:|"]
    total = KindStats()
    for kind in KINDS:
        s = stats.get(kind)
        if s is None:
            continue
        rows.append(f"| {kind} | {s.count} | {s.ok} | {s.errors} | {s.refused} | {_fmt(_percentile(s.latencies, 50))} "
                    f"| {_fmt(_percentile(s.latencies, 99))} |")
        total.count, total.ok, total.errors, total.refused = (total.count + s.count, total.ok + s.ok,
                                                              total.errors + s.errors, total.refused + s.refused)
    rows.append(f"| all | {total.count} | {total.ok} | {total.errors} | {total.refused} | | |")
    return "\n".join(rows)


def plot(samples: list[dict[str, Any]], memory: dict[str, Any], duration: float, title: str, path: Path) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [s["t"] for s in samples]
    fig, (ax_rss, ax_tok, ax_q) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    ax_rss.plot(t, [s.get("rss_mib") for s in samples], color="tab:blue")
    if memory.get("measured"):
        for lo, hi, key in ((0.2, 0.4, "early_median_mib"), (0.8, 1.0, "late_median_mib")):
            ax_rss.axvspan(lo * duration, hi * duration, color="tab:gray", alpha=0.15)
            ax_rss.hlines(memory[key], lo * duration, hi * duration, color="black", linestyle="--")
    ax_rss.set_ylabel("server RSS (MiB)")
    gen = [s.get("gen_tok_s") for s in samples]
    ax_tok.plot(t, gen, color="tab:orange", alpha=0.35, label="generated tok/s (server, per interval)")
    ax_tok.plot(t, _moving_average(gen, 10), color="tab:orange", label="10-sample average")
    ax_tok.plot(t, _moving_average([s.get("client_tok_s") for s in samples], 10), color="tab:green",
                label="tok/s of completed valid requests (client, average)")
    ax_tok.set_ylabel("tokens/s")
    ax_tok.legend(loc="lower left", fontsize=8)
    ax_q.plot(t, [s.get("running") for s in samples], label="running")
    ax_q.plot(t, [s.get("waiting") for s in samples], label="waiting")
    ax_q.set_ylabel("requests")
    ax_kv = ax_q.twinx()
    ax_kv.plot(t, [100 * s["kv_usage"] if s.get("kv_usage") is not None else None for s in samples], color="tab:red",
               alpha=0.6, label="KV usage %")
    ax_kv.set_ylabel("KV usage %")
    ax_q.legend(loc="upper left", fontsize=8)
    ax_kv.legend(loc="upper right", fontsize=8)
    ax_q.set_xlabel("seconds")
    for ax in (ax_rss, ax_tok, ax_q):
        ax.axvline(duration, color="black", linewidth=0.8)  # the load ends, the drain begins
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def _moving_average(values: list[float | None], width: int) -> list[float | None]:
    out: list[float | None] = []
    for i in range(len(values)):
        window = [v for v in values[max(0, i - width + 1):i + 1] if v is not None]
        out.append(statistics.fmean(window) if window else None)
    return out


def print_report(report: dict[str, Any], stats: dict[str, KindStats]) -> None:
    machine, memory, drain = report["machine"], report["memory"], report["drain"]
    args = report["args"]
    print(f"\nsoak: {args['duration']:.0f} s, {args['concurrency']} clients, mix {args['mix']}, model "
          f"{report['model']}; {machine['cpu']}, {machine['cores']} cores, torch threads {machine['torch_threads']}, "
          f"load average at start {machine['load_average_at_start'][0]:.2f}")
    print(table(stats))
    abort, invalid = stats.get("abort"), stats.get("invalid")
    if abort:
        print(f"abort variants: {dict(abort.variants)}")
    if invalid:
        print("invalid cases (status: count): " + "; ".join(
            f"{case} {dict(counts)}" for case, counts in sorted(invalid.statuses.items())))
    for kind, s in stats.items():
        for detail, count in s.error_details.most_common(5):
            print(f"  {kind} error x{count}: {detail}")
    counters = report["server_counters"]
    print(f"server: {counters['generation_tokens_total']:.0f} tokens generated "
          f"({counters['generation_tokens_total'] / args['duration']:.1f} tok/s over the load), "
          f"{counters['num_preemptions_total']:.0f} preemptions, finish reasons {report['finish_reasons']}")
    print(f"drain: {drain['seconds']:.1f} s, stuck {drain['stuck_clients']} (engine then: "
          f"{_fmt(drain['engine_at_timeout']['running'], 0)} running, "
          f"{_fmt(drain['engine_at_timeout']['waiting'], 0)} waiting); then KV usage {drain['kv_cache_usage']}, "
          f"running {drain['running']}, waiting {drain['waiting']} ({'settled' if drain['settled'] else 'NOT settled'}"
          f" after {drain['seconds_to_settle']:.1f} s)")
    print("after the drain: " + ", ".join(f"{kind} {o['result']}{' (' + o['detail'] + ')' if o['detail'] else ''}"
                                          for kind, o in report["after_drain"].items()))
    if memory.get("measured"):
        print(f"RSS: start {memory['start_mib']:.0f} MiB, 20-40% median {memory['early_median_mib']:.1f}, last-20% "
              f"median {memory['late_median_mib']:.1f} ({memory['growth_mib']:+.1f} MiB, {memory['growth_pct']:+.2f}%),"
              f" slope {memory['slope_mib_per_min']:+.2f} MiB/min, peak {memory['peak_mib']:.0f}: "
              f"{'flat' if memory['flat'] else 'NOT FLAT'}")
        if not memory["steady"]:
            running, waiting = memory["load_in_windows"]["running"], memory["load_in_windows"]["waiting"]
            print(f"  note: the load was not steady between the two windows (running {_fmt(running[0], 0)} -> "
                  f"{_fmt(running[1], 0)}, waiting {_fmt(waiting[0], 0)} -> {_fmt(waiting[1], 0)}); run longer "
                  "before reading the RSS verdict")
    else:
        print("RSS: not measured (give --server-pid with --url)")
    fds = [s["fds"] for s in report["samples"] if "fds" in s]
    if fds:
        print(f"server file descriptors: start {fds[0]}, max {max(fds)}, end {fds[-1]}")
    if report.get("server_log"):
        log = report["server_log"]
        print(f"server log: {log['error_lines']} errors, {log['tracebacks']} tracebacks ({log['path']})")
        for problem, count in log["problems"].items():
            print(f"  x{count}: {problem}")
    print(f"client CPU {report['client_cpu_s']:.0f} s over {report['wall_s']:.0f} s wall")
    verdict = report["failures"]
    print("PASS" if not verdict else "FAIL:\n  " + "\n  ".join(verdict))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warning = busy_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    machine = machine_description()
    server: ServerProcess | None = None
    shutdown: dict[str, Any] | None = None
    wall = time.monotonic()
    try:
        if args.url:
            url, pid = args.url.rstrip("/"), args.server_pid
        else:
            server = ServerProcess.start(args)
            print(f"[soak] starting {shlex.join(server.command)} (log: {server.log_path})", file=sys.stderr)
            server.wait_healthy(args.startup_timeout)
            url, pid = server.url, server.proc.pid
        result = asyncio.run(run(args, url, pid))
    finally:
        if server is not None:
            shutdown = server.stop()
    log = scan_server_log(server.log_path) if server else None
    memory = memory_check(result["samples"], args.duration, args.max_rss_growth_mib, args.max_rss_growth_pct)
    stats: dict[str, KindStats] = result["soak"].stats
    cpu = [s["cpu_s"] for s in result["samples"] if "cpu_s" in s]
    report = {
        "args": {k: v for k, v in vars(args).items() if k not in ("mix_weights", "abort_variant_list")},
        "machine": {**machine, "torch_threads": torch_threads(args.server_args) if not args.url else None,
                    "server_command": server.command if server else None,
                    "server_cpu_s": cpu[-1] - cpu[0] if len(cpu) > 1 else None},
        "model": result["model"], "max_model_len": result["max_model_len"],
        "kinds": {kind: s.summary() for kind, s in stats.items()},
        "drain": result["drain"], "after_drain": result["after_drain"], "finish_reasons": result["finish_reasons"],
        "server_counters": result["server_counters"], "memory": memory, "server_log": log, "shutdown": shutdown,
        "client_cpu_s": time.process_time(), "wall_s": time.monotonic() - wall, "samples": result["samples"],
    }
    report["failures"] = failures(result, memory, log, shutdown)
    print_report(report, stats)
    write_json(report, args.out)
    verdict = "PASS" if not report["failures"] else "FAIL"
    title = (f"tokenmill soak: {args.duration:.0f} s, {args.concurrency} clients, {result['model']}, "
             f"{machine['cpu']} ({machine['cores']} cores): {verdict}")
    plotted = plot(result["samples"], memory, args.duration, title, args.png)
    print(f"JSON: {args.out}" + (f"\nPNG: {args.png}" if plotted else "\nPNG: skipped (matplotlib is not installed)"))
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
