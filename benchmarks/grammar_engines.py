"""llguidance and xgrammar side by side on the default model's vocabulary: what tokenmill's structured output
builds on was chosen by this script.

For each library: the time to index the vocabulary; per JSON schema of benchmarks/data/json_schemas.json the
compile time and the mask time per token while a matcher walks the schema's example (the tokens of
json_schema_examples.json, written the way the grammar wants: one space after ',' and ':'); the mask time of one
batched fill for 64 matchers at once (the schemas cycled, each at its own point of its example); and coverage: which
of a set of harder schema features (and a regex and a Lark-only check) each compiles. The libraries alternate
schema by schema (A, B, A, B). xgrammar is optional: `pip install --no-deps xgrammar apache-tvm-ffi`.

    .venv/bin/python benchmarks/grammar_engines.py
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tokenmill.bench.machine import busy_warning, machine_description  # noqa: E402
from tokenmill.bench.report import write_json  # noqa: E402
from tokenmill.model.gguf_file import GGUFFile, resolve_model_path  # noqa: E402
from tokenmill.tokenizer import Tokenizer  # noqa: E402

DATA = Path(__file__).resolve().parent / "data"
SEPARATORS = (", ", ": ")

# Schema features beyond the benchmark set: does each library compile them?
COVERAGE: dict[str, dict[str, Any]] = {
    "$ref/$defs": {"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}},
                   "type": "object", "properties": {"a": {"$ref": "#/$defs/pt"}}, "required": ["a"]},
    "recursive $ref": {"$defs": {"node": {"type": "object", "properties": {"kids": {"type": "array",
                       "items": {"$ref": "#/$defs/node"}}}}}, "$ref": "#/$defs/node"},
    "oneOf": {"oneOf": [{"type": "integer"}, {"type": "string", "maxLength": 3}]},
    "allOf": {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                        {"type": "object", "properties": {"b": {"type": "string"}}, "required": ["b"]}]},
    "format date-time": {"type": "string", "format": "date-time"},
    "format email": {"type": "string", "format": "email"},
    "minLength/maxLength": {"type": "string", "minLength": 3, "maxLength": 5},
    "exclusiveMinimum": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
    "multipleOf": {"type": "integer", "multipleOf": 5},
    "patternProperties": {"type": "object", "patternProperties": {"^x-": {"type": "string"}}},
    "additionalProperties schema": {"type": "object", "additionalProperties": {"type": "integer"}},
    "minProperties": {"type": "object", "minProperties": 1, "additionalProperties": {"type": "integer"}},
    "uniqueItems": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True},
    "prefixItems": {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}], "items": False},
    "const object": {"const": {"a": 1}},
    "if/then": {"type": "object", "if": {"properties": {"a": {"const": 1}}}, "then": {"required": ["b"]}},
    "not": {"not": {"type": "string"}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5, help="walks per schema (mask times: median)")
    p.add_argument("--output", type=Path, default=Path("benchmarks/results/grammar_engines.json"))
    return p.parse_args(argv)


class LLGuidance:
    name = "llguidance"

    def __init__(self, tokenizer: Tokenizer) -> None:
        import llguidance
        import llguidance.torch as lt

        self.llg, self.lt = llguidance, lt
        started = time.perf_counter()
        self.tok = llguidance.LLTokenizer(tokenizer.to_json(), n_vocab=tokenizer.vocab_size,
                                          eos_token=sorted(tokenizer.stop_token_ids))
        self.index_s = time.perf_counter() - started
        self.vocab = tokenizer.vocab_size
        self.executor = llguidance.LLExecutor()

    def compile(self, schema: dict[str, Any]) -> Any:
        options = {"whitespace_flexible": False, "item_separator": SEPARATORS[0], "key_separator": SEPARATORS[1]}
        grammar = self.llg.LLMatcher.grammar_from_json_schema(json.dumps(schema), defaults=options)
        matcher = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def compile_regex(self, regex: str) -> Any:
        matcher = self.llg.LLMatcher(self.tok, self.llg.LLMatcher.grammar_from_regex(regex), log_level=0)
        if matcher.is_error():
            raise ValueError(matcher.get_error())
        return matcher

    def matcher(self, compiled: Any) -> Any:
        return compiled.deep_copy()

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.lt.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask(matcher, bitmask, 0)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.lt.fill_next_token_bitmask_par(self.executor, [(m, i) for i, m in enumerate(matchers)], bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.consume_token(token))


class XGrammar:
    name = "xgrammar"

    def __init__(self, tokenizer: Tokenizer) -> None:
        import xgrammar

        self.xgr = xgrammar
        started = time.perf_counter()
        vocab = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
        info = xgrammar.TokenizerInfo(vocab, xgrammar.VocabType.BYTE_LEVEL, vocab_size=tokenizer.vocab_size,
                                      stop_token_ids=sorted(tokenizer.stop_token_ids))
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=2, cache_enabled=False)
        self.index_s = time.perf_counter() - started
        self.vocab = tokenizer.vocab_size
        self.batch = xgrammar.BatchGrammarMatcher()

    def compile(self, schema: dict[str, Any]) -> Any:
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False, separators=SEPARATORS)

    def compile_regex(self, regex: str) -> Any:
        return self.compiler.compile_regex(regex)

    def matcher(self, compiled: Any) -> Any:
        return self.xgr.GrammarMatcher(compiled)

    def bitmask(self, rows: int) -> torch.Tensor:
        return self.xgr.allocate_token_bitmask(rows, self.vocab)

    def fill(self, matcher: Any, bitmask: torch.Tensor) -> None:
        matcher.fill_next_token_bitmask(bitmask, 0)

    def fill_batch(self, matchers: list[Any], bitmask: torch.Tensor) -> None:
        self.batch.batch_fill_next_token_bitmask(matchers, bitmask)

    def accept(self, matcher: Any, token: int) -> bool:
        return bool(matcher.accept_token(token))


def walk(lib: Any, compiled: Any, tokens: list[int]) -> tuple[float, bool]:
    """Seconds per mask over the example's tokens, and whether every token was allowed and accepted."""
    matcher, bitmask, total, ok = lib.matcher(compiled), lib.bitmask(1), 0.0, True
    for token in tokens:
        started = time.perf_counter()
        lib.fill(matcher, bitmask)
        total += time.perf_counter() - started
        ok &= bool((int(bitmask[0, token // 32]) >> (token % 32)) & 1) and lib.accept(matcher, token)
    return total / len(tokens), ok


def batch_fill(lib: Any, compiled: dict[str, Any], tokens: dict[str, list[int]], batch: int) -> float:
    """Median seconds of one batched fill of `batch` matchers, each at its own point of its schema's example."""
    names = list(compiled)
    matchers, plans = [], []
    for i in range(batch):
        name = names[i % len(names)]
        m = lib.matcher(compiled[name])
        for token in tokens[name][: (i * 7) % len(tokens[name])]:
            lib.accept(m, token)
        matchers.append(m)
        plans.append(name)
    bitmask = lib.bitmask(batch)
    times = []
    for _ in range(9):
        started = time.perf_counter()
        lib.fill_batch(matchers, bitmask)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if (warning := busy_warning()) is not None:
        print(warning)
    gguf = GGUFFile(resolve_model_path(None))
    tokenizer = Tokenizer.from_gguf_metadata(gguf.metadata)
    schemas = json.loads((DATA / "json_schemas.json").read_text())
    examples = json.loads((DATA / "json_schema_examples.json").read_text())
    tokens = {n: tokenizer.encode(json.dumps(examples[n], separators=SEPARATORS)) for n in schemas}
    libs: list[Any] = [LLGuidance(tokenizer)]
    try:
        libs.append(XGrammar(tokenizer))
    except ImportError:
        print("xgrammar is not installed: llguidance alone")
    rows: dict[str, dict[str, Any]] = {lib.name: {"index_s": lib.index_s, "schemas": {}} for lib in libs}
    compiled: dict[str, dict[str, Any]] = {lib.name: {} for lib in libs}
    for name, schema in schemas.items():
        for lib in libs:
            started = time.perf_counter()
            compiled[lib.name][name] = lib.compile(schema)
            compile_s = time.perf_counter() - started
            walks = [walk(lib, compiled[lib.name][name], tokens[name]) for _ in range(args.repeats)]
            rows[lib.name]["schemas"][name] = {"compile_ms": compile_s * 1e3,
                                               "mask_us_per_token": statistics.median(w[0] for w in walks) * 1e6,
                                               "example_accepted": all(w[1] for w in walks)}
    for lib in libs:
        rows[lib.name]["batch_fill_ms"] = batch_fill(lib, compiled[lib.name], tokens, args.batch) * 1e3
        covered = {}
        for feature, schema in COVERAGE.items():
            try:
                lib.compile(schema)
                covered[feature] = True
            except Exception as exc:  # each library reports unsupported features its own way
                covered[feature] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        try:
            lib.compile_regex(r"(\+1 )?\(?[0-9]{3}\)?[ -][0-9]{3}-[0-9]{4}")
            covered["regex"] = True
        except Exception as exc:
            covered["regex"] = f"{type(exc).__name__}: {exc}"
        rows[lib.name]["coverage"] = covered
    print_table(rows, schemas, args.batch)
    write_json({"machine": machine_description(), "batch": args.batch, "results": rows}, args.output)
    print(f"wrote {args.output}")


def print_table(rows: dict[str, dict[str, Any]], schemas: dict[str, Any], batch: int) -> None:
    names = list(rows)
    print("vocabulary index: " + ", ".join(f"{n} {rows[n]['index_s']:.2f} s" for n in names))
    header = "| schema | " + " | ".join(f"{n} compile ms | {n} mask µs/token" for n in names) + " |"
    print(header)
    print("|---" * (1 + 2 * len(names)) + "|")
    for schema in schemas:
        cells = []
        for n in names:
            r = rows[n]["schemas"][schema]
            cells.append(f"{r['compile_ms']:.1f} | {r['mask_us_per_token']:.0f}"
                         + ("" if r["example_accepted"] else " (example rejected)"))
        print(f"| {schema} | " + " | ".join(cells) + " |")
    for n in names:
        r = rows[n]
        compile_ms = [v["compile_ms"] for v in r["schemas"].values()]
        mask = [v["mask_us_per_token"] for v in r["schemas"].values()]
        covered = sum(v is True for v in r["coverage"].values())
        missing = ", ".join(k for k, v in r["coverage"].items() if v is not True) or "none"
        print(f"{n}: compile median {statistics.median(compile_ms):.1f} ms (max {max(compile_ms):.1f}), mask median "
              f"{statistics.median(mask):.0f} µs/token, batch {batch} fill {r['batch_fill_ms']:.2f} ms, coverage "
              f"{covered}/{len(r['coverage'])} compile (refused: {missing})")


if __name__ == "__main__":
    main()
