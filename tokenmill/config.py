"""Engine configuration, validated at construction."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenmill.kv.h2o import HeavyHitterBudget
from tokenmill.kv.quant import KVFormat
from tokenmill.kv.streaming import StreamingWindow

# Defined here rather than next to the kernels in tokenmill/model/linear.py so that validating a configuration
# (the CLI, the server) does not depend on the model code.
WEIGHT_FORMATS = ("float", "int8", "int4", "gguf", "q4")
GGUF_ACTIVATIONS = ("bf16", "int8")
INT4_GROUP_SIZES = (32, 64, 128, 256)
SPECULATIVE_METHODS = (None, "ngram", "draft", "self", "lookahead")
SCHEDULING_POLICIES = ("fcfs", "priority", "fair", "sjf")
BF16_KERNELS = ("tokenmill", "onednn")
CHUNK_ATTENTION = ("auto", "rows", "tiled")

# Names accepted for a dtype wherever one is configured (engine, benchmarks).
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class EngineConfig:
    """Everything that shapes an engine. `model=None` means the default SmolLM2-135M-Instruct GGUF.

    The KV cache gets `num_kv_blocks` blocks if set, otherwise as many as fit in `kv_cache_memory_gib`.
    """

    model: str | None = None
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with native bf16 matmul, else float32
    device: str = "auto"  # auto: cuda when available, else cpu
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_memory_gib: float = 1.0
    max_model_len: int | None = None  # default: the model's context, capped by the KV cache size
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    enable_chunked_prefill: bool = True
    enable_prefix_caching: bool = True
    num_threads: int | None = None  # CPU threads for torch; default: all cores
    weight_format: str = "float"  # float | int8 | int4 | gguf | q4 (see tokenmill/model/linear.py)
    int4_group_size: int = 32
    # gguf weights: "bf16" activations (the products exact), or "int8": activations rounded per block of 32 to int8,
    # llama.cpp's scheme, for integer dot products on CPUs without bf16 ones (lossy: docs/benchmarks.md)
    gguf_activations: str = "bf16"
    # False: steps on CPU run the fused C++ step (tokenmill/kernels), built on first use and cached;
    # True: every step runs the eager PyTorch operators (the reference path, and the fallback without a compiler).
    enforce_eager: bool = False
    # True: the fused step attends every row as a one-token decode computes it (never the tiled chunk kernel), so a
    # sequence's attention does not depend on how its tokens were batched, chunked or found in the prefix cache, and
    # runs fp32 float matmuls row-exact at every size; with the other row-invariant matmuls (the gguf block tiles, the
    # packed bf16 kernel) its tokens do not either, bf16 included (docs/architecture.md).
    batch_invariant: bool = False
    # Prefill chunks' attention in the fused step: "rows" attends each row as a one-token decode computes it, so a
    # sequence's attention does not depend on how its prompt was chunked, batched or found in the prefix cache;
    # "tiled" runs the tiled chunk kernel, which rounds otherwise. "auto": "rows" in bf16 with a plain KV cache, where
    # the decode kernel is not slower on long chunks and, with the row-exact bf16 matmul, makes greedy output
    # independent of batching by default; "tiled" in fp32 and for quantized caches, where it is the faster one
    # (docs/architecture.md). batch_invariant implies "rows".
    chunk_attention: str = "auto"
    # CPU bf16 float weights kept packed for their matmul kernel (FloatLinear.prepack), by default tokenmill's
    # row-exact one ("tokenmill": a row's bits do not depend on its batch), or oneDNN's ("onednn").
    prepack_weights: bool = True
    bf16_kernel: str = "tokenmill"
    # CPU KV cache on 2 MiB transparent huge pages where Linux grants them (tokenmill/model/huge_pages.py).
    kv_huge_pages: bool = True
    seed: int = 0
    # Speculative decoding (tokenmill/spec): None (off), "ngram" (prompt lookup: guesses copied from earlier in the
    # prompt or output, longest match of prompt_lookup_max down to prompt_lookup_min tokens) or "draft" (a smaller
    # model with the same vocabulary, the GGUF file speculative_model, guesses greedily with a KV cache of its own:
    # as many tokens as the target's, within another kv_cache_memory_gib)
    # or "self" (a subset of the model's own layers drafts: speculative_layers, or chosen by a calibration pass and
    # cached) or "lookahead" (Jacobi iteration on the verify rows and a pool of lookahead_ngram_size-grams from them:
    # spec/lookahead.py), verified losslessly.
    speculative: str | None = None
    speculative_model: str | None = None
    # The draft model's weight format (default: the target's); a quantized draft runs with bf16 activations, which
    # its own KV cache lets it do beside a float32 target. With "self", a format other than the target's drafts
    # from the model's own file loaded once more in that format (every layer then a calibration candidate too).
    speculative_weight_format: str | None = None
    speculative_layers: tuple[int, ...] | None = None
    # With "self": the draft copies the target's K/V of the tokens the target has computed (the prompt, accepted
    # tokens) instead of running them through its own layers (spec/target_kv.py), where the target's cache is in the
    # draft's layout (full precision, no streaming window or H2O, one rank). False: the draft computes its own.
    speculative_copy_kv: bool = True
    # With "draft" or "self" (chains): each draft first feeds a prompt-lookup guess (prompt_lookup_min/max) along
    # with its first draft step and keeps the part the draft's own argmax agrees with, drafting the rest a step at a
    # time: the draft's own guesses, in fewer draft steps where the text repeats itself (spec/draft_model.py).
    # None: wherever it applies (not with token trees or a reduced draft vocabulary); True: required there; False: off.
    speculative_lookup: bool | None = None
    num_speculative_tokens: int = 5  # the most draft tokens a request gets per step
    # > 1: a draft model ("draft", "self") drafts token trees (spec/tree.py): besides its argmax chain, its next
    # speculative_tree_width - 1 likeliest tokens at each depth, all verified in one step (at most 15 tokens).
    speculative_tree_width: int = 1
    # A draft model's ("draft", "self") LM head over the speculative_draft_vocab lowest token ids and the stop tokens
    # only (spec/draft_vocab.py): a cheaper draft step that can guess no other token; None: the whole vocabulary.
    speculative_draft_vocab: int | None = None
    prompt_lookup_min: int = 2
    prompt_lookup_max: int = 4
    lookahead_ngram_size: int = 4
    # True: draft lengths per request and step from its acceptance rate and a step-time model measured at start-up
    # (0 where speculation would not pay); False: every request gets all the guesses it has, up to the maximum.
    speculative_adaptive: bool = True
    # With speculative_adaptive: drafts only at batch sizes where steps with them are measured to give more tokens
    # per second than steps without (spec/guard.py: both kinds of step timed end to end, the losing one retried now
    # and then); False: the adaptive lengths' models alone decide.
    speculative_guard: bool = True
    # Who goes first (tokenmill/scheduler): fcfs; priority (lower value first, may preempt lower priorities); fair
    # (VTC: the least-served client's requests first, charged fair_input_weight per prompt token and
    # fair_output_weight per output token); sjf (shortest predicted remaining work first; with sjf_wait_bound = b > 0
    # a request is due, and goes first, once b times the work queued ahead of it at its arrival has been admitted
    # since, which also keeps it from starving; sjf_aging > 0 ages waiting requests instead or as well; with
    # sjf_pause_ratio = r > 0 a waiting request that finds no seat pauses a running one with r times its work, which
    # keeps its KV and may stay paused sjf_pause_budget steps per step of its own work: scheduler/sjf.py; why these
    # defaults: docs/benchmarks.md, "sjf's frontier" and "sjf with pausing").
    scheduling_policy: str = "fcfs"
    # True: a preempted request that would be the first victim again comes back only when its whole recompute fits
    # with a block to spare per running request (Scheduler._fits_recompute); False: a chunk at a time, like any
    # request (the A/B switch: docs/benchmarks.md, "Readmission after preemption").
    readmit_whole: bool = True
    sjf_aging: float = 0.0
    sjf_wait_bound: float = 2.0
    sjf_pause_ratio: float = 4.0
    sjf_pause_budget: float = 1.5
    fair_input_weight: float = 1.0
    fair_output_weight: float = 2.0
    # Structured output (tokenmill/structured): a request's grammar is compiled within this many seconds or the
    # request is refused; its token masks are filled on a worker thread while the model runs unless overlap is off.
    structured_outputs_timeout_s: float = 10.0
    structured_outputs_overlap: bool = True
    # StreamingLLM (tokenmill/kv/streaming.py): with sliding_window = W, every request keeps its first
    # attention_sinks tokens' blocks and its last W tokens' blocks, the rest evicted, so requests run past the
    # model's context at fixed memory. Turns prefix caching and n > 1 forks off (eviction rewrites blocks).
    sliding_window: int | None = None
    attention_sinks: int = 0
    # Quantized KV (tokenmill/kv/quant.py): auto (the model dtype), int8, or int4/int2 as KIVI quantizes them; each
    # request's open block stays in full precision. Needs the fused CPU step; turns forks off; drafts never fill a
    # block.
    kv_cache_dtype: str = "auto"
    # H2O (tokenmill/kv/h2o.py): every request keeps at most h2o_budget tokens' KV, its last h2o_recent tokens
    # (default: half the budget) and the tokens that have received the most attention, the rest evicted; per head
    # (each layer's KV head choosing its own, as the paper does) unless h2o_per_head is off (one choice for all).
    # Needs the fused CPU step (its kernels add up the attention); turns prefix caching and forks off.
    h2o_budget: int | None = None
    h2o_recent: int | None = None
    h2o_per_head: bool = True
    # Tensor parallelism (tokenmill/parallel/tensor.py): this many processes each hold 1/N of every layer's heads
    # and MLP columns, with two all-reduces per layer (NCCL on CUDA; on CPU shared memory or gloo). Float weights,
    # on the eager or the fused CPU step.
    tensor_parallel_size: int = 1  # threads per process, unless num_threads: the cores divided among them
    # CPU ranks all-reduce in a shared memory mapping (parallel/shm.py) instead of over gloo's loopback TCP.
    shared_memory_all_reduce: bool = True

    def h2o(self) -> HeavyHitterBudget | None:
        if self.h2o_budget is None:
            return None
        recent = self.h2o_budget // 2 if self.h2o_recent is None else self.h2o_recent
        return HeavyHitterBudget(self.h2o_budget, recent, self.block_size)

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.device != "auto" and not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {self.device!r}")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {self.block_size}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be >= 1, got {self.num_kv_blocks}")
        if self.kv_cache_memory_gib <= 0:
            raise ValueError(f"kv_cache_memory_gib must be > 0, got {self.kv_cache_memory_gib}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        for name in ("max_num_seqs", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be >= 1, got {self.tensor_parallel_size}")
        if self.tensor_parallel_size > 1:
            unsupported = {"weight_format": self.weight_format != "float", "speculative": self.speculative is not None,
                           "kv_cache_dtype": self.kv_cache_dtype != "auto", "h2o_budget": self.h2o_budget is not None}
            for name, set_ in unsupported.items():
                if set_:
                    raise ValueError(f"tensor_parallel_size > 1 does not combine with {name}={getattr(self, name)!r} "
                                     "yet (float weights, a plain KV cache, no speculative decoding)")
        if self.weight_format not in WEIGHT_FORMATS:
            raise ValueError(f"weight_format must be one of {WEIGHT_FORMATS}, got {self.weight_format!r}")
        if self.weight_format != "float" and self.dtype != "auto" and DTYPES[self.dtype] != torch.bfloat16:
            # Refused here rather than at model load (linear.check_weight_format), before minutes of loading.
            raise ValueError(f"weight_format={self.weight_format!r} needs dtype 'bfloat16' or 'auto' (the quantized "
                             f"CPU kernels take bf16 activations), got {self.dtype!r}")
        if self.gguf_activations not in GGUF_ACTIVATIONS:
            raise ValueError(f"gguf_activations must be one of {GGUF_ACTIVATIONS}, got {self.gguf_activations!r}")
        block_formats = {"gguf", "q4"} & {self.weight_format, self.speculative_weight_format}
        if self.gguf_activations != "bf16" and not block_formats:
            raise ValueError(f"gguf_activations={self.gguf_activations!r} applies to the block formats 'gguf' and "
                             f"'q4' (weight_format or speculative_weight_format), not {self.weight_format!r}")
        if self.int4_group_size not in INT4_GROUP_SIZES:
            raise ValueError(f"int4_group_size must be one of {INT4_GROUP_SIZES}, got {self.int4_group_size}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1, got {self.num_threads}")
        if self.speculative not in SPECULATIVE_METHODS:
            raise ValueError(f"speculative must be one of {SPECULATIVE_METHODS}, got {self.speculative!r}")
        if (self.speculative == "draft") != (self.speculative_model is not None):
            raise ValueError("speculative='draft' and speculative_model go together: the draft model is a GGUF file")
        if self.speculative_layers is not None and (self.speculative != "self" or not self.speculative_layers or list(
                self.speculative_layers) != sorted(set(self.speculative_layers)) or self.speculative_layers[0] < 0):
            raise ValueError("speculative_layers are increasing layer indices, for speculative='self', got "
                             f"{self.speculative_layers}")
        if self.chunk_attention not in CHUNK_ATTENTION:
            raise ValueError(f"chunk_attention must be one of {CHUNK_ATTENTION}, got {self.chunk_attention!r}")
        if self.batch_invariant and self.chunk_attention == "tiled":
            raise ValueError("batch_invariant attends every row as a decode does, so chunk_attention='tiled' cannot "
                             "go with it")
        if self.bf16_kernel not in BF16_KERNELS:
            raise ValueError(f"bf16_kernel must be one of {BF16_KERNELS}, got {self.bf16_kernel!r}")
        if self.speculative_weight_format not in (None, *WEIGHT_FORMATS):
            raise ValueError(f"speculative_weight_format must be one of {WEIGHT_FORMATS}, got "
                             f"{self.speculative_weight_format!r}")
        if self.speculative_weight_format is not None and self.speculative not in ("draft", "self"):
            raise ValueError("speculative_weight_format is the format of a draft model's weights (speculative='draft' "
                             f"or 'self'), not of speculative={self.speculative!r}")
        if self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be >= 1, got {self.num_speculative_tokens}")
        if self.speculative_lookup and not self.drafts_check_lookups:
            raise ValueError("speculative_lookup is checked by a draft model's chain drafts (speculative='draft' or "
                             "'self', without speculative_tree_width or speculative_draft_vocab)")
        if self.speculative_draft_vocab is not None and (
                self.speculative not in ("draft", "self") or self.speculative_draft_vocab < 1):
            raise ValueError("speculative_draft_vocab is a positive number of tokens for a draft model "
                             f"(speculative='draft' or 'self'), got {self.speculative_draft_vocab} with "
                             f"speculative={self.speculative!r}")
        if self.lookahead_ngram_size < 2:
            raise ValueError(f"lookahead_ngram_size must be >= 2, got {self.lookahead_ngram_size}")
        self._check_tree()
        if not self.structured_outputs_timeout_s > 0:
            raise ValueError(f"structured_outputs_timeout_s must be > 0, got {self.structured_outputs_timeout_s}")
        check_scheduling(self.scheduling_policy, self.sjf_aging, self.fair_input_weight, self.fair_output_weight,
                         self.sjf_wait_bound, self.sjf_pause_ratio, self.sjf_pause_budget)
        if self.attention_sinks and self.sliding_window is None:
            raise ValueError("attention_sinks needs a sliding_window: sinks are what a window keeps besides itself")
        if self.sliding_window is not None:
            StreamingWindow(self.attention_sinks, self.sliding_window, self.block_size)  # checks the two sizes
        if self.sliding_window is not None and not self.enable_chunked_prefill:
            raise ValueError("sliding_window needs chunked prefill: a prompt longer than the window is computed in "
                             "chunks that fit it")
        if KVFormat.from_name(self.kv_cache_dtype) is not None:
            for off, reason in ((self.sliding_window is None, "sliding_window (keys are rotated in place)"),
                                (not self.enforce_eager, "enforce_eager (the kernels read the quantized blocks)")):
                if not off:
                    raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} does not combine with {reason} yet")
        self._check_h2o()
        if self.batch_invariant and self.enforce_eager:
            raise ValueError("batch_invariant is a mode of the fused CPU step's attention; enforce_eager turns that "
                             "step off")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError("need 1 <= prompt_lookup_min <= prompt_lookup_max, got "
                             f"{self.prompt_lookup_min} and {self.prompt_lookup_max}")

    @property
    def drafts_check_lookups(self) -> bool:
        """Whether this speculation can have its draft model check prompt-lookup guesses (`speculative_lookup`):
        chains of a draft model ("draft", "self") over its whole vocabulary (one sample row per request otherwise)."""
        return (self.speculative in ("draft", "self") and self.speculative_tree_width == 1
                and self.speculative_draft_vocab is None)

    def _check_tree(self) -> None:
        if self.speculative_tree_width < 1:
            raise ValueError(f"speculative_tree_width must be >= 1, got {self.speculative_tree_width}")
        if self.speculative_tree_width == 1:
            return
        if self.speculative not in ("draft", "self"):
            raise ValueError("speculative_tree_width > 1 needs a draft model (speculative='draft' or 'self'): prompt "
                             f"lookup drafts chains, got speculative={self.speculative!r}")

    def _check_h2o(self) -> None:
        if self.h2o_budget is None:
            if self.h2o_recent is not None:
                raise ValueError("h2o_recent needs h2o_budget: the recent tokens are part of the budget")
            return
        self.h2o()  # checks the two sizes
        for off, reason in ((self.sliding_window is None, "sliding_window (one eviction policy at a time)"),
                            (not self.enforce_eager, "enforce_eager (the fused kernels add up the attention)"),
                            (KVFormat.from_name(self.kv_cache_dtype) is None,
                             "a quantized kv_cache_dtype yet (eviction moves single rows between blocks, which "
                             "a quantized block cannot take)"),
                            (self.enable_chunked_prefill, "chunked prefill off (a prompt longer than the budget is "
                                                          "computed in chunks that fit it)"),
                            (self.speculative is None, "speculative decoding yet (a verify step's rejected rows would "
                                                       "add their attention to the scores that choose what is "
                                                       "evicted: the output would not be the one without drafts)")):
            if not off:
                raise ValueError(f"h2o_budget does not combine with {reason}")

    def torch_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def torch_dtype(self) -> torch.dtype:
        return self.resolve_dtype()[0]

    def resolve_dtype(self) -> tuple[torch.dtype, str]:
        """The run dtype and why (for the start-up log): `auto` picks bf16 only where it is fast."""
        if self.dtype != "auto":
            return DTYPES[self.dtype], "as configured"
        if self.torch_device().type == "cuda":
            return torch.bfloat16, "auto on CUDA"
        # The CPU weight-only int8/int4 and GGUF kernels are vectorized for bf16 activations only.
        if self.weight_format != "float":
            return torch.bfloat16, f"auto: {self.weight_format} weights run with bf16 activations"
        if _cpu_has_native_bf16():
            return torch.bfloat16, "auto: the CPU has native bf16 matmul"
        return torch.float32, "auto: the CPU has no native bf16 matmul, where fp32 is faster"


def check_scheduling(policy: str, sjf_aging: float, fair_input_weight: float, fair_output_weight: float,
                     sjf_wait_bound: float, sjf_pause_ratio: float, sjf_pause_budget: float) -> None:
    """Shared by EngineConfig and SchedulerConfig."""
    if policy not in SCHEDULING_POLICIES:
        raise ValueError(f"scheduling_policy must be one of {SCHEDULING_POLICIES}, got {policy!r}")
    if not sjf_aging >= 0:
        raise ValueError(f"sjf_aging must be >= 0, got {sjf_aging}")
    if not (sjf_wait_bound == 0 or sjf_wait_bound >= 1):
        raise ValueError(f"sjf_wait_bound must be 0 (off) or >= 1, got {sjf_wait_bound}")
    if not (sjf_pause_ratio == 0 or sjf_pause_ratio >= 1):
        # Below 1 a paused request could pause its own pauser back, over and over.
        raise ValueError(f"sjf_pause_ratio must be 0 (off) or >= 1, got {sjf_pause_ratio}")
    if not sjf_pause_budget > 0:
        raise ValueError(f"sjf_pause_budget must be > 0, got {sjf_pause_budget}")
    if not (fair_input_weight >= 0 and fair_output_weight >= 0 and fair_input_weight + fair_output_weight > 0):
        raise ValueError(f"fair weights must be >= 0 and not both 0, got {fair_input_weight} and {fair_output_weight}")


def _cpu_has_native_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags
