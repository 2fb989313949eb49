"""Structured output on the default model: what a grammar costs in decode speed, how long schemas take to compile,
and how often the output is valid with and without the grammar; llama.cpp's JSON-schema grammars side by side.

- Decode speed: requests with a JSON schema (the 12 of benchmarks/data/json_schemas.json, cycled, sampled) against
  the same requests without one, each made to generate exactly as many tokens as its constrained twin
  (`ignore_eos`, `max_tokens`); batch 1 (one request at a time) and batch 64 (all at once); arms alternate
  (A, B, A, B) and each cell is the median over the repeats. Tokens/s counts generated tokens over wall time,
  prefill of the short prompts included in both arms.
- Compile time per schema on a fresh compiler (llguidance).
- Validity: --samples generations per schema (temperature 1) with the grammar, --free-samples without it (most
  run to max_tokens), the schema given in the prompt in both arms; valid
  means the whole output parses as JSON and validates (`jsonschema`). Unconstrained outputs may wrap the JSON in a
  ``` fence, which is stripped first.
- llama.cpp (llama-cpp-python, same GGUF, same prompt token ids, --threads): its grammar from the same schemas
  (`LlamaGrammar.from_json_schema`): validity over --peer-samples per schema, and tokens/s with and without the
  grammar for the same token counts (EOS banned in the free arm).

    .venv/bin/python benchmarks/structured_output.py
    .venv/bin/python benchmarks/structured_output.py --samples 2 --free-samples 1 --peer-samples 1 --repeats 1
    .venv/bin/python benchmarks/structured_output.py --parts speed --repeats 3
    .venv/bin/python benchmarks/structured_output.py --parts spec --max-tokens 192 --repeats 3

- Speculation under a grammar (`--parts spec`): greedy requests with a JSON schema, one at a time, plain decoding
  against the self-speculative drafter (`speculative="self"`; a draft model with `--spec-model`) as a chain and as
  token trees of each `--spec-widths` (the grammar cuts each tree to the drafts it allows: docs/architecture.md,
  "Structured output"), `--spec-tokens` drafts per step (`--spec-adaptive`: the engine's adaptive lengths); arms
  alternate per repeat; tokens/s (median), mean accepted length per verify step, and whether each arm's outputs
  equal plain decoding's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import jsonschema

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill import LLM, SamplingParams  # noqa: E402
from tokenmill.bench.machine import busy_warning, machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.structured.grammar import GrammarCompiler  # noqa: E402
from tokenmill.structured.params import StructuredOutputs  # noqa: E402

SCHEMAS: dict[str, Any] = json.loads((Path(__file__).resolve().parent / "data/json_schemas.json").read_text())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--samples", type=int, default=17, help="validity: generations per schema with the grammar")
    p.add_argument("--free-samples", type=int, default=3, help="validity: generations per schema without it")
    p.add_argument("--peer-samples", type=int, default=3, help="llama.cpp validity: generations per schema")
    p.add_argument("--speed-requests", type=int, default=12, help="batch-1 speed: requests per arm")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=384)
    p.add_argument("--parts", default="compile,speed,validity,peer", help="which measurements to run (also: spec)")
    p.add_argument("--spec-widths", default="1,3", help="spec: speculative_tree_width of each speculative arm")
    p.add_argument("--spec-tokens", type=int, default=4, help="spec: num_speculative_tokens")
    p.add_argument("--spec-adaptive", action="store_true", help="spec: adaptive draft lengths (default: fixed)")
    p.add_argument("--spec-model", default=None,
                   help="spec: a draft model's GGUF file (speculative='draft'; default: the self-speculative drafter)")
    p.add_argument("--model", default=None, help="a GGUF file (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--engine-args", type=json.loads, default={},
                   help='more EngineConfig fields for every engine, as JSON, e.g. \'{"weight_format": "gguf"}\'')
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/structured_output.json"))
    return p.parse_args(argv)


def prompt_ids(llm: LLM, name: str, with_schema: bool = True) -> list[int]:
    ask = f"Write one example {name.replace('_', ' ')} as JSON"
    if with_schema:
        ask += f" matching this JSON schema, and nothing else:\n{json.dumps(SCHEMAS[name])}"
    return llm.engine.tokenizer.encode(llm.engine.tokenizer.apply_chat_template([{"role": "user", "content": ask}]))


def valid(text: str, schema: dict[str, Any]) -> bool:
    text = text.strip()
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rsplit("```", 1)[0]
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def generate(llm: LLM, prompts: list[list[int]], params: list[SamplingParams], batch: int) -> tuple[list[Any], float]:
    started, outs = time.perf_counter(), []
    for i in range(0, len(prompts), batch):
        outs += llm.generate(prompts[i:i + batch], params[i:i + batch], use_tqdm=False)
    return outs, time.perf_counter() - started


def speed(llm: LLM, names: list[str], batch: int, repeats: int, max_tokens: int) -> dict[str, Any]:
    prompts = [prompt_ids(llm, n, with_schema=False) for n in names]  # short: decode dominates
    constrained = [SamplingParams(temperature=1.0, seed=i, max_tokens=max_tokens,
                                  structured_outputs=StructuredOutputs(json=SCHEMAS[n])) for i, n in enumerate(names)]
    generate(llm, prompts, constrained, batch)  # warm-up: the prompts are in the prefix cache for both arms
    rates: dict[str, list[float]] = {"schema": [], "free": []}
    totals = []
    for _ in range(repeats):
        outs, seconds = generate(llm, prompts, constrained, batch)
        # Each run's own counts: seeded draws need not repeat across runs, since a prompt served from the prefix
        # cache is computed by other kernels than a whole prefill, with other float rounding (docs/architecture.md).
        counts = [len(o.token_ids) for o in outs]
        free = [SamplingParams(temperature=1.0, seed=i, max_tokens=c, ignore_eos=True) for i, c in enumerate(counts)]
        got, free_seconds = generate(llm, prompts, free, batch)
        assert [len(o.token_ids) for o in got] == counts, "the arms must generate the same tokens"
        rates["schema"].append(sum(counts) / seconds)
        rates["free"].append(sum(counts) / free_seconds)
        totals.append(sum(counts))
    schema_tps, free_tps = statistics.median(rates["schema"]), statistics.median(rates["free"])
    return {"batch": batch, "requests": len(names), "tokens": statistics.median(totals), "schema_tok_s": schema_tps,
            "free_tok_s": free_tps, "overhead_pct": (free_tps / schema_tps - 1) * 100}


def validity(llm: LLM, samples: int, free_samples: int, max_tokens: int) -> dict[str, Any]:
    result = {}
    for arm, count in (("schema", samples), ("free", free_samples)):
        cases = [(n, s) for n in SCHEMAS for s in range(count)]
        prompts = [prompt_ids(llm, n) for n, _ in cases]
        params = [SamplingParams(temperature=1.0, seed=s, max_tokens=max_tokens,
                                 structured_outputs=StructuredOutputs(json=SCHEMAS[n]) if arm == "schema" else None)
                  for n, s in cases]
        outs, _ = generate(llm, prompts, params, 64)
        ok = [valid(o.text, SCHEMAS[n]) for (n, _), o in zip(cases, outs, strict=True)]
        per_schema = {n: sum(v for (m, _), v in zip(cases, ok, strict=True) if m == n) for n in SCHEMAS}
        result[arm] = {"generations": len(ok), "valid": sum(ok), "per_schema": per_schema,
                       "truncated": sum(o.finish_reason == "length" for o in outs)}
    return result


def spec_arms(llm: LLM, names: list[str], args: argparse.Namespace) -> dict[str, Any]:
    prompts = [prompt_ids(llm, n, with_schema=False) for n in names]
    params = [SamplingParams(temperature=0, max_tokens=args.max_tokens,
                             structured_outputs=StructuredOutputs(json=SCHEMAS[n])) for n in names]
    arms = {"plain": llm}
    drafter = {"speculative": "draft", "speculative_model": args.spec_model} if args.spec_model else {
        "speculative": "self"}
    for width in (int(w) for w in args.spec_widths.split(",")):
        arms[f"{drafter['speculative']}, width {width}"] = LLM(
            args.model, dtype=args.dtype, num_threads=args.threads, num_speculative_tokens=args.spec_tokens,
            speculative_tree_width=width, speculative_adaptive=args.spec_adaptive, **drafter, **args.engine_args)
    for arm in arms.values():
        generate(arm, prompts, params, 1)  # warm-up: prefix cache and grammars, in every arm alike
    rates: dict[str, list[float]] = {name: [] for name in arms}
    outputs: dict[str, list[list[int]]] = {}
    before = {name: arm.engine.stats().spec_decode for name, arm in arms.items()}
    for _ in range(args.repeats):
        for name, arm in arms.items():
            outs, seconds = generate(arm, prompts, params, 1)
            outputs[name] = [o.token_ids for o in outs]
            rates[name].append(sum(len(o.token_ids) for o in outs) / seconds)
    result = {}
    for name, arm in arms.items():
        stats, first = arm.engine.stats().spec_decode, before[name]
        steps = stats.num_drafts - first.num_drafts if stats is not None else 0
        accepted = stats.num_accepted_tokens - first.num_accepted_tokens if stats is not None else 0
        result[name] = {"tok_s": statistics.median(rates[name]), "runs_tok_s": rates[name],
                        "tokens": sum(map(len, outputs[name])), "verify_steps": steps,
                        "mean_accepted_length": 1 + accepted / steps if steps else None,
                        "identical_to_plain": sum(a == b for a, b in zip(outputs[name], outputs["plain"], strict=True)),
                        "requests": len(prompts)}
    return result


def compile_times(llm: LLM) -> dict[str, float]:
    engine = llm.engine
    compiler = GrammarCompiler(engine.tokenizer.to_json(), engine.model_config.vocab_size, engine.eos_token_ids)
    out = {}
    for name, schema in SCHEMAS.items():
        started = time.perf_counter()
        compiler.compile(StructuredOutputs(json=schema))
        out[name] = (time.perf_counter() - started) * 1e3
    return out


def llama_cpp_peer(llm: LLM, args: argparse.Namespace) -> dict[str, Any]:
    try:
        from llama_cpp import Llama, LlamaGrammar
    except ImportError:
        return {"skipped": "llama_cpp not importable (pip install llama-cpp-python)"}
    peer = Llama(model_path=str(llm.engine.model_path), n_threads=args.threads, n_threads_batch=args.threads,
                 n_ctx=2048, verbose=False)
    grammars = {n: LlamaGrammar.from_json_schema(json.dumps(s), verbose=False) for n, s in SCHEMAS.items()}
    eos = sorted(llm.engine.eos_token_ids)
    ok, tokens, schema_s, free_s = 0, 0, 0.0, 0.0
    cases = [(n, s) for n in SCHEMAS for s in range(args.peer_samples)]
    for name, seed in cases:
        ids = prompt_ids(llm, name)
        started = time.perf_counter()
        out = peer.create_completion(ids, grammar=grammars[name], max_tokens=args.max_tokens, temperature=1.0,
                                     seed=seed)
        schema_s += time.perf_counter() - started
        count = out["usage"]["completion_tokens"]
        ok += valid(out["choices"][0]["text"], SCHEMAS[name])
        started = time.perf_counter()
        free = peer.create_completion(ids, max_tokens=count, temperature=1.0, seed=seed,
                                      logit_bias={t: -1e9 for t in eos})
        free_s += time.perf_counter() - started
        assert free["usage"]["completion_tokens"] == count
        tokens += count
    return {"generations": len(cases), "valid": ok, "tokens": tokens, "schema_tok_s": tokens / schema_s,
            "free_tok_s": tokens / free_s, "overhead_pct": (schema_s / free_s - 1) * 100}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (warning := busy_warning()) is not None:
        print(warning)
    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads, max_num_seqs=64, **args.engine_args)
    names = list(SCHEMAS)
    report: dict[str, Any] = {"machine": machine_description(), "dtype": str(llm.engine.dtype)}
    parts = set(args.parts.split(","))
    if "compile" in parts:
        report["compile_ms"] = compile_times(llm)
    if "speed" in parts:
        report["speed"] = [speed(llm, [names[i % len(names)] for i in range(args.speed_requests)], 1, args.repeats,
                                 args.max_tokens),
                           speed(llm, [names[i % len(names)] for i in range(64)], 64, args.repeats, args.max_tokens)]
    if "spec" in parts:
        report["spec"] = spec_arms(llm, [names[i % len(names)] for i in range(args.speed_requests)], args)
    if "validity" in parts:
        report["validity"] = validity(llm, args.samples, args.free_samples, args.max_tokens)
    if "peer" in parts:
        report["llama_cpp"] = llama_cpp_peer(llm, args)
    print_report(report)
    write_json(report | {"args": vars(args) | {"output": str(args.output)}}, args.output)
    print(f"wrote {args.output}")


def print_report(r: dict[str, Any]) -> None:
    print(f"dtype {r['dtype']}")
    if "compile_ms" in r:
        c = list(r["compile_ms"].values())
        print(f"compile per schema: median {statistics.median(c):.1f} ms, max {max(c):.1f} ms")
    if "speed" in r:
        print("| batch | requests | tokens | with schema tok/s | without tok/s | overhead |")
        print("|---|---|---|---|---|---|")
        for s in r["speed"]:
            print(f"| {s['batch']} | {s['requests']} | {s['tokens']} | {s['schema_tok_s']:.1f} | "
                  f"{s['free_tok_s']:.1f} | {s['overhead_pct']:+.1f}% |")
    if "spec" in r:
        plain = r["spec"]["plain"]["tok_s"]
        print("| arm | tok/s | vs plain | mean accepted length | verify steps | identical to plain |")
        print("|---|---|---|---|---|---|")
        for name, a in r["spec"].items():
            length = f"{a['mean_accepted_length']:.2f}" if a["mean_accepted_length"] else "–"
            print(f"| {name} | {a['tok_s']:.1f} | {a['tok_s'] / plain:.2f}× | {length} | {a['verify_steps']} | "
                  f"{a['identical_to_plain']}/{a['requests']} |")
    for arm, v in r.get("validity", {}).items():
        print(f"validity {arm}: {v['valid']}/{v['generations']} valid ({v['truncated']} hit max_tokens)")
    p = r.get("llama_cpp")
    if p is None:
        return
    if "skipped" in p:
        print(f"llama.cpp: skipped ({p['skipped']})")
    else:
        print(f"llama.cpp JSON-schema grammar: {p['valid']}/{p['generations']} valid; batch 1 {p['schema_tok_s']:.1f} "
              f"tok/s with the grammar, {p['free_tok_s']:.1f} without ({p['overhead_pct']:+.1f}%)")


if __name__ == "__main__":
    main()
