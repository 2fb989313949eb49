"""`tokenmill` command line: generate, chat, serve, bench."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import TYPE_CHECKING, Any

from tokenmill.bench.cli import add_bench_args, cmd_bench
from tokenmill.entrypoints.args import add_engine_args, engine_config
from tokenmill.model.gguf_file import ModelLoadError
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.server.cli import add_serve_args, cmd_serve
from tokenmill.structured.params import StructuredOutputs

if TYPE_CHECKING:
    # Imported where a command needs it: it loads the engine, which `tokenmill --help` should not wait for.
    from tokenmill.entrypoints.llm import LLM


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling")
    g.add_argument("--max-tokens", type=int, default=max_tokens)
    g.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--repetition-penalty", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    g.add_argument("-n", type=int, default=1, help="samples per prompt")
    g = parser.add_argument_group("structured output (at most one)")
    g.add_argument("--json-schema", default=None, help="the output matches this JSON schema (its text, or @FILE)")
    g.add_argument("--json", action="store_true", help="the output is a JSON object")
    g.add_argument("--regex", default=None, help="the output matches this regular expression")
    g.add_argument("--choice", action="append", default=None, help="the output is one of these (repeatable)")
    g.add_argument("--grammar", default=None, help="the output matches this Lark grammar (its text, or @FILE)")


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        structured_outputs=structured_outputs(args),
    )


def structured_outputs(args: argparse.Namespace) -> StructuredOutputs | None:
    given = {"json": _text_or_file(args.json_schema), "json_object": args.json or None, "regex": args.regex,
             "choice": args.choice, "grammar": _text_or_file(args.grammar)}
    given = {k: v for k, v in given.items() if v is not None}
    flags = {"json": "--json-schema", "json_object": "--json", "regex": "--regex", "choice": "--choice",
             "grammar": "--grammar"}
    return StructuredOutputs(**given, field_name=flags[next(iter(given))]) if given else None


def _text_or_file(value: str | None) -> str | None:
    if value is None or not value.startswith("@"):
        return value
    try:
        with open(value[1:], encoding="utf-8") as f:
            return f.read()
    except OSError as exc:
        raise ValueError(f"cannot read {value[1:]}: {exc.strerror}") from None


def cmd_generate(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.llm import LLM

    params = sampling_params(args)
    started = time.perf_counter()
    llm = LLM(**engine_config(args).__dict__)
    print(f"[tokenmill] model loaded in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    started = time.perf_counter()
    if args.chat:
        results = llm.chat([[{"role": "user", "content": p}] for p in args.prompts], params,
                           use_tqdm=len(args.prompts) > 1)
    else:
        results = llm.generate(args.prompts, params, use_tqdm=len(args.prompts) > 1)
    elapsed = time.perf_counter() - started
    for result in results:
        for completion in result.outputs:
            header = f"--- prompt: {result.prompt!r}" + (f" (sample {completion.index})" if params.n > 1 else "")
            print(header)
            print(completion.text)
            print(f"--- {len(completion.token_ids)} tokens, finish_reason={completion.finish_reason}")
    generated = sum(len(c.token_ids) for r in results for c in r.outputs)
    print(f"[tokenmill] {generated} tokens in {elapsed:.2f}s ({generated / elapsed:.1f} tok/s)", file=sys.stderr)
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from tokenmill.entrypoints.llm import LLM

    llm = LLM(**engine_config(args).__dict__)
    params = sampling_params(args)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = args.once is None
    if interactive:
        print("tokenmill chat — empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
        if params.n > 1:
            print(f"each turn shows {params.n} answers; the conversation continues from answer 0", file=sys.stderr)
    while True:
        if interactive:
            try:
                user = input("you> ").strip()
            except EOFError:
                break
            if not user:
                break
            if user == "/reset":
                messages = messages[:1] if args.system else []
                continue
        else:
            user = args.once
        messages.append({"role": "user", "content": user})
        if params.n == 1:
            reply = stream_reply(llm.engine, llm.tokenizer.apply_chat_template(messages), params)
        else:
            reply = sample_replies(llm, messages, params)
        messages.append({"role": "assistant", "content": reply})
        if not interactive:
            break
    return 0


def stream_reply(engine: Any, prompt: str, params: SamplingParams) -> str:
    request_id = engine.add_request(prompt, params)
    print("assistant> ", end="", flush=True)
    text = ""
    started, tokens = time.perf_counter(), 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == request_id:
                print(out.delta_text, end="", flush=True)
                text, tokens = out.text, len(out.token_ids)
    elapsed = time.perf_counter() - started
    print(f"\n[{tokens} tokens, {tokens / max(elapsed, 1e-9):.1f} tok/s]", file=sys.stderr)
    return text


def sample_replies(llm: LLM, messages: list[dict[str, Any]], params: SamplingParams) -> str:
    """Print the n answers of an n>1 turn and return the first. An engine request takes one sample, so LLM.chat
    runs the n samples as sibling requests; they are printed once all are done, as n interleaved streams would be
    unreadable."""
    started = time.perf_counter()
    result = llm.chat(messages, params)[0]
    elapsed = time.perf_counter() - started
    for completion in result.outputs:
        print(f"assistant [{completion.index}]> {completion.text}")
    tokens = sum(len(c.token_ids) for c in result.outputs)
    print(f"[{tokens} tokens in {len(result.outputs)} answers, {tokens / max(elapsed, 1e-9):.1f} tok/s]",
          file=sys.stderr)
    return result.outputs[0].text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description="LLM inference engine")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate completions for prompts")
    gen.add_argument("prompts", nargs="+")
    gen.add_argument("--chat", action="store_true", help="wrap each prompt as a user chat message")
    add_engine_args(gen)
    add_sampling_args(gen, max_tokens=128)
    gen.set_defaults(func=cmd_generate)

    chat = sub.add_parser("chat", help="interactive chat with streaming output")
    chat.add_argument("--once", default=None, help="ask one question and exit (non-interactive)")
    chat.add_argument("--system", default=None, help="system prompt")
    add_engine_args(chat)
    add_sampling_args(chat, max_tokens=256)
    chat.set_defaults(func=cmd_chat)

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, models, metrics)")
    add_serve_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    bench = sub.add_parser("bench", help="benchmark scenarios (offline, serve, latency, concurrency) and peers")
    add_bench_args(bench)  # includes the engine options
    bench.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    # Start-up lines (model loaded, fused CPU step compiled or loaded from its cache, and how long each took).
    logging.getLogger("tokenmill.engine").setLevel(logging.INFO)
    try:
        return args.func(args)
    except (InvalidRequestError, ModelLoadError, ValueError) as exc:
        print(f"tokenmill: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
