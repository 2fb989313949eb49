"""Prefix caching on/off: TTFT and throughput on a shared-prefix and a multi-turn workload, side by side.

Shared prefix: a ~1,000-token system prompt (a real article from ../shared/data when present) and short user
questions. Multi-turn: MT-bench conversations, whose second turn re-sends the first turn and its answer.
Both engines (cache on, cache off) are loaded once and run alternately (on, off, on, off...).

    .venv/bin/python benchmarks/prefix_caching.py [--requests 16] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from tokenmill import LLM, SamplingParams
from tokenmill.bench.machine import machine_description
from tokenmill.bench.report import write_json

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
FALLBACK_QUESTIONS = ["What is this about?", "Who is mentioned?", "Summarize it in one line.", "What happens next?",
                      "Is the tone positive?", "Give one key fact.", "What is the main risk?", "Where is it set?"]


def system_prompt(llm: LLM, target_tokens: int) -> str:
    path = DATA / "spec_bench_summarization_rag.jsonl"
    if path.exists():
        # Articles in file order until the prompt is long enough (one article is ~800 tokens).
        article = "\n\n".join(json.loads(line)["turns"][0] for line in path.read_text().splitlines()[:3])
        print(f"system prompt: Spec-Bench articles from {path}, cut to {target_tokens} tokens")
    else:
        print(f"{path} not found: using a synthetic system prompt")
        article = "The store opens at 8am, sells tools, paint and lumber, and delivers for free. " * 80
    ids = llm.tokenizer.encode("You answer questions about this document.\n\n" + article)[:target_tokens]
    return llm.tokenizer.decode(ids)


def questions(n: int) -> list[str]:
    path = DATA / "mt_bench_questions.jsonl"
    pool = [json.loads(line)["turns"][0] for line in path.read_text().splitlines()] if path.exists() else []
    pool = [q for q in pool if len(q) < 200] or FALLBACK_QUESTIONS
    return [pool[i % len(pool)] for i in range(n)]


def ttft_sequential(llm: LLM, prompts: list[str], params: SamplingParams) -> list[float]:
    """One request at a time (SingleStream): time from add_request to its first token."""
    ttfts = []
    for prompt in prompts:
        start = time.perf_counter()
        rid = llm.engine.add_request(prompt, params)
        first = None
        while llm.engine.has_unfinished_requests():
            for out in llm.engine.step():
                if out.request_id == rid and first is None and out.token_ids:
                    first = time.perf_counter() - start
        ttfts.append(first if first is not None else float("nan"))
    return ttfts


def offline(llm: LLM, prompts: list[str], params: SamplingParams) -> dict[str, float]:
    start = time.perf_counter()
    results = llm.generate(prompts, params, use_tqdm=False)
    wall = time.perf_counter() - start
    out_tokens = sum(len(r.token_ids) for r in results)
    return {"wall_s": wall, "output_tok_s": out_tokens / wall, "requests_s": len(prompts) / wall}


def multi_turn_prompts(llm: LLM, n: int, params: SamplingParams) -> tuple[list[str], list[str]]:
    """Second-turn prompts of MT-bench conversations: turn 1, the model's answer, turn 2."""
    path = DATA / "mt_bench_questions.jsonl"
    convs = [json.loads(line)["turns"] for line in path.read_text().splitlines()][:n] if path.exists() else [
        [q, "Say more."] for q in FALLBACK_QUESTIONS[:n]]
    first = [llm.tokenizer.apply_chat_template([{"role": "user", "content": c[0]}]) for c in convs]
    answers = llm.generate(first, params, use_tqdm=False)
    second = [llm.tokenizer.apply_chat_template([{"role": "user", "content": c[0]},
                                                 {"role": "assistant", "content": a.text},
                                                 {"role": "user", "content": c[1]}])
              for c, a in zip(convs, answers, strict=True)]
    return second, first


def summarize(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"mean": statistics.fmean(values), "median": statistics.median(values),
            "p90": ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], "min": ordered[0], "max": ordered[-1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--prefix-tokens", type=int, default=1000)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--output", default="benchmarks/results/prefix_caching.json")
    args = parser.parse_args()
    engines = {mode: LLM(dtype=args.dtype, enable_prefix_caching=(mode == "on"), max_num_batched_tokens=1024)
               for mode in ("on", "off")}
    params = SamplingParams(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
    system = system_prompt(engines["on"], args.prefix_tokens)
    tok = engines["on"].tokenizer
    shared = [tok.apply_chat_template([{"role": "system", "content": system}, {"role": "user", "content": q}])
              for q in questions(args.requests)]
    second_turns, first_turns = multi_turn_prompts(engines["off"], args.requests, params)
    results: dict[str, dict[str, list]] = {m: {"shared_ttft": [], "shared_offline": [], "multi_turn_ttft": []}
                                          for m in engines}
    outputs: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for mode, llm in engines.items():
            llm.reset_prefix_cache()  # every repeat starts cold
            results[mode]["shared_ttft"] += ttft_sequential(llm, shared, params)
            results[mode]["shared_offline"].append(offline(llm, shared, params))
            # multi-turn: the first turn was served earlier (its KV cached), then the follow-up arrives
            ttft_sequential(llm, first_turns, params)
            results[mode]["multi_turn_ttft"] += ttft_sequential(llm, second_turns, params)
    for mode, llm in engines.items():  # greedy outputs for the on/off comparison, once (they do not vary by repeat)
        outputs[mode] = [r.token_ids for r in llm.generate(shared[:4], params, use_tqdm=False)]
    identical_fp32 = exactness_check(shared[:4] + second_turns[:4], params)
    report(args, engines, results, outputs, len(tok.encode(shared[0])), len(tok.encode(second_turns[0])),
           identical_fp32)


def exactness_check(prompts: list[str], params: SamplingParams) -> bool:
    """Greedy tokens with the cache on and off in fp32, where chunking cannot change the numerics.

    In bf16 a different chunk split (a hit moves where the computed part starts) rounds differently, so bf16 outputs
    may diverge after many tokens with or without the cache; exactness is a property of the fp32 path.
    """
    runs = {}
    for mode in ("on", "off"):
        llm = LLM(dtype="float32", enable_prefix_caching=(mode == "on"), max_num_batched_tokens=1024)
        llm.generate(prompts[:1], params, use_tqdm=False)  # warm the cache with the shared prefix
        runs[mode] = [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    return runs["on"] == runs["off"]


def report(args, engines, results, outputs, shared_len: int, turn_len: int, identical_fp32: bool) -> None:
    rows = []
    for mode in engines:
        r = results[mode]
        rows.append({
            "prefix_caching": mode,
            "shared_ttft_ms": {k: v * 1e3 for k, v in summarize(r["shared_ttft"]).items()},
            "shared_offline_output_tok_s": statistics.median(x["output_tok_s"] for x in r["shared_offline"]),
            "shared_offline_requests_s": statistics.median(x["requests_s"] for x in r["shared_offline"]),
            "multi_turn_ttft_ms": {k: v * 1e3 for k, v in summarize(r["multi_turn_ttft"]).items()},
            "prefix_cache": engines[mode].engine.stats().prefix_cache.__dict__,
        })
    on, off = rows
    print(f"\nshared prefix: {shared_len} prompt tokens; multi-turn second turn: ~{turn_len} tokens; "
          f"{args.requests} requests × {args.repeats} repeats; dtype {args.dtype}, {torch.get_num_threads()} threads")
    print("| metric | cache on | cache off | speedup from the cache |\n|---|---|---|---|")
    for label, key in (("shared-prefix TTFT median (ms)", "shared_ttft_ms"), ("multi-turn TTFT median (ms)",
                                                                            "multi_turn_ttft_ms")):
        a, b = on[key]["median"], off[key]["median"]
        print(f"| {label} | {a:.1f} | {b:.1f} | {b / a:.1f}× |")
    a, b = on["shared_offline_output_tok_s"], off["shared_offline_output_tok_s"]
    print(f"| shared-prefix offline output tok/s | {a:.1f} | {b:.1f} | {a / b:.1f}× |")
    identical = outputs["on"] == outputs["off"]
    print(f"greedy outputs identical on/off: fp32 {identical_fp32}, {args.dtype} {identical}; "
          f"hit rate (on): {on['prefix_cache']['hits']}/{on['prefix_cache']['queries']} tokens")
    machine = machine_description() | {"threads": torch.get_num_threads()}
    write_json({"args": vars(args), "machine": machine, "shared_prompt_tokens": shared_len,
                "outputs_identical": {"float32": identical_fp32, args.dtype: identical}, "results": rows},
               Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
