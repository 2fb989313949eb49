"""Speculative decoding on and off, on real prompts: every proposer side by side against one plain engine;
llama.cpp's prompt lookup (or draft-model speculation) beside it.

Spec-Bench-like categories from ../shared/data (summarization and RAG from Spec-Bench, HumanEval completions,
MT-bench and ShareGPT questions), greedy or seeded sampling (--temperature). One engine per proposer in
`--speculative` and a plain one, differing only in `speculative`, are loaded once and run alternately on the same
prompt token ids (plain, A, B, then B, A, plain...), one request at a time (batch 1) and in batches submitted
together. Reported per proposer, category and batch size: output tokens/s of plain and speculative, the speedup
with its 95% interval over the paired repeats (and whether that interval is wholly more than 3% slower), the
acceptance rate, the mean accepted length and whether the speculative outputs are the plain ones token for token;
for batches also the speedup of the requests' mean latency (a batch's tok/s is set by its longest request).
`--refill R` keeps B requests in flight over R x B prompts instead, each finished one replaced by the next: the
throughput of a server kept busy at that concurrency. At batch 1, llama.cpp (llama-cpp-python in process) runs the
same prompt ids without and with its `LlamaPromptLookupDecoding` draft model.

    .venv/bin/python benchmarks/speculative.py                  # 8 prompts per category, 128 tokens, batch 1,4,16,64
    .venv/bin/python benchmarks/speculative.py --quick          # smoke test: 2 prompts, 32 tokens, batch 1 and 4
    .venv/bin/python benchmarks/speculative.py --categories summarization,rag --batch-sizes 1 --repeats 3
    .venv/bin/python benchmarks/speculative.py --speculative ngram,self,lookahead --speculative-weight-format q4 \
        --gguf-activations int8 --repeats 4                   # every SmolLM2 proposer side by side
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.machine import busy_warning, load_average, machine_description
from tokenmill.bench.paired import ratio_interval, verdict
from tokenmill.bench.quality import greedy_agreement
from tokenmill.bench.report import write_json
from tokenmill.bench.roofline import gguf_file, model_config
from tokenmill.config import DTYPES, GGUF_ACTIVATIONS, WEIGHT_FORMATS, EngineConfig
from tokenmill.model.gguf_file import resolve_model_path
from tokenmill.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SPEC_FIELDS = ("speculative", "num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max",
               "speculative_adaptive")
PROPOSERS = ("ngram", "draft", "self", "lookahead")
SPEC_COUNTERS = ("num_drafts", "num_draft_tokens", "num_accepted_tokens", "num_held_steps")
QUICK_PRESET = {"num_prompts": 2, "max_tokens": 32, "batch_sizes": [1, 4], "repeats": 1}
# A truncated prompt keeps its first tokens as well as its last: Spec-Bench's summarization prompts start with the
# instruction ("Summarize: ..."), its RAG prompts and most ShareGPT questions end with it.
HEAD_TOKENS = 16
MIN_SHAREGPT_TOKENS = 4  # the usual ShareGPT filter (../shared/benchmarking.md): shorter prompts are greetings
Run = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Category:
    name: str
    file: str
    text: Callable[[dict[str, Any]], str]
    keep: Callable[[dict[str, Any]], bool]
    chat: bool  # rendered with the model's chat template (an instruct model answers; raw text it would continue)


# Spec-Bench feeds every category through the chat template; HumanEval is a plain code completion prompt.
CATEGORIES = (
    Category("summarization", "spec_bench_summarization_rag.jsonl", lambda r: r["turns"][0],
             lambda r: r["category"] == "summarization", chat=True),
    Category("rag", "spec_bench_summarization_rag.jsonl", lambda r: r["turns"][0],
             lambda r: r["category"] == "rag", chat=True),
    Category("humaneval", "humaneval_first120.jsonl", lambda r: r["prompt"], lambda r: True, chat=False),
    Category("mt_bench", "mt_bench_questions.jsonl", lambda r: r["turns"][0], lambda r: True, chat=True),
    Category("sharegpt", "sharegpt_v3_first_turn.jsonl", lambda r: r["human"], lambda r: True, chat=True),
)


# ---- arguments ------------------------------------------------------------------------------------------------


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers >= 1, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--data-dir", type=Path, default=DATA, help="prompt files (default: ../shared/data)")
    p.add_argument("--categories", default=",".join(c.name for c in CATEGORIES),
                   help="comma-separated subset of: " + ", ".join(c.name for c in CATEGORIES))
    p.add_argument("--num-prompts", type=int, default=8, help="prompts per category in the single-stream runs")
    p.add_argument("--batch-sizes", type=int_list, default=[1, 4, 16, 64], metavar="B,B,...",
                   help="1 = one request at a time; B > 1 = the category's first B prompts in one generate call")
    p.add_argument("--refill", type=int, default=1, metavar="R",
                   help="batches B > 1 run R x B prompts with B in flight, each finished request replaced by the "
                        "next (a server kept busy: tok/s is throughput at concurrency B, not a fixed batch's "
                        "makespan); 1: the B prompts alone")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--max-prompt-tokens", type=int, default=1024, help="longer prompts are cut to this many tokens")
    p.add_argument("--ignore-eos", action="store_true",
                   help="generate max-tokens for every prompt (default: stop at the end of the answer)")
    p.add_argument("--repeats", type=int, default=2, help="timed runs of each engine, interleaved plain/spec")
    p.add_argument("--quick", action="store_true", help="smoke test: 2 prompts, 32 tokens, batch 1 and 4, 1 repeat")
    p.add_argument("--dtype", choices=["auto", *sorted(DTYPES)], default="auto")
    p.add_argument("--weight-format", choices=WEIGHT_FORMATS, default="float")
    p.add_argument("--gguf-activations", choices=GGUF_ACTIVATIONS, default="bf16",
                   help="activations of the GGUF block layers, the target's and a gguf draft's (engine default bf16)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--batch-invariant", action="store_true",
                   help="both engines with batch_invariant=True (every row rounds as it would alone)")
    p.add_argument("--max-num-batched-tokens", type=int, default=1024)
    p.add_argument("--speculative", default="ngram", metavar="P,P,...",
                   help="the proposers, one engine each, run side by side against the same plain engine: ngram "
                        "(prompt lookup), draft (a draft model, --speculative-model), self (a subset of the model's "
                        "layers: --speculative-layers, or calibrated), lookahead (Jacobi iteration and an n-gram "
                        "pool)")
    p.add_argument("--lookahead-ngram-size", type=int, default=None, help="--speculative lookahead: N (engine "
                                                                           "default)")
    p.add_argument("--speculative-layers", default=None, type=lambda t: tuple(int(v) for v in t.split(",")),
                   help="--speculative self: the drafting layers (default: the engine's calibration)")
    p.add_argument("--speculative-model", default=None, help="the draft model's GGUF file (--speculative draft)")
    p.add_argument("--speculative-weight-format", choices=WEIGHT_FORMATS, default=None,
                   help="the draft model's weight format, for draft or self (engine default: --weight-format's)")
    p.add_argument("--num-speculative-tokens", type=int, default=5, help="draft tokens per step (K)")
    p.add_argument("--speculative-tree-width", type=int, default=1,
                   help="draft/self: token trees with the draft's N likeliest tokens per depth (1: chains)")
    p.add_argument("--speculative-draft-vocab", type=int, default=None, metavar="N",
                   help="--speculative draft or self: the draft's LM head over the N lowest token ids (and the stop "
                        "tokens) only")
    p.add_argument("--prompt-lookup-min", type=int, default=None, help="shortest n-gram matched (engine default)")
    p.add_argument("--prompt-lookup-max", type=int, default=None, help="longest n-gram matched (engine default)")
    p.add_argument("--no-adaptive", action="store_true", help="speculative_adaptive=False")
    p.add_argument("--no-guard", action="store_true",
                   help="speculative_guard=False (adaptive lengths without the measured check per batch size)")
    p.add_argument("--no-speculative-lookup", action="store_true",
                   help="--speculative draft or self: speculative_lookup=False (drafts do not check a prompt-lookup "
                        "guess first; when they do, --prompt-lookup-min/max set its n-grams)")
    p.add_argument("--no-copy-kv", action="store_true",
                   help="--speculative self: speculative_copy_kv=False (the draft computes its own K/V of the prompt "
                        "and accepted tokens instead of copying the target's)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature (0: greedy); sampled requests carry --seed, so both engines draw the "
                        "same uniforms and the outputs must still match token for token")
    p.add_argument("--top-p", type=float, default=1.0, help="with --temperature: top-p")
    p.add_argument("--seed", type=int, default=0, help="with --temperature: every request's seed")
    p.add_argument("--baseline-options", type=json.loads, default=None, metavar="JSON",
                   help="engine options of the A side instead of speculation off (the tables' 'plain' column), "
                        "e.g. the same drafter without the option under test, for an A/B of two speculative "
                        "settings in one run")
    p.add_argument("--slower-floor", type=float, default=0.97, metavar="R",
                   help="the 'slower' column: a speedup whose whole 95%% interval is below R (0.97: more than 3%% "
                        "slower); needs --repeats 2 or more")
    p.add_argument("--no-peer", action="store_true", help="skip llama.cpp")
    p.add_argument("--llama-speculative", type=Path, default=None,
                   help="llama.cpp's llama-speculative binary: the peer for --speculative draft")
    p.add_argument("--output", default="benchmarks/results/speculative.json")
    args = p.parse_args(argv)
    if args.quick:  # options given explicitly win over the preset
        for key, value in QUICK_PRESET.items():
            if getattr(args, key) == p.get_default(key):
                setattr(args, key, value)
    args.batch_sizes = sorted(set(args.batch_sizes))
    names = [c.strip() for c in args.categories.split(",") if c.strip()]
    unknown = set(names) - {c.name for c in CATEGORIES}
    if unknown or not names:
        p.error(f"unknown categories {sorted(unknown)}; choose from {[c.name for c in CATEGORIES]}")
    args.categories = names
    args.speculative = list(dict.fromkeys(v.strip() for v in args.speculative.split(",") if v.strip()))
    if not args.speculative or set(args.speculative) - set(PROPOSERS):
        p.error(f"--speculative: one or more of {', '.join(PROPOSERS)}")
    if ("draft" in args.speculative) != (args.speculative_model is not None):
        p.error("--speculative draft and --speculative-model go together")
    for name in ("num_prompts", "max_tokens", "max_prompt_tokens", "repeats", "threads", "num_speculative_tokens",
                 "refill"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def require_speculative_support() -> None:
    """Stop before loading anything when this tokenmill has no n-gram speculative decoding to measure."""
    present = {f.name for f in dataclasses.fields(EngineConfig)}
    missing = [name for name in SPEC_FIELDS if name not in present]
    if missing:
        raise SystemExit(f"speculative.py: tokenmill.config.EngineConfig has no {', '.join(missing)} field(s): this "
                         "checkout has no n-gram speculative decoding yet, so there is nothing to measure")


def mode_options(args: argparse.Namespace, proposer: str | None) -> dict[str, Any]:
    """The only engine options in which the engines differ: the plain one's (None) or a proposer's."""
    if proposer is None:
        return {"speculative": None}
    options: dict[str, Any] = {"speculative": proposer, "num_speculative_tokens": args.num_speculative_tokens,
                               "speculative_adaptive": not args.no_adaptive}
    if args.no_guard:
        options["speculative_guard"] = False
    if args.speculative_tree_width > 1:
        options["speculative_tree_width"] = args.speculative_tree_width
    if args.speculative_draft_vocab is not None:
        options["speculative_draft_vocab"] = args.speculative_draft_vocab
    if proposer in ("draft", "self"):
        options |= lookup_bounds(args) | ({"speculative_lookup": False} if args.no_speculative_lookup else {})
    if proposer == "draft":
        options |= {"speculative_model": args.speculative_model,
                    "speculative_weight_format": args.speculative_weight_format}
        return options
    if proposer == "self":
        return options | {"speculative_layers": args.speculative_layers,
                          "speculative_weight_format": args.speculative_weight_format,
                          "speculative_copy_kv": not args.no_copy_kv}
    if proposer == "lookahead":
        size = args.lookahead_ngram_size
        return options | ({"lookahead_ngram_size": size} if size is not None else {})
    return options | lookup_bounds(args)


def lookup_bounds(args: argparse.Namespace) -> dict[str, int]:
    """The n-gram bounds given; unset ones stay the engine's defaults, which the JSON records from its config."""
    return {name: getattr(args, name) for name in ("prompt_lookup_min", "prompt_lookup_max")
            if getattr(args, name) is not None}


def activations(args: argparse.Namespace, proposer: str | None) -> dict[str, Any]:
    """`gguf_activations` for an engine that has block-format weights: the target's, or a draft's in its own format
    (a float target with a q4 draft: only the draft or self engine has block layers)."""
    formats = {args.weight_format, args.speculative_weight_format if proposer in ("draft", "self") else None}
    return {"gguf_activations": args.gguf_activations} if formats & {"gguf", "q4"} else {}


# ---- workload -------------------------------------------------------------------------------------------------


def fit_prompt(tokenizer: Tokenizer, content: str, render: Callable[[str], str], limit: int) -> tuple[list[int], bool]:
    """Token ids of the rendered prompt, at most `limit` long; a longer one loses the middle of its content.

    The content is cut rather than the rendered prompt so that the chat template's frame (the assistant turn the
    model answers in) survives. Re-tokenizing the joined text can differ at the seam, hence the loop."""
    ids = tokenizer.encode(render(content))
    if len(ids) <= limit:
        return ids, False
    body = tokenizer.encode(content)
    keep = len(body) - (len(ids) - limit)
    while keep >= 2:
        head = min(HEAD_TOKENS, keep // 2)
        text = tokenizer.decode(body[:head]) + " ... " + tokenizer.decode(body[len(body) - (keep - head):])
        ids = tokenizer.encode(render(text))
        if len(ids) <= limit:
            return ids, True
        keep -= len(ids) - limit
    raise SystemExit(f"a prompt does not fit in {limit} tokens even without its content: raise --max-prompt-tokens")


def load_category(category: Category, args: argparse.Namespace, tokenizer: Tokenizer, limit: int,
                  count: int) -> tuple[list[list[int]], dict[str, Any]] | None:
    """The category's first `count` usable prompts as token ids (cycled when the file has fewer), or None."""
    path = args.data_dir / category.file
    if not path.exists():
        print(f"{category.name}: {path} not found, skipped")
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    records = [r for r in records if category.keep(r)]

    def render(text: str) -> str:
        if not category.chat:
            return text
        return tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)

    prompts, truncated, source_tokens = [], 0, []
    for record in records:
        content = category.text(record)
        if category.name == "sharegpt" and len(tokenizer.encode(content)) < MIN_SHAREGPT_TOKENS:
            continue
        ids, cut = fit_prompt(tokenizer, content, render, limit)
        prompts.append(ids)
        truncated += cut
        source_tokens.append(len(tokenizer.encode(render(content))))
        if len(prompts) == count:
            break
    if not prompts:
        print(f"{category.name}: no usable prompt in {path}, skipped")
        return None
    distinct = len(prompts)
    if distinct < count:
        print(f"{category.name}: only {distinct} prompts in {path}, cycled to {count}")
    pool = [prompts[i % distinct] for i in range(count)]
    lengths = [len(p) for p in prompts]
    info = {"file": str(path), "chat_template": category.chat, "distinct_prompts": distinct, "pool": count,
            "truncated": truncated, "prompt_tokens": {"min": min(lengths), "mean": statistics.fmean(lengths),
                                                      "max": max(lengths)},
            "prompt_tokens_before_truncation": {"mean": statistics.fmean(source_tokens), "max": max(source_tokens)}}
    return pool, info


def batch_of(pool: list[list[int]], size: int) -> list[list[int]]:
    return [pool[i % len(pool)] for i in range(size)]


def kv_blocks_needed(workload: dict[str, list[list[int]]], args: argparse.Namespace, block_size: int) -> int:
    """Enough KV blocks for the largest batch of every category at full length (its longest prompts in flight
    together, with --refill), so that no run preempts."""
    extra = args.max_tokens + args.num_speculative_tokens + 1  # drafts occupy slots until they are verified
    largest = max(args.batch_sizes)
    need = max(sum(sorted((math.ceil((len(p) + extra) / block_size) for p in batch_of(pool, largest * args.refill)),
                          reverse=True)[:largest]) for pool in workload.values())
    return need + largest + 16  # a partly filled block per sequence and a margin for the scheduler's look-ahead


# ---- tokenmill runs -------------------------------------------------------------------------------------------


# Seconds the engine spends in its speculator (drafting and lengths, then bookkeeping), per engine: the Python cost
# speculation adds to every step whether or not it drafts, measured directly where an end-to-end ratio is noise.
_speculator_clock: dict[int, float] = {}


def clock_speculator(llm: LLM) -> None:
    speculator = getattr(llm.engine, "speculator", None)
    if speculator is None:
        return
    key = id(llm)
    _speculator_clock[key] = 0.0
    for name in ("propose", "observe"):
        method = getattr(speculator, name)

        def timed(*args: Any, _method: Callable[..., Any] = method, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return _method(*args, **kwargs)
            finally:
                _speculator_clock[key] += time.perf_counter() - start

        setattr(speculator, name, timed)


def counters(llm: LLM) -> dict[str, Any]:
    stats = llm.engine.stats()
    spec = getattr(stats, "spec_decode", None)
    if spec is not None:
        spec = {k: int(getattr(spec, k, 0)) for k in SPEC_COUNTERS} | {
            "accepted_per_position": list(getattr(spec, "accepted_per_position", None) or [])}
    return {"steps": stats.steps, "preemptions": stats.num_preemptions, "spec": spec,
            "speculator_s": _speculator_clock.get(id(llm), 0.0)}


def counter_delta(before: dict[str, Any], after: dict[str, Any]) -> dict[str, Any]:
    spec = None
    if before["spec"] is not None and after["spec"] is not None:
        spec = {k: after["spec"][k] - before["spec"][k] for k in SPEC_COUNTERS}
        spec["accepted_per_position"] = [a - b for a, b in zip(after["spec"]["accepted_per_position"],
                                                               before["spec"]["accepted_per_position"], strict=False)]
    return {"forward_steps": after["steps"] - before["steps"],
            "preemptions": after["preemptions"] - before["preemptions"], "spec_decode": spec,
            "speculator_s": after["speculator_s"] - before["speculator_s"]}


def single_stream(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> tuple[Run, list[list[int]]]:
    """One request at a time (SingleStream), driving the engine so that each request's first token is timed."""
    llm.reset_prefix_cache()
    before = counters(llm)
    engine = llm.engine
    outputs, requests = [], []
    start = time.perf_counter()
    for prompt in prompts:
        sent = time.perf_counter()
        request_id = engine.add_request(prompt, params)
        first = None
        tokens: list[int] = []
        while engine.has_unfinished_requests():
            for out in engine.step():
                if out.request_id != request_id:
                    continue
                if first is None and out.token_ids:
                    first = time.perf_counter()
                if out.finished:
                    tokens = list(out.token_ids)
        requests.append({"sent": sent, "first": first, "end": time.perf_counter(), "tokens": len(tokens)})
        outputs.append(tokens)
    wall = time.perf_counter() - start
    return single_stream_metrics(requests, wall) | counter_delta(before, counters(llm)), outputs


def single_stream_metrics(requests: list[dict[str, Any]], wall: float) -> Run:
    """Output tok/s over the whole run, and the decode phase alone: speculation shortens decoding, not prefill."""
    decoding = [r for r in requests if r["first"] is not None and r["tokens"] > 1]
    decode_s = sum(r["end"] - r["first"] for r in decoding)
    ttfts = [r["first"] - r["sent"] for r in requests if r["first"] is not None]
    tokens = sum(r["tokens"] for r in requests)
    return {"wall_s": wall, "requests": len(requests), "output_tokens": tokens, "output_tok_per_s": tokens / wall,
            "decode_tok_per_s": sum(r["tokens"] - 1 for r in decoding) / decode_s if decode_s > 0 else None,
            "ttft_ms_median": 1e3 * statistics.median(ttfts) if ttfts else None}


def batched(llm: LLM, prompts: list[list[int]], params: SamplingParams,
            width: int | None = None) -> tuple[Run, list[list[int]]]:
    """`width` requests in flight (all prompts at t=0 by default: Offline), each finished one replaced by the next
    prompt, driving the engine so that each request's end is timed. With all at t=0 the tok/s of the whole call is
    set by its longest request, the mean latency by all of them (a request that drafts well finishes sooner even when
    the call does not); kept full, tok/s is the throughput at that concurrency."""
    llm.reset_prefix_cache()
    before = counters(llm)
    engine = llm.engine
    delta = dataclasses.replace(params, output_kind="delta")
    waiting = list(reversed(prompts))
    ids: list[str] = []
    sent: dict[str, float] = {}
    tokens: dict[str, list[int]] = {}
    ends: dict[str, float] = {}

    def submit() -> None:
        request_id = engine.add_request(waiting.pop(), delta)
        ids.append(request_id)
        sent[request_id], tokens[request_id] = time.perf_counter(), []

    start = time.perf_counter()
    for _ in range(min(width or len(prompts), len(prompts))):
        submit()
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens[out.request_id] += out.token_ids
            if out.finished:
                ends[out.request_id] = time.perf_counter()
                if waiting:
                    submit()
    wall = time.perf_counter() - start
    outputs = [tokens[request_id] for request_id in ids]
    total = sum(map(len, outputs))
    run = {"wall_s": wall, "requests": len(prompts), "output_tokens": total, "output_tok_per_s": total / wall,
           "latency_mean_s": statistics.fmean(ends[request_id] - sent[request_id] for request_id in ids)}
    return run | counter_delta(before, counters(llm)), outputs


def warm_up(llm: LLM) -> None:
    # Repeating ids give the n-gram drafter matches, so the warm-up also runs the verify path.
    llm.generate([[200, 300, 400, 500] * 4] * 2, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True),
                 use_tqdm=False)


# ---- llama.cpp ------------------------------------------------------------------------------------------------


def counting_lookup(num_pred_tokens: int, max_ngram_size: int) -> Any:
    """llama-cpp-python's prompt-lookup drafter, also counting how many of its drafts the target accepted.

    llama-cpp-python reports no acceptance. Each call receives the sequence as verified so far, so the previous
    draft's accepted length is how far it agrees with the tokens now in its place. A draft still pending when a
    request ends was never verified and is dropped (`forget_pending`)."""
    from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

    class CountingLookup(LlamaPromptLookupDecoding):
        def __init__(self) -> None:
            super().__init__(max_ngram_size=max_ngram_size, num_pred_tokens=num_pred_tokens)
            self.counts = dict.fromkeys(SPEC_COUNTERS, 0)
            self.pending: tuple[int, list[int]] | None = None

        def forget_pending(self) -> None:
            self.pending = None

        def __call__(self, input_ids: Any, /, **kwargs: Any) -> Any:
            if self.pending is not None:
                start, draft = self.pending
                actual = input_ids[start:start + len(draft)].tolist()
                accepted = next((i for i, (a, b) in enumerate(zip(actual, draft, strict=False)) if a != b),
                                min(len(actual), len(draft)))
                self.counts["num_drafts"] += 1
                self.counts["num_draft_tokens"] += len(draft)
                self.counts["num_accepted_tokens"] += accepted
                self.pending = None
            draft = super().__call__(input_ids, **kwargs)
            if len(draft):
                self.pending = (len(input_ids), draft.tolist())
            return draft

    return CountingLookup()


class LlamaCppPeer:
    """Two llama.cpp contexts on the same GGUF: plain, and with the prompt-lookup draft model."""

    def __init__(self, path: Path, args: argparse.Namespace, n_ctx: int, num_pred: int, max_ngram: int) -> None:
        from llama_cpp import Llama

        options = {"model_path": str(path), "n_threads": args.threads, "n_threads_batch": args.threads,
                   "n_ctx": n_ctx, "n_batch": 512, "verbose": False}
        self.plain = Llama(**options)
        self.draft = counting_lookup(num_pred, max_ngram)
        # A draft model needs every evaluated position's logits; asked for at construction, or llama-cpp-python sizes
        # its logits buffer for one batch only and fails once a sequence is longer than n_batch.
        self.lookup = Llama(**options, draft_model=self.draft, logits_all=True)
        self.description = {"n_ctx": n_ctx, "n_batch": 512, "n_threads": args.threads, "num_pred_tokens": num_pred,
                            "max_ngram_size": max_ngram, "weights": "the GGUF's own quantized blocks"}

    def warm_up(self) -> None:
        for llm in (self.plain, self.lookup):
            self._generate(llm, [200, 300, 400, 500] * 4, 16, frozenset())

    def _generate(self, llm: Any, prompt: list[int], max_tokens: int, stop: frozenset[int]) -> tuple[list[int], float]:
        tokens: list[int] = []
        first = 0.0
        for token in llm.generate(prompt, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            tokens.append(int(token))
            if len(tokens) == 1:
                first = time.perf_counter()
            if len(tokens) >= max_tokens or token in stop:  # tokenmill also returns the stop token it ends on
                break
        return tokens, first

    def run(self, lookup: bool, prompts: list[list[int]], max_tokens: int,
            stop: frozenset[int]) -> tuple[Run, list[list[int]]]:
        llm = self.lookup if lookup else self.plain
        before = dict(self.draft.counts)
        run, outputs = self._timed(llm, prompts, max_tokens, stop)
        if lookup:
            run["spec_decode"] = {k: self.draft.counts[k] - before[k] for k in SPEC_COUNTERS}
        return run, outputs

    def _timed(self, llm: Any, prompts: list[list[int]], max_tokens: int,
               stop: frozenset[int]) -> tuple[Run, list[list[int]]]:
        llm.reset()  # no reuse of the previous run's last sequence, as tokenmill's prefix cache is reset
        outputs, requests = [], []
        start = time.perf_counter()
        for prompt in prompts:
            if llm is not self.plain:
                self.draft.forget_pending()
            sent = time.perf_counter()
            tokens, first = self._generate(llm, prompt, max_tokens, stop)
            requests.append({"sent": sent, "first": first if tokens else None, "end": time.perf_counter(),
                             "tokens": len(tokens)})
            outputs.append(tokens)
        return single_stream_metrics(requests, time.perf_counter() - start), outputs


class LlamaSpeculativePeer(LlamaCppPeer):
    """llama.cpp's draft-model speculation: its `llama-speculative` tool (built from the llama-cpp-python sdist's
    vendor/llama.cpp, `--llama-speculative PATH`) on the same target and draft GGUFs, one process per prompt; its
    plain side is llama-cpp-python in process, as for prompt lookup. The tool tokenizes the prompt text itself and
    reports no token ids, so its runs carry the times and counts it prints, and no agreement with the plain run."""

    def __init__(self, path: Path, args: argparse.Namespace, n_ctx: int, tool: Path, tokenizer: Tokenizer) -> None:
        from llama_cpp import Llama

        self.plain = Llama(model_path=str(path), n_threads=args.threads, n_threads_batch=args.threads, n_ctx=n_ctx,
                           n_batch=512, verbose=False)
        self.tool, self.path, self.args, self.n_ctx, self.tokenizer = tool, path, args, n_ctx, tokenizer
        self.description = {"n_ctx": n_ctx, "n_threads": args.threads, "tool": str(tool),
                            "draft_model": args.speculative_model, "spec_draft_n_max": args.num_speculative_tokens,
                            "weights": "the GGUFs' own quantized blocks"}

    def warm_up(self) -> None:
        self._generate(self.plain, [200, 300, 400, 500] * 4, 16, frozenset())

    def run(self, lookup: bool, prompts: list[list[int]], max_tokens: int,
            stop: frozenset[int]) -> tuple[Run, list[list[int]] | None]:
        if not lookup:
            return self._timed(self.plain, prompts, max_tokens, stop)
        import subprocess
        import tempfile

        totals = dict.fromkeys(("prompt_s", "decode_s", "decoded", *SPEC_COUNTERS), 0.0)
        for prompt in prompts:
            with tempfile.NamedTemporaryFile("w", suffix=".txt") as fh:
                fh.write(self.tokenizer.decode(prompt))
                fh.flush()
                command = [str(self.tool), "-m", str(self.path), "-md", self.args.speculative_model, "-f", fh.name,
                           "-n", str(max_tokens), "--temp", "0", "-t", str(self.args.threads), "-td",
                           str(self.args.threads), "-c", str(self.n_ctx), "--spec-draft-n-max",
                           str(self.args.num_speculative_tokens), *(["--ignore-eos"] if not stop else [])]
                env = os.environ | {"LD_LIBRARY_PATH": str(self.tool.parent)}
                out = subprocess.run(command, capture_output=True, text=True, env=env, check=True)
            text = out.stdout + out.stderr
            encoded = _tool_line(text, r"encoded\s+(\d+) tokens in\s+([\d.]+) seconds")
            decoded = _tool_line(text, r"decoded\s+(\d+) tokens in\s+([\d.]+) seconds")
            totals["prompt_s"] += encoded[1]
            totals["decode_s"] += decoded[1]
            totals["decoded"] += decoded[0]
            drafted, accepted = (_tool_line(text, rf"{k}\s+=\s+(\d+)")[0] for k in ("n_drafted", "n_accept"))
            totals["num_draft_tokens"] += drafted
            totals["num_accepted_tokens"] += accepted
            totals["num_drafts"] += _tool_line(text, r"n_predict\s+=\s+(\d+)")[0] - accepted  # steps (approx.)
        wall = totals["prompt_s"] + totals["decode_s"]
        run = {"wall_s": wall, "requests": len(prompts), "output_tokens": int(totals["decoded"]),
               "output_tok_per_s": totals["decoded"] / wall, "decode_tok_per_s": totals["decoded"] / totals["decode_s"],
               "ttft_ms_median": None, "spec_decode": {k: int(totals[k]) for k in SPEC_COUNTERS}}
        return run, None


def _tool_line(text: str, pattern: str) -> tuple[float, ...]:
    import re

    match = re.search(pattern, text)
    if match is None:
        raise RuntimeError(f"llama-speculative printed no line matching {pattern!r}:\n{text[-2000:]}")
    return tuple(float(g) for g in match.groups())


def peer_proposer(args: argparse.Namespace) -> str | None:
    return next((p for p in args.speculative if p in ("ngram", "draft")), None)


def make_peer(args: argparse.Namespace, path: Path, workload: dict[str, list[list[int]]],
              engines: dict[str, LLM]) -> tuple[LlamaCppPeer | None, str | None]:
    """llama.cpp beside prompt lookup (its LlamaPromptLookupDecoding) or beside the draft model (its
    llama-speculative), for the first of those proposers in the run."""
    if args.no_peer:
        return None, "--no-peer"
    if 1 not in args.batch_sizes:
        return None, "batch size 1 not measured (llama-cpp-python runs one sequence)"
    if args.temperature > 0:
        return None, "sampled requests (the llama.cpp runs are greedy)"
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("llama.cpp peer skipped: llama_cpp is not importable (pip install llama-cpp-python)", file=sys.stderr)
        return None, "llama_cpp not importable"
    longest = max(len(p) for pool in workload.values() for p in pool[:args.num_prompts])
    n_ctx = 256 * math.ceil((longest + args.max_tokens + args.num_speculative_tokens + 16) / 256)
    proposer = peer_proposer(args)
    if proposer is None:
        return None, f"llama-cpp-python has no {' or '.join(args.speculative)} speculation to run beside it"
    spec = engines[proposer]
    if proposer == "draft":
        if args.llama_speculative is None:
            return None, "no --llama-speculative tool given (llama.cpp's draft-model speculation)"
        return LlamaSpeculativePeer(path, args, n_ctx, args.llama_speculative,
                                    spec.engine.tokenizer), None
    # Same draft length and longest n-gram as tokenmill's drafter; llama-cpp-python's own defaults otherwise.
    config = spec.engine.config
    num_pred = getattr(config, "num_speculative_tokens", None) or args.num_speculative_tokens
    max_ngram = getattr(config, "prompt_lookup_max", None) or args.prompt_lookup_max or 2
    return LlamaCppPeer(path, args, n_ctx, num_pred, max_ngram), None


# ---- summaries ------------------------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float] | None:
    values = [v for v in values if v is not None]
    if not values:
        return None
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def paired(a_runs: list[Run], b_runs: list[Run], key: str, lower_is_better: bool = False) -> dict[str, float] | None:
    """b / a within each repeat (A/B pairs; a / b for a time), then median and range over the pairs, and with two
    or more pairs their geometric mean and its 95% interval (tokenmill/bench/paired.py)."""
    ratios = [b[key] / a[key] for a, b in zip(a_runs, b_runs, strict=True) if a.get(key) and b.get(key)]
    ratios = [1 / r for r in ratios] if lower_is_better else ratios
    summary = spread(ratios)
    interval = ratio_interval(ratios)
    if summary is not None and interval is not None:
        summary |= dict(zip(("geomean", "ci95_low", "ci95_high"), interval, strict=True))
    return summary


def slower_cell(summary: dict[str, float] | None, floor: float) -> str:
    """The speedup's 95% interval and whether it is below `floor`: "slower" only when the whole interval is."""
    if summary is None or "geomean" not in summary:
        return "–"
    interval = (summary["geomean"], summary["ci95_low"], summary["ci95_high"])
    word = {"below": "**slower**", "not below": "no", "open": "unsettled"}[verdict(interval, floor)]
    return f"{word} ({interval[1]:.2f}–{interval[2]:.2f})"


def acceptance(runs: list[Run]) -> dict[str, Any] | None:
    """vLLM's definitions: acceptance rate = accepted / drafted tokens; mean accepted length = 1 + accepted / drafts
    (tokens per verify step that carried a draft, the target's own token included)."""
    if not runs or any(r.get("spec_decode") is None for r in runs):
        return None
    total: dict[str, Any] = {k: sum(r["spec_decode"][k] for r in runs) for k in SPEC_COUNTERS}
    positions = [r["spec_decode"].get("accepted_per_position") or [] for r in runs]
    if any(positions):
        total["accepted_per_position"] = [sum(column) for column in zip(*positions, strict=True)]
    drafted, drafts = total["num_draft_tokens"], total["num_drafts"]
    return total | {"acceptance_rate": total["num_accepted_tokens"] / drafted if drafted else None,
                    "mean_accepted_length": 1 + total["num_accepted_tokens"] / drafts if drafts else None}


def first_difference(a: list[int], b: list[int]) -> int | None:
    if a == b:
        return None
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


def identity(plain: list[list[list[int]]], spec: list[list[list[int]]], tokenizer: Tokenizer, category: str,
             batch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Speculative outputs against the plain engine's in the same repeat, prompt by prompt."""
    mismatches = []
    pairs = 0
    for repeat, (plain_outs, spec_outs) in enumerate(zip(plain, spec, strict=True)):
        for index, (p, s) in enumerate(zip(plain_outs, spec_outs, strict=True)):
            pairs += 1
            at = first_difference(p, s)
            if at is not None:
                mismatches.append({"category": category, "batch_size": batch, "repeat": repeat, "prompt": index,
                                   "first_difference": at, "plain_tokens": len(p), "spec_tokens": len(s),
                                   "context": tokenizer.decode(p[max(0, at - 8):at]),
                                   "plain_next": tokenizer.decode(p[at:at + 8]),
                                   "spec_next": tokenizer.decode(s[at:at + 8])})
    plain_stable = all(outs == plain[0] for outs in plain)
    return {"identical": pairs - len(mismatches), "compared": pairs,
            "identical_fraction": (pairs - len(mismatches)) / pairs if pairs else None,
            "plain_identical_across_repeats": plain_stable}, mismatches


# ---- reporting ------------------------------------------------------------------------------------------------


def fmt(value: float | None, digits: int = 1, suffix: str = "") -> str:
    return "–" if value is None else f"{value:.{digits}f}{suffix}"


def med(summary: dict[str, Any] | None) -> float | None:
    return None if summary is None else summary["median"]


def ratio_cell(summary: dict[str, float] | None) -> str:
    if summary is None:
        return "–"
    text = f"{summary['median']:.2f}×"
    return text if summary["min"] == summary["max"] else f"{text} ({summary['min']:.2f}–{summary['max']:.2f})"


def print_tables(results: dict[int, dict[str, Any]], peer: bool, refill: int, floor: float) -> None:
    for batch, by_category in results.items():
        mode = "single stream (one request at a time)" if batch == 1 else (
            f"batch of {batch} (one generate call)" if refill == 1 else
            f"{batch} in flight, {refill * batch} requests (each finished one replaced by the next)")
        head = ["category", "plain tok/s", "spec tok/s", "speedup", f"slower than {floor:.2f}× (95% interval)",
                "acceptance", "mean acc. len", "identical", "speculator share", "steps held by the guard"]
        head += ["decode speedup" if batch == 1 else "mean latency speedup"]
        if batch == 1 and peer:
            head += ["llama.cpp plain tok/s", "llama.cpp lookup tok/s", "llama.cpp speedup",
                     "llama.cpp decode speedup", "llama.cpp acc. len", "llama.cpp plain = lookup"]
        print(f"\n### {mode}\n")
        print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
        for category, r in by_category.items():
            acc, ident = r["acceptance"] or {}, r["identity"]
            rate = acc.get("acceptance_rate")
            cells = [category, fmt(med(r["summary"]["plain"]["output_tok_per_s"])),
                     fmt(med(r["summary"]["speculative"]["output_tok_per_s"])), ratio_cell(r["speedup"]),
                     slower_cell(r["speedup"], floor),
                     "no drafts" if acc.get("num_drafts") == 0 else fmt(None if rate is None else 100 * rate, 0, "%"),
                     fmt(acc.get("mean_accepted_length"), 2),
                     f"{ident['identical']}/{ident['compared']}", fmt(r["speculator_share"], 2, "%"),
                     str(acc.get("num_held_steps", "–"))]
            cells.append(ratio_cell(r["decode_speedup" if batch == 1 else "latency_speedup"]))
            if batch == 1 and peer:
                llama = r.get("llama_cpp") or {}
                summary = llama.get("summary") or {}
                cells += [fmt(med((summary.get("plain") or {}).get("output_tok_per_s"))),
                          fmt(med((summary.get("lookup") or {}).get("output_tok_per_s"))),
                          ratio_cell(llama.get("speedup")), ratio_cell(llama.get("decode_speedup")),
                          fmt((llama.get("acceptance") or {}).get("mean_accepted_length"), 2),
                          "–" if not llama else "{identical}/{compared}".format(**llama["agreement"])]
            print("| " + " | ".join(cells) + " |")


def summarize_runs(runs: list[Run]) -> dict[str, Any]:
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
    return {k: spread([r.get(k) for r in runs]) for k in keys}


# ---- main -----------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    require_speculative_support()
    load = load_average()
    warning = busy_warning()
    if warning:
        print(f"warning: {warning}")
    torch.set_num_threads(args.threads)
    path = resolve_model_path(args.model)
    tokenizer = Tokenizer.from_gguf_metadata(gguf_file(str(path)).metadata)
    context = model_config(path).max_position
    limit = min(args.max_prompt_tokens, context - args.max_tokens - args.num_speculative_tokens - 1)
    pool_size = max(args.num_prompts, max(args.batch_sizes) * args.refill)
    workload: dict[str, list[list[int]]] = {}
    workload_info: dict[str, Any] = {}
    for category in CATEGORIES:
        if category.name not in args.categories:
            continue
        loaded = load_category(category, args, tokenizer, limit, pool_size)
        if loaded is not None:
            workload[category.name], workload_info[category.name] = loaded
    if not workload:
        raise SystemExit(f"no prompt file found under {args.data_dir}")
    for name, info in workload_info.items():
        tokens = info["prompt_tokens"]
        print(f"{name}: {info['distinct_prompts']} prompts, {tokens['min']}–{tokens['max']} tokens "
              f"(mean {tokens['mean']:.0f}), {info['truncated']} cut to {limit}")

    block_size = 16
    common = {"dtype": args.dtype, "weight_format": args.weight_format,
              "num_threads": args.threads, "batch_invariant": args.batch_invariant,
              "block_size": block_size, "num_kv_blocks": kv_blocks_needed(workload, args, block_size),
              "max_num_seqs": max(args.batch_sizes), "max_num_batched_tokens": args.max_num_batched_tokens}
    baseline = args.baseline_options or {}
    engines = {"plain": LLM(model=str(path), **common, **activations(args, None),
                            **(mode_options(args, None) | baseline))}
    for proposer in args.speculative:
        engines[proposer] = LLM(model=str(path), **common, **activations(args, proposer),
                                **mode_options(args, proposer))
    for llm in engines.values():
        warm_up(llm)
    for proposer in args.speculative:
        clock_speculator(engines[proposer])
    peer, peer_skipped = make_peer(args, path, workload, engines)
    if peer is not None:
        peer.warm_up()
    stop = frozenset() if args.ignore_eos else frozenset(tokenizer.stop_token_ids)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            ignore_eos=args.ignore_eos, seed=args.seed if args.temperature > 0 else None)

    results: dict[str, dict[int, dict[str, Any]]] = {p: {b: {} for b in args.batch_sizes} for p in args.speculative}
    mismatches: list[dict[str, Any]] = []
    single_outputs: dict[str, list[list[int]]] = {}
    beside_peer = peer_proposer(args) if peer is not None else None
    for category, pool in workload.items():
        for batch in args.batch_sizes:
            prompts = pool[:args.num_prompts] if batch == 1 else batch_of(pool, batch * args.refill)
            runs, outputs, llama = measure_arms(args, engines, peer, category, batch, prompts, params, stop)
            extra: dict[str, Any] = {}
            if batch == 1:
                single_outputs[category] = outputs["plain"][0]
            elif category in single_outputs:
                # Whether batching alone changes greedy tokens: a spec/plain mismatch may be numerics, not a bug.
                shared = min(batch, len(single_outputs[category]))
                extra["plain_vs_single_stream"] = greedy_agreement(outputs["plain"][0][:shared],
                                                                   single_outputs[category][:shared])
            for proposer in args.speculative:
                entry, wrong = compare(runs["plain"], runs[proposer], outputs["plain"], outputs[proposer],
                                       tokenizer, category, batch)
                mismatches += [m | {"proposer": proposer} for m in wrong]
                if llama is not None and proposer == beside_peer:
                    entry["llama_cpp"] = llama
                results[proposer][batch][category] = entry | extra

    machine = machine_description() | {"threads": args.threads, "torch_threads": torch.get_num_threads(),
                                        "dtype": str(engines["plain"].engine.dtype).removeprefix("torch."),
                                        "load_average_at_start": load}
    for proposer, by_batch in results.items():
        print(f"\n## {proposer}")
        print_tables(by_batch, proposer == beside_peer, args.refill, args.slower_floor)
    print_notes(args, machine, results, mismatches, engines, peer, peer_skipped, limit)
    report = {"benchmark": "speculative", "args": vars(args), "machine": machine,
              "engines": {arm: dataclasses.asdict(llm.engine.config) for arm, llm in engines.items()},
              "llama_cpp": peer.description if peer is not None else {"skipped": peer_skipped},
              "step_time_models": {p: step_time_models(engines[p]) for p in args.speculative},
              "prompt_token_limit": limit, "workload": workload_info,
              "results": results, "mismatches": mismatches, "load_average_at_end": load_average()}
    write_json(report, Path(args.output))
    print(f"wrote {args.output}")
    if mismatches:
        sys.exit(1)


def measure_arms(args: argparse.Namespace, engines: dict[str, LLM], peer: LlamaCppPeer | None, category: str,
                 batch: int, prompts: list[list[int]], params: SamplingParams, stop: frozenset[int]
                 ) -> tuple[dict[str, list[Run]], dict[str, list[list[list[int]]]], dict[str, Any] | None]:
    """Every engine's runs of `prompts`, interleaved repeat by repeat; at batch 1 also llama.cpp's (its summary)."""
    measure = single_stream if batch == 1 else functools.partial(batched, width=batch)
    runs: dict[str, list[Run]] = {arm: [] for arm in engines}
    outputs: dict[str, list[list[list[int]]]] = {arm: [] for arm in engines}
    llama_runs: dict[str, list[Run]] = {"plain": [], "lookup": []}
    llama_outputs: dict[str, list[list[list[int]]]] = {"plain": [], "lookup": []}
    for repeat in range(args.repeats):
        # ABBA (ABC CBA...): the arm that runs first in a repeat is not always the same one (a drift over a repeat,
        # or whatever a run leaves in caches, would otherwise count against one arm every time).
        order = list(engines.items()) if repeat % 2 == 0 else list(reversed(engines.items()))
        for arm, llm in order:
            run, outs = measure(llm, prompts, params)
            runs[arm].append(run)
            outputs[arm].append(outs)
            print(f"{category} batch {batch} repeat {repeat + 1}/{args.repeats} {arm}: "
                  f"{run['output_tokens']} tokens in {run['wall_s']:.2f} s, "
                  f"{run['output_tok_per_s']:.1f} tok/s", flush=True)
        if batch == 1 and peer is not None:
            for mode in ("plain", "lookup"):
                run, outs = peer.run(mode == "lookup", prompts, args.max_tokens, stop)
                llama_runs[mode].append(run)
                llama_outputs[mode].append(outs)
                print(f"{category} batch 1 repeat {repeat + 1}/{args.repeats} llama.cpp {mode}: "
                      f"{run['output_tokens']} tokens in {run['wall_s']:.2f} s, "
                      f"{run['output_tok_per_s']:.1f} tok/s", flush=True)
    if not llama_runs["plain"]:
        return runs, outputs, None
    agree = [first_difference(a, b) is None for p_outs, l_outs in
             zip(llama_outputs["plain"], llama_outputs["lookup"], strict=True)
             if l_outs is not None for a, b in zip(p_outs, l_outs, strict=True)]
    llama = {"runs": llama_runs, "summary": {m: summarize_runs(r) for m, r in llama_runs.items()},
             "speedup": paired(llama_runs["plain"], llama_runs["lookup"], "output_tok_per_s"),
             "decode_speedup": paired(llama_runs["plain"], llama_runs["lookup"], "decode_tok_per_s"),
             "acceptance": acceptance(llama_runs["lookup"]),
             "agreement": {"identical": sum(agree), "compared": len(agree)}}
    return runs, outputs, llama


def compare(plain: list[Run], spec: list[Run], plain_outputs: list[list[list[int]]],
            spec_outputs: list[list[list[int]]], tokenizer: Tokenizer, category: str,
            batch: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One proposer's engine against the plain one on the same prompts: speedups, acceptance, identity."""
    same, wrong = identity(plain_outputs, spec_outputs, tokenizer, category, batch)
    entry: dict[str, Any] = {
        "num_requests": plain[0]["requests"], "runs": {"plain": plain, "speculative": spec},
        "summary": {"plain": summarize_runs(plain), "speculative": summarize_runs(spec)},
        "speedup": paired(plain, spec, "output_tok_per_s"),
        "acceptance": acceptance(spec), "identity": same,
        # Wall time inside the speculator, over the speculative runs' wall time, in percent.
        "speculator_share": 100 * sum(r["speculator_s"] for r in spec) / sum(r["wall_s"] for r in spec),
        "preemptions": sum(r["preemptions"] for r in (*plain, *spec)),
        "output_tokens_per_forward_step": {
            mode: sum(r["output_tokens"] for r in rs) / max(1, sum(r["forward_steps"] for r in rs))
            for mode, rs in (("plain", plain), ("speculative", spec))},
    }
    if batch > 1:
        entry["latency_speedup"] = paired(plain, spec, "latency_mean_s", lower_is_better=True)
    else:
        entry["decode_speedup"] = paired(plain, spec, "decode_tok_per_s")
    return entry, wrong


def step_time_models(llm: LLM) -> dict[str, Any]:
    """The start-up timings adaptive lengths use: the target's step by rows, a draft model's step by sequences."""
    speculator = getattr(llm.engine, "speculator", None)
    out = {}
    for name, model in (("target_by_rows", getattr(speculator, "cost", None)),
                        ("draft_by_seqs", getattr(getattr(speculator, "proposer", None), "cost", None))):
        if model is not None:
            out[name] = dict(zip(model.rows, model.seconds, strict=True))
    return out


def print_notes(args: argparse.Namespace, machine: dict[str, Any], results: dict[str, dict[int, dict[str, Any]]],
                mismatches: list[dict[str, Any]], engines: dict[str, LLM], peer: LlamaCppPeer | None,
                peer_skipped: str | None, limit: int) -> None:
    spec = {p: {name: getattr(engines[p].engine.config, name, None) for name in SPEC_FIELDS}
            for p in args.speculative}
    sampling = ("greedy" if args.temperature == 0 else
                f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}")
    print(f"\n{sampling}, {args.max_tokens} tokens max ({'EOS ignored' if args.ignore_eos else 'stopping at EOS'}), "
          f"prompts cut to {limit} tokens, median of {args.repeats} interleaved repeats (speedups paired within a "
          f"repeat, range in parentheses); speculative engines: {spec}")
    print("tok/s = output tokens / wall time (batch 1: sequential requests, prefill included; decode speedup: "
          "decode phase only, after each first token; mean latency speedup: plain / speculative mean time from each "
          "request's submission to its end); acceptance = accepted / drafted tokens; mean acc. len = "
          "1 + accepted / verify steps with a draft; identical = speculative outputs equal to plain ones token for "
          "token (prompt × repeat)")
    if args.baseline_options:
        print(f"baseline: the 'plain' columns are an engine with {args.baseline_options} instead of speculation off")
    if isinstance(peer, LlamaSpeculativePeer):
        print(f"llama.cpp: plain = llama-cpp-python {machine['versions'].get('llama_cpp_python')} in process; "
              f"speculative = its vendored llama-speculative with the same draft GGUF and --spec-draft-n-max "
              f"{args.num_speculative_tokens}, times as the tool reports them (prompt + decode, loading excluded); "
              "its drafts per step are counted approximately (n_predict - n_accept)")
    elif peer is not None:
        print(f"llama.cpp: llama-cpp-python {machine['versions'].get('llama_cpp_python')}, "
              f"LlamaPromptLookupDecoding(num_pred_tokens={peer.description['num_pred_tokens']}, "
              f"max_ngram_size={peer.description['max_ngram_size']}) on the GGUF's quantized weights; tokenmill runs "
              f"{args.weight_format} weights, so compare each one's speedup, not tok/s across engines")
    else:
        print(f"llama.cpp: skipped ({peer_skipped})")
    first = results[args.speculative[0]]  # the plain engine's notes are the same under every proposer
    for proposer, by_batch in results.items():
        for batch, by_category in by_batch.items():
            for category, entry in by_category.items():
                if entry["preemptions"]:
                    print(f"warning: {proposer}, {category} batch {batch}: {entry['preemptions']} preemptions")
                if by_batch is not first:
                    continue
                control = entry.get("plain_vs_single_stream")
                if control and control["identical_sequences"] < 1:
                    print(f"note: {category} batch {batch}: the plain engine's outputs differ from its own "
                          f"single-stream ones for {100 * (1 - control['identical_sequences']):.0f}% of the shared "
                          "prompts (batching changes the arithmetic)")
                if not entry["identity"]["plain_identical_across_repeats"]:
                    print(f"note: {category} batch {batch}: the plain engine's outputs differ between repeats")
    if mismatches:
        print(f"\nGREEDY MISMATCHES: {len(mismatches)} speculative outputs differ from the plain ones:")
        for m in mismatches:
            print(f"  {m['proposer']}, {m['category']} batch {m['batch_size']} prompt {m['prompt']} repeat "
                  f"{m['repeat']}: first difference at token {m['first_difference']} (plain {m['plain_tokens']} "
                  f"tokens, spec {m['spec_tokens']}) after {m['context']!r}: plain {m['plain_next']!r}, spec "
                  f"{m['spec_next']!r}")
    print(f"\nmachine: {machine['cpu']} ({', '.join(machine['cpu_flags']) or 'no AVX2/AVX-512 flags'}), "
          f"{machine['cores']} cores, {args.threads} threads, {machine['dtype']}, load average at start "
          f"{(machine['load_average_at_start'] or ['?'])[0]}, tokenmill {machine['tokenmill_git']}")
    print(f"command: {machine['command']}")


if __name__ == "__main__":
    main()
