"""The engine loop: add_request → step (plan = schedule → result = run the plan → update → outputs) → abort.

Single-threaded by design; a server drives it from one background thread.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tokenmill.attention.backend import AttentionBackend
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.attention.fused_cpu import supports as fused_step_supports
from tokenmill.attention.select import plain_backend
from tokenmill.config import EngineConfig
from tokenmill.kernels import cpu_kernels
from tokenmill.kv.cache import KVCache, KVStorage
from tokenmill.kv.manager import KVCacheManager, PrefixCacheStats
from tokenmill.kv.quant import KVFormat
from tokenmill.kv.quantized_cache import QuantizedKVCache
from tokenmill.kv.streaming import StreamingWindow
from tokenmill.kv.transfer import KVTransfer, export_prefix, import_prefix
from tokenmill.model import memory
from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_file import GGUFFile, resolve_model_path
from tokenmill.model.llama import LlamaModel, rope_rotation
from tokenmill.model.loader import load_model
from tokenmill.output.processor import RequestState
from tokenmill.output.types import RequestOutput
from tokenmill.parallel.tensor import (
    TensorParallelContext,
    TensorParallelGroup,
    TensorParallelRunner,
    check_shardable,
    shard_model,
    start_workers,
)
from tokenmill.request import Request, RequestStatus
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.scheduler.clients import ClientUsage
from tokenmill.scheduler.plan import SeqSamples
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig
from tokenmill.spec.adaptive import StepCostModel
from tokenmill.spec.draft_model import DraftModelProposer, affordable_blocks
from tokenmill.spec.draft_model import load_weights as load_draft_weights
from tokenmill.spec.draft_vocab import draft_vocabulary
from tokenmill.spec.guard import SpeculationGuard
from tokenmill.spec.lookahead import LookaheadProposer
from tokenmill.spec.ngram import NgramProposer
from tokenmill.spec.proposer import Proposer
from tokenmill.spec.self_draft import CACHE as SELF_DRAFT_CACHE
from tokenmill.spec.self_draft import cached_calibration, subset_model
from tokenmill.spec.speculator import SpecDecodeStats, Speculator
from tokenmill.spec.target_kv import TargetKV, lendable
from tokenmill.structured.grammar import GrammarCompiler
from tokenmill.structured.masks import StructuredOutputManager, StructuredOutputStats
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# A request's length limit under a streaming window, which keeps positions within its capacity whatever the length.
STREAMING_MAX_MODEL_LEN = 1 << 30


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_free_blocks: int
    num_total_blocks: int
    num_preemptions: int
    prefix_cache: PrefixCacheStats
    prompt_tokens: int
    generation_tokens: int
    steps: int
    spec_decode: SpecDecodeStats | None = None  # when speculative decoding is on
    clients: dict[str, ClientUsage] = dataclasses.field(default_factory=dict)  # service per client
    structured: StructuredOutputStats | None = None  # once a request has had a grammar
    num_pauses: int = 0  # running requests paused for shorter ones (sjf with pausing), their KV kept


@dataclass(frozen=True)
class PrefixCacheIndex:
    hash_root: bytes  # where every chain starts (kv/hashing.py)
    block_size: int
    hashes: list[bytes]  # every cached block's chain hash


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None, parallel: TensorParallelContext | None = None) -> None:
        """`parallel`: this engine's rank in a tensor-parallel group; given only to the workers that rank 0 (an
        engine whose config asks for tensor_parallel_size > 1) spawns itself."""
        self.config = config = config or EngineConfig()
        self.tensor_parallel: TensorParallelGroup | None = None
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        elif config.tensor_parallel_size > 1:  # the cores shared out, not each process on all of them
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // config.tensor_parallel_size))
        self.device = config.torch_device()
        self.dtype, dtype_reason = config.resolve_dtype()
        logger.info("dtype %s (%s)", str(self.dtype).removeprefix("torch."), dtype_reason)
        self.model_path = resolve_model_path(config.model)
        started = time.perf_counter()
        gguf_file = GGUFFile(self.model_path)
        self.tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
        # The context is known before the weights load, so that the RoPE tables cover exactly the positions used
        # (a file may declare any context length).
        self.model_config = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
        self.kv_format = KVFormat.from_name(config.kv_cache_dtype)
        num_blocks = self._num_kv_blocks()
        if parallel is None and self.device.type == "cpu":
            self._check_memory(gguf_file, num_blocks)
        tp_workers: list[Any] = []
        if config.tensor_parallel_size > 1 and parallel is None:
            check_shardable(self.model_config, config.tensor_parallel_size)
            parallel, tp_workers = start_workers(config, type(self))  # they load the model while this one does
        block_size = config.block_size
        # The context: positions [0, max_positions) have RoPE tables, and a request fits the cache.
        self.max_positions = min(config.max_model_len or self.model_config.max_position,
                                 self.model_config.max_position, num_blocks * block_size)
        window = self._streaming_window()
        # A streaming window keeps positions within its capacity, so requests may grow past the context.
        self.max_model_len = self.max_positions if window is None else STREAMING_MAX_MODEL_LEN
        self.model = load_model(gguf_file, self.dtype, self.device, config.weight_format, config.int4_group_size,
                                max_positions=self.max_positions, int8_activations=config.gguf_activations == "int8")
        if parallel is not None:
            shm = config.shared_memory_all_reduce and self.device.type == "cpu"
            self.tensor_parallel = TensorParallelGroup(
                parallel, self.device, cpu_kernels().module if shm else None,
                config.max_num_batched_tokens * self.model_config.hidden_size if shm else 0)
            self.model_config = shard_model(self.model, self.model_config, parallel.rank, parallel.world,
                                            self.tensor_parallel.all_reduce)
            logger.info("tensor parallel rank %d of %d: %d of the model's heads", parallel.rank, parallel.world,
                        self.model_config.num_heads)
        packed = self.model.prepack_weights(config.bf16_kernel) if config.prepack_weights else 0
        self.kv_cache: KVStorage
        if self.kv_format is None:
            self.kv_cache = KVCache(self.model_config, num_blocks, block_size, self.dtype, self.device,
                                    config.kv_huge_pages)
        else:
            self.kv_cache = QuantizedKVCache(self.model_config, num_blocks, block_size, self.dtype, self.device,
                                             self.kv_format, config.max_num_seqs, config.kv_huge_pages)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.enable_chunked_prefill, config.scheduling_policy, config.sjf_aging,
                            config.fair_input_weight, config.fair_output_weight, config.sjf_wait_bound,
                            config.sjf_pause_ratio, config.sjf_pause_budget, config.readmit_whole),
            KVCacheManager(num_blocks, block_size, config.enable_prefix_caching,
                           cache_salt=f"{self.model_path.name}|{self.dtype}|{self._weight_format_name()}|"
                                      f"kv-{config.kv_cache_dtype}",
                           window=window, seals_blocks=self.kv_format is not None, h2o=config.h2o(),
                           h2o_lanes=self.model_config.num_layers * self.model_config.num_kv_heads
                           if config.h2o_per_head and config.h2o_budget is not None else 1),
        )
        backend, greedy = self._backend()
        self._check_h2o(backend)
        self.runner = ModelRunner(backend, self.model.lm_head, self.kv_cache, self.device, greedy, config.seed,
                                  max_positions=self.model.rope_cos.shape[0], vocab_size=self.model.embed.out_features,
                                  rotation=functools.partial(rope_rotation, self.model_config))
        if self.tensor_parallel is not None and self.tensor_parallel.rank == 0:
            self.runner = TensorParallelRunner(self.runner, self.tensor_parallel, tp_workers)
        self.speculator = self._speculator(gguf_file)
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids)
        # Built for the first grammar (indexing the vocabulary takes a moment), maybe from a server's thread.
        self._structured: StructuredOutputManager | None = None
        self._structured_lock = threading.Lock()
        self._structured_error: InvalidRequestError | None = None
        self._ids = itertools.count()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._steps = 0
        released = memory.release_freed_memory()
        if released:
            logger.info("the load's freed temporaries: %.0f MiB handed back to the system", released / 2**20)
        logger.info("loaded %s (%s, %s weights, %s) in %.1fs: %d KV blocks of %d tokens, context %d, "
                    "%d layers' weights prepacked (%s)",
                    self.model_path.name, self.dtype, self._weight_format_name(), self.device,
                    time.perf_counter() - started, num_blocks, block_size, self.max_positions, packed,
                    config.bf16_kernel)

    def _backend(self) -> tuple[AttentionBackend, Callable[[torch.Tensor], torch.Tensor] | None]:
        if isinstance(self.kv_cache, QuantizedKVCache):
            return self._quantized_kv_backend(self.kv_cache)
        return plain_backend(self.model, self.kv_cache, self.device, self.config.enforce_eager,
                             self.config.batch_invariant, self.config.chunk_attention)

    def _quantized_kv_backend(self, kv: QuantizedKVCache) -> tuple[AttentionBackend, Callable[..., torch.Tensor]]:
        """Only the fused CPU step reads quantized blocks: without it a quantized cache is refused, not emulated."""
        if self.device.type != "cpu":
            why = "it runs on CPU only"
        elif not fused_step_supports(self.model):
            why = "the model's dtype or head size is not one the kernels are built for"
        else:
            build = cpu_kernels()
            if build.module is not None:
                logger.info("KV cache %s: %d quantized blocks of %d tokens, %d residual slots in %s", kv.format.name,
                            kv.num_blocks, kv.block_size, kv.num_residual, self.dtype)
                backend = FusedCPUBackend(build.module, self.model, kv, self.config.batch_invariant,
                                          self.config.chunk_attention)
                return backend, build.module.greedy
            why = f"the CPU kernels could not be built: {build.error}"
        raise ValueError(f"kv_cache_dtype={kv.format.name!r} needs the fused CPU step, and {why}")

    def _check_h2o(self, backend: AttentionBackend) -> None:
        """H2O's scores come from the fused kernels: without them H2O is refused, not run blind."""
        h2o = self.config.h2o()
        if h2o is None:
            return
        if not isinstance(backend, FusedCPUBackend):
            raise ValueError(f"h2o_budget needs the fused CPU step, and this engine runs {type(backend).__name__} "
                             "(see the start-up log for why)")
        logger.info("H2O: at most %d blocks of %d tokens per request, the last %d blocks always kept, the others "
                    "chosen %s; prefix caching and forks off", h2o.budget_blocks, h2o.block_size, h2o.recent_blocks,
                    "per layer and KV head" if self.config.h2o_per_head else "for all layers and heads at once")

    def _speculator(self, gguf_file: GGUFFile) -> Speculator | None:
        config = self.config
        if config.speculative is None:
            return None
        proposer: Proposer
        # A draft's guesses are the target's token ids (the draft model's vocabulary is checked to be the target's).
        vocab = None if config.speculative_draft_vocab is None else draft_vocabulary(
            self.model_config.vocab_size, config.speculative_draft_vocab, self.tokenizer.stop_token_ids)
        if config.speculative == "draft":
            assert config.speculative_model is not None  # the config checks it
            weight_format, dtype = self._draft_format()
            proposer = DraftModelProposer.load(
                resolve_model_path(config.speculative_model), gguf_file, dtype, self.device,
                weight_format=weight_format, int4_group_size=config.int4_group_size,
                int8_activations=config.gguf_activations == "int8",
                prepack=config.bf16_kernel if config.prepack_weights else None,
                enforce_eager=config.enforce_eager,
                num_blocks=self.kv_cache.num_blocks, block_size=config.block_size,
                max_step_tokens=config.max_num_batched_tokens, max_positions=self.max_positions,
                measure_cost=config.speculative_adaptive, max_kv_bytes=self._draft_kv_bytes(),
                vocab=vocab, lookup=self._draft_lookup())
        elif config.speculative == "self":
            self_draft = self._self_draft(vocab, gguf_file)
            if self_draft is None:
                return None
            proposer = self_draft
        elif config.speculative == "lookahead":
            proposer = LookaheadProposer(config.lookahead_ngram_size)
        else:
            proposer = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        cost = None
        if config.speculative_adaptive:
            started = time.perf_counter()
            # Past the largest measured count the model extends linearly, as compute-bound steps grow.
            limit = min(config.max_num_batched_tokens, 64)
            counts = [n for n in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) if n <= limit] or [1]
            counts = counts if len(counts) > 1 else [1, 2]
            cost = StepCostModel.measure(lambda n: self.runner.time_rows(n, max_seqs=config.max_num_seqs), counts,
                                         repeats=2)
            table = ", ".join(f"{n} rows {t * 1e3:.1f} ms" for n, t in zip(cost.rows, cost.seconds, strict=True))
            logger.info("step-time model for adaptive draft lengths measured in %.1fs: %s",
                        time.perf_counter() - started, table)
        lent = isinstance(proposer, DraftModelProposer) and proposer.target_kv is not None
        return Speculator(proposer, config.num_speculative_tokens, self.max_model_len, config.max_num_batched_tokens,
                          cost, config.speculative_tree_width,
                          self.scheduler.kv_cache.block_table if lent else None,
                          SpeculationGuard() if cost is not None and config.speculative_guard else None)

    def _self_draft(self, vocab: torch.Tensor | None, gguf_file: GGUFFile) -> DraftModelProposer | None:
        """The self-speculative proposer, or None when its calibration found that no subset of the layers pays and
        draft lengths are adaptive: such a proposer would draft nothing but its probes, and still prefill every
        prompt through its layers and pay for the probes, for nothing."""
        config = self.config
        layers = config.speculative_layers
        source, own_format = self._self_draft_source(gguf_file)
        if layers is None:
            key = (f"{self.model_path.name}|{self.model_path.stat().st_size}|{self.dtype}|"
                   f"{self._weight_format_name()}" + (f"|draft {own_format}" if own_format else ""))
            calibration = cached_calibration(source, key, self.tokenizer.encode, config.num_speculative_tokens,
                                             target=self.model)
            layers = calibration.layers
            for best in (c for c in calibration.table if c.layers == layers):
                logger.info("self-speculation drafts with layers %s: agreement %.2f at %.2f of a step's bytes "
                            "promises %.2fx", list(layers), best.agreement, best.cost, best.speedup)
                if best.k == 0 and config.speculative_adaptive:
                    logger.warning("self-speculation is off: no subset of the model's layers promises a speedup "
                                   "(calibration table in %s); speculative_layers forces a subset, "
                                   "speculative_adaptive=False a fixed draft length", SELF_DRAFT_CACHE)
                    return None
        if layers[-1] >= self.model_config.num_layers:
            raise ValueError(f"speculative_layers {list(layers)} name a layer the model's "
                             f"{self.model_config.num_layers} do not have")
        draft = subset_model(source, layers)
        return DraftModelProposer.for_model(
            draft, self.device, enforce_eager=config.enforce_eager,
            num_blocks=affordable_blocks(draft.cfg, draft.dtype, self.kv_cache.num_blocks, config.block_size,
                                         self._draft_kv_bytes()), block_size=config.block_size,
            max_step_tokens=config.max_num_batched_tokens, measure_cost=config.speculative_adaptive, vocab=vocab,
            target_kv=self._lent_kv(layers), lookup=self._draft_lookup())

    def _draft_lookup(self) -> NgramProposer | None:
        """The prompt lookup a draft model checks first (`speculative_lookup`), or None."""
        config = self.config
        on = config.drafts_check_lookups and config.speculative_lookup is not False
        return NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max) if on else None

    def _lent_kv(self, layers: Sequence[int]) -> TargetKV | None:
        """The target's cache for a self-draft of `layers` to copy computed entries from, where it can."""
        kv = self.scheduler.kv_cache
        cache = lendable(self.kv_cache, kv.window is not None or kv.h2o is not None, self.tensor_parallel is not None)
        if not self.config.speculative_copy_kv or cache is None:
            return None
        logger.info("self-speculation copies the target's K/V of computed tokens into the draft's cache")
        return TargetKV(cache, tuple(layers))

    @property
    def structured(self) -> StructuredOutputManager:
        """Grammar compilation and token masks (tokenmill.structured), built on first use."""
        with self._structured_lock:
            if self._structured_error is not None:
                raise self._structured_error
            if self._structured is None:
                try:
                    compiler = GrammarCompiler(self.tokenizer.to_json(), self.model_config.vocab_size,
                                               self.eos_token_ids, self.config.structured_outputs_timeout_s)
                except Exception as exc:  # kept: every later grammar request gets the same answer at once
                    self._structured_error = InvalidRequestError(
                        "structured_outputs", f"grammars are unavailable for this model's tokenizer: {exc}")
                    raise self._structured_error from None
                self._structured = StructuredOutputManager(compiler, self.config.structured_outputs_overlap)
            return self._structured

    def _streaming_window(self) -> StreamingWindow | None:
        config = self.config
        if config.sliding_window is None:
            return None
        window = StreamingWindow(config.attention_sinks, config.sliding_window, config.block_size)
        if window.capacity > self.max_positions:
            raise ValueError(f"attention_sinks + sliding_window hold {window.capacity} tokens in whole blocks, beyond "
                             f"the context of {self.max_positions} positions")
        logger.info("streaming window: %d sink blocks and %d window blocks of %d tokens per request; prefix caching "
                    "and forks off", window.sink_blocks, window.window_blocks, config.block_size)
        return window

    def _weight_format_name(self, fmt: str | None = None) -> str:
        """The target's weight format (or `fmt`) with the options that change its numbers, for cache keys."""
        fmt = fmt or self.config.weight_format
        if fmt in ("gguf", "q4") and self.config.gguf_activations != "bf16":
            return f"{fmt}-{self.config.gguf_activations}-activations"
        return f"int4-g{self.config.int4_group_size}" if fmt == "int4" else fmt

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block, fixed = self._kv_layout_bytes()  # a quantized cache's residual slots share the budget
        budget = self.config.kv_cache_memory_gib * 2**30
        if budget - fixed < per_block:
            slots = (f" after the {fixed / 2**20:.1f} MiB of the {self.config.max_num_seqs} residual slots "
                     "(one per max_num_seqs; lower it)") if fixed else ""
            raise ValueError(f"kv_cache_memory_gib={self.config.kv_cache_memory_gib} holds no KV block of "
                             f"{per_block / 2**20:.2f} MiB{slots}")
        return int((budget - fixed) // per_block)

    def _kv_layout_bytes(self) -> tuple[int, int]:
        """(bytes per KV block, bytes the cache holds besides its blocks: a quantized cache's residual slots)."""
        config, cfg = self.config, self.model_config
        if self.kv_format is None:
            return KVCache.bytes_per_block(cfg, config.block_size, self.dtype), 0
        return (QuantizedKVCache.bytes_per_block(cfg, config.block_size, self.kv_format),
                QuantizedKVCache.residual_bytes(cfg, config.block_size, self.dtype, config.max_num_seqs))

    def _check_memory(self, gguf_file: GGUFFile, num_blocks: int) -> None:
        """Refuse a model that would not fit, before minutes of loading end in the OOM killer (model/memory.py)."""
        per_block, fixed = self._kv_layout_bytes()
        config, kv = self.config, num_blocks * per_block + fixed
        int8 = config.gguf_activations == "int8"

        def need(fmt: str, dtype: torch.dtype) -> memory.MemoryEstimate:
            return memory.estimate(gguf_file, self.model_config, fmt, dtype, kv, config.int4_group_size, int8,
                                   config.prepack_weights)

        available = memory.available_bytes()
        if available is None:
            return
        draft = self._draft_memory(num_blocks, gguf_file)
        alternatives = {fmt: memory.with_draft(need(fmt, torch.bfloat16), draft).total
                        for fmt in ("gguf", "int8", "int4") if fmt != config.weight_format}
        what = f"{self.model_path.name} as {config.weight_format} weights in {str(self.dtype).removeprefix('torch.')}"
        if draft is not None and config.speculative_model is not None:
            what += f", with its draft model {Path(str(config.speculative_model)).name},"
        elif draft is not None:
            what += f", with a self-speculative draft of its weights as {self._draft_format()[0]},"
        memory.check_fits(memory.with_draft(need(config.weight_format, self.dtype), draft), available, what,
                          alternatives)

    def _self_draft_source(self, gguf_file: GGUFFile) -> tuple[LlamaModel, str | None]:
        """The model whose layers self-speculation drafts with: the target itself (its tensors shared), or, with a
        `speculative_weight_format` other than the target's, the same file loaded once more in that format (and
        that format's name, for the calibration's key)."""
        config = self.config
        if not self._self_draft_has_own_format():
            return self.model, None
        weight_format, dtype = self._draft_format()
        started = time.perf_counter()
        source = load_draft_weights(gguf_file, dtype, self.device, weight_format, config.int4_group_size,
                                    self.max_positions, config.gguf_activations == "int8",
                                    config.bf16_kernel if config.prepack_weights else None)
        logger.info("self-speculation drafts from the model's weights as %s in %s (loaded in %.1fs)", weight_format,
                    str(dtype).removeprefix("torch."), time.perf_counter() - started)
        return source, self._weight_format_name(weight_format)

    def _self_draft_has_own_format(self) -> bool:
        """Whether self-speculation drafts from a copy of the model in another format or dtype (`_draft_format`)."""
        return self.config.speculative == "self" and self._draft_format() != (self.config.weight_format, self.dtype)

    def _draft_format(self) -> tuple[str, torch.dtype]:
        """A draft model's weight format and dtype: the CPU kernels of the quantized formats take bf16 activations
        only (as `resolve_dtype` says)."""
        weight_format = self.config.speculative_weight_format or self.config.weight_format
        return weight_format, (self.dtype if weight_format == "float" or self.device.type != "cpu" else torch.bfloat16)

    def _draft_kv_bytes(self) -> int:
        """A draft model's KV budget: as many tokens as the target's, within another kv_cache_memory_gib."""
        return int(self.config.kv_cache_memory_gib * 2**30)

    def _draft_memory(self, num_blocks: int, gguf_file: GGUFFile) -> memory.MemoryEstimate | None:
        """What a draft model (`speculative="draft"`) will hold, as `_speculator` loads it; for self-speculation in
        a format of its own, the target's file once more in that format (the layers it keeps, and their KV, are
        known only after the calibration: counted when `speculative_layers` names them)."""
        config = self.config
        weight_format, dtype = self._draft_format()
        if config.speculative == "draft" and config.speculative_model is not None:
            draft_file = GGUFFile(resolve_model_path(config.speculative_model))
            cfg = ModelConfig.from_gguf_metadata(draft_file.metadata, draft_file.tensor_names())
        elif self._self_draft_has_own_format():
            draft_file, cfg = gguf_file, self.model_config
        else:
            return None
        blocks = affordable_blocks(cfg, dtype, num_blocks, config.block_size, self._draft_kv_bytes())
        kv = blocks * KVCache.bytes_per_block(cfg, config.block_size, dtype)
        if draft_file is gguf_file:
            kv = kv * len(config.speculative_layers or ()) // cfg.num_layers
        return memory.estimate(draft_file, cfg, weight_format, dtype, kv, config.int4_group_size,
                               config.gguf_activations == "int8", config.prepack_weights)

    # ---- requests -------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, fork_of: str | None = None, cache_salt: str | None = None,
                    priority: int = 0, client_id: str | None = None) -> str:
        """Validate and queue a request. Raises InvalidRequestError naming the bad field; nothing is queued then.

        `fork_of` names an earlier request with the same prompt (a sibling of an n > 1 request): once that one has
        computed the prompt, this one shares its KV blocks instead of recomputing them. `cache_salt` partitions the
        prefix cache: only requests with the same salt (a tenant) share cached blocks. `priority` (lower first) needs
        the priority policy; `client_id` names whose service this is (the fair policy, per-client metrics).
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
        if params.n != 1:
            # One engine request is one sequence; LLM.generate and the server add the n samples as n requests.
            raise InvalidRequestError("n", f"the engine takes one sample per request, got n={params.n}: add n "
                                      "requests (tokenmill.sampling_params.fan_out) or use LLM.generate")
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", f"token ids must be < the vocabulary size {vocab}")
        if any(t >= vocab for t in params.logit_bias or ()):
            raise InvalidRequestError("logit_bias", f"token ids must be < the vocabulary size {vocab}")
        prompt_text, prompt_ids = self._tokenize(prompt)
        if len(prompt_ids) + 1 > self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"prompt has {len(prompt_ids)} tokens; the context allows at most "
                f"{self.max_model_len - 1} so that one token can be generated")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if self.scheduler.get(request_id) is not None:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        if cache_salt is not None and not isinstance(cache_salt, str):
            raise InvalidRequestError("cache_salt", f"must be a string, got {type(cache_salt).__name__}")
        self._check_tags(priority, client_id)
        request = Request(request_id, prompt_ids, params, self.eos_token_ids, fork_of=fork_of, cache_salt=cache_salt,
                          priority=priority, client_id=client_id)
        request.output_state = RequestState(request, prompt_text, self.tokenizer, self.max_model_len)
        if params.structured_outputs is not None:
            request.grammar = self.structured.compiler.compile(params.structured_outputs).matcher()
            self.structured.num_requests += 1
        self.scheduler.add_request(request)
        return request_id

    def _check_tags(self, priority: int, client_id: str | None) -> None:
        if not isinstance(priority, int) or isinstance(priority, bool):
            raise InvalidRequestError("priority", f"must be an integer, got {type(priority).__name__}")
        if priority != 0 and self.config.scheduling_policy != "priority":
            # vLLM's answer too: a priority that would be silently ignored is a client's bug worth reporting.
            raise InvalidRequestError("priority", f"needs the priority scheduling policy (this engine runs "
                                      f"{self.config.scheduling_policy!r})")
        if client_id is not None and not isinstance(client_id, str):
            raise InvalidRequestError("client_id", f"must be a string, got {type(client_id).__name__}")

    def _tokenize(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt)
            text: str | None = prompt
        elif isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            ids, text = list(prompt), None
            vocab = self.model_config.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise InvalidRequestError("prompt", f"token ids out of range [0, {vocab}): {bad[:5]}")
        else:
            raise InvalidRequestError("prompt", "must be a string or a list of token ids")
        if not ids:
            raise InvalidRequestError("prompt", "is empty")
        return text, ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Stop a request now and free its KV blocks; returns its final output, or None for an unknown id."""
        return self._finish(request_id, RequestStatus.FINISHED_ABORTED)

    def _finished(self, request_id: str, status: RequestStatus) -> Request | None:
        if self.speculator is not None:
            self.speculator.release(request_id)
        return self.scheduler.finish(request_id, status)

    def _finish(self, request_id: str, status: RequestStatus) -> RequestOutput | None:
        request = self._finished(request_id, status)
        if request is None:
            return None
        state: RequestState = request.output_state
        try:
            return state.take_output(status.value)
        except Exception:  # the request's own output state is broken: report the end without its last text
            logger.exception("final output of %s failed", request_id)
            return RequestOutput(request_id, state.prompt, request.prompt_token_ids, finish_reason=status.value,
                                 num_output_tokens=request.num_output_tokens)

    def reset_prefix_cache(self) -> bool:
        """Drop all cached KV blocks (e.g. between benchmark runs); False while requests hold blocks."""
        return self.scheduler.kv_cache.pool.reset_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that got a token or finished.

        A failure is kept to the request it belongs to: one whose output handling raises finishes with "error"
        alone; when running the batch raises, its requests are run one at a time until the one that fails alone is
        found, and only that one finishes with "error"."""
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
            if self._structured is not None:
                self._structured.trim_drafts(self.scheduler.running)
        plan = self.scheduler.schedule()
        masks = None
        try:
            if self._structured is not None:
                masks = self._structured.start(plan, self.scheduler.get)
            # Also when empty: it carries the finished ids the runner lets go of.
            started = time.perf_counter()
            result = self.runner.execute(plan, masks)
            seconds = time.perf_counter() - started
        except Exception:
            logger.exception("a step of %d sequences failed", len(plan.seqs))
            if masks is not None:
                futures.wait([masks])  # the worker still reads the matchers the next step may touch
            self.scheduler.step_failed(plan)
            if len(plan.seqs) != 1:
                return []
            failed = self._finish(plan.seqs[0].request_id, RequestStatus.FINISHED_ERROR)
            return [failed] if failed is not None else []
        if self.speculator is not None:
            self.speculator.observe(plan, result, seconds)
        if plan.is_empty:
            return []
        self.scheduler.update(plan, result)
        self._steps += 1
        for request_id, scored in result.prompt_logprobs.items():
            request = self.scheduler.get(request_id)
            if request is not None:
                request.num_prompt_logprobs += len(scored)
                request.output_state.add_prompt_logprobs(scored)
        outputs = []
        for samples in result.samples:
            try:
                outputs.append(self._apply(samples))
            except Exception:
                logger.exception("output handling of %s failed", samples.request_id)
                failed = self._finish(samples.request_id, RequestStatus.FINISHED_ERROR)
                if failed is not None:
                    outputs.append(failed)
        if self.speculator is not None:
            self.speculator.step_done(plan, result)
        return outputs

    def _apply(self, samples: SeqSamples) -> RequestOutput:
        """Append a sequence's new tokens in order, up to the first that finishes it."""
        request = self.scheduler.get(samples.request_id)
        assert request is not None, "the scheduler keeps every request it plans until it is finished"
        state: RequestState = request.output_state
        status = None
        for token_id, logprobs in zip(samples.token_ids, samples.logprobs, strict=True):
            grammar = request.grammar
            if grammar is not None and (not grammar.accept(token_id) or grammar.failed):
                raise RuntimeError(f"token {token_id} ended the request's grammar unfinished: {grammar.error}")
            status = state.append_token(token_id, logprobs)
            if status is None and request.grammar is not None and request.grammar.is_terminated:
                status = RequestStatus.FINISHED_STOPPED  # the output is complete: nothing else may follow
            self._generation_tokens += 1
            if request.num_output_tokens == 1:  # counted once its prefill completes, as vLLM does
                self._prompt_tokens += request.num_prompt_tokens
            if status is not None:
                self._finished(request.request_id, status)
                break
        return state.take_output(status.value if status is not None else None)

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is garbage-collected)."""
        if isinstance(self.runner, TensorParallelRunner):
            self.runner.close()

    def prefix_cache_index(self) -> PrefixCacheIndex:
        """What the prefix cache holds, for a router that sends requests where their prefix is."""
        kv = self.scheduler.kv_cache
        hashes = kv.pool.cached_hashes() if kv.enable_prefix_caching else []
        return PrefixCacheIndex(kv.hash_root, kv.block_size, hashes)

    def export_prefix(self, token_ids: Sequence[int], cache_salt: str | None = None) -> KVTransfer:
        """The KV of the leading full blocks of `token_ids` in the prefix cache (kv/transfer.py)."""
        return export_prefix(self.scheduler.kv_cache, self.kv_cache, token_ids, cache_salt)

    def import_prefix(self, transfer: KVTransfer) -> int:
        """Another engine's prefix blocks into this prefix cache; returns how many blocks were added."""
        return import_prefix(self.scheduler.kv_cache, self.kv_cache, transfer)

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            num_pauses=self.scheduler.num_pauses,
            prefix_cache=dataclasses.replace(kv.stats),
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            steps=self._steps,
            spec_decode=dataclasses.replace(self.speculator.stats, accepted_per_position=list(
                self.speculator.stats.accepted_per_position)) if self.speculator is not None else None,
            clients=self.scheduler.client_usage(),
            structured=self._structured.stats() if self._structured is not None else None,
        )
