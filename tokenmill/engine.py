"""The engine loop: add_request → step (schedule → run model → sample → outputs) → abort.

Single-threaded by design; a server drives it from one background thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import time
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.kernels import cpu_decode_kernels
from tokenmill.model.fused_step import FusedStep
from tokenmill.model.fused_step import supports as fused_step_supports
from tokenmill.model.gguf_file import GGUFFile, resolve_model_path
from tokenmill.model.llama import KVCache
from tokenmill.model.loader import load_model
from tokenmill.output.processor import RequestState
from tokenmill.outputs import RequestOutput
from tokenmill.request import Request, RequestStatus
from tokenmill.runner.model_runner import ModelRunner
from tokenmill.sampling_params import InvalidRequestError, SamplingParams
from tokenmill.scheduler.kv_cache_manager import KVCacheManager, PrefixCacheStats
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig
from tokenmill.tokenizer import Tokenizer

logger = logging.getLogger(__name__)


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


class LLMEngine:
    def __init__(self, config: EngineConfig | None = None) -> None:
        self.config = config = config or EngineConfig()
        if config.num_threads is not None:
            torch.set_num_threads(config.num_threads)
        self.device = config.torch_device()
        self.dtype = config.torch_dtype()
        self.model_path = resolve_model_path(config.model)
        started = time.perf_counter()
        gguf_file = GGUFFile(self.model_path)
        self.tokenizer = Tokenizer.from_gguf_metadata(gguf_file.metadata)
        self.model = load_model(gguf_file, self.dtype, self.device, config.weight_format, config.int4_group_size)
        packed = self.model.prepack_weights() if config.prepack_weights else 0
        self.model_config = self.model.cfg
        num_blocks = self._num_kv_blocks()
        block_size = config.block_size
        self.max_model_len = min(config.max_model_len or self.model_config.max_position,
                                 self.model_config.max_position, num_blocks * block_size)
        self.kv_cache = KVCache(self.model_config, num_blocks, block_size, self.dtype, self.device,
                                config.kv_huge_pages)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len,
                            config.enable_chunked_prefill),
            KVCacheManager(num_blocks, block_size, config.enable_prefix_caching,
                           cache_salt=f"{self.model_path.name}|{self.dtype}|{self._weight_format_name()}"),
        )
        self.runner = ModelRunner(self.model, self.kv_cache, self.device, self._fused_step())
        self.eos_token_ids = frozenset(self.tokenizer.stop_token_ids)
        self._states: dict[str, RequestState] = {}
        self._ids = itertools.count()
        self._prompt_tokens = 0
        self._generation_tokens = 0
        self._steps = 0
        logger.info("loaded %s (%s, %s weights, %s) in %.1fs: %d KV blocks of %d tokens, max_model_len %d, "
                    "%d layers' weights prepacked for oneDNN",
                    self.model_path.name, self.dtype, self._weight_format_name(), self.device,
                    time.perf_counter() - started, num_blocks, block_size, self.max_model_len, packed)

    def _fused_step(self) -> FusedStep | None:
        """The compiled model step unless `enforce_eager`; None (eager steps) off CPU, for dtypes or head sizes it is
        not built for, or when the kernels cannot be built here — then with a warning saying why."""
        if self.config.enforce_eager or self.device.type != "cpu" or not fused_step_supports(self.model):
            return None
        build = cpu_decode_kernels()
        if build.module is None:
            logger.warning("fused CPU step unavailable, running eager steps: %s", build.error)
            return None
        logger.info("fused CPU step ready in %.1fs (compiled on first use, then loaded from the cache)",
                    build.seconds)
        return FusedStep(build.module, self.model)

    def _weight_format_name(self) -> str:
        fmt = self.config.weight_format
        return f"int4-g{self.config.int4_group_size}" if fmt == "int4" else fmt

    def _num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        per_block = KVCache.bytes_per_block(self.model_config, self.config.block_size, self.dtype)
        return max(1, int(self.config.kv_cache_memory_gib * 2**30 // per_block))

    # ---- requests -------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, fork_of: str | None = None) -> str:
        """Validate and queue a request. Raises InvalidRequestError naming the bad field; nothing is queued then.

        `fork_of` names an earlier request with the same prompt (a sibling of an n > 1 request): once that one has
        computed the prompt, this one shares its KV blocks instead of recomputing them.
        """
        params = params or SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError("sampling_params", f"expected SamplingParams, got {type(params).__name__}")
        vocab = self.model_config.vocab_size
        if any(t >= vocab for t in params.stop_token_ids):
            raise InvalidRequestError("stop_token_ids", f"token ids must be < the vocabulary size {vocab}")
        prompt_text, prompt_ids = self._tokenize(prompt)
        if len(prompt_ids) + 1 > self.max_model_len:
            raise InvalidRequestError(
                "prompt", f"prompt has {len(prompt_ids)} tokens; the context allows at most "
                f"{self.max_model_len - 1} so that one token can be generated")
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self._states:
            raise InvalidRequestError("request_id", f"request id {request_id!r} is already in use")
        request = Request(request_id, prompt_ids, params, self.eos_token_ids, fork_of=fork_of)
        self._states[request_id] = RequestState(request, prompt_text, self.tokenizer, self.max_model_len)
        self.scheduler.add_request(request)
        return request_id

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
        state = self._states.pop(request_id, None)
        if state is None:
            return None
        self.scheduler.finish(request_id, RequestStatus.FINISHED_ABORTED)
        return state.take_output(RequestStatus.FINISHED_ABORTED.value)

    def reset_prefix_cache(self) -> bool:
        """Drop all cached KV blocks (e.g. between benchmark runs); False while requests hold blocks."""
        return self.scheduler.kv_cache.pool.reset_cache()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished

    # ---- the loop ---------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Run one scheduler step; return an output for every request that got a token or finished."""
        plan = self.scheduler.schedule()
        if plan.is_empty:
            return []
        sampled = self.runner.execute(plan)
        self.scheduler.update_computed(plan)
        self._steps += 1
        outputs = []
        for token in sampled:
            state = self._states[token.request_id]
            state.output.num_cached_tokens = state.request.num_cached_tokens
            status = state.append_token(token.token_id, token.logprobs)
            self._generation_tokens += 1
            if state.request.num_output_tokens == 1:  # counted once its prefill completes, as vLLM does
                self._prompt_tokens += state.request.num_prompt_tokens
            if status is not None:
                self.scheduler.finish(token.request_id, status)
                del self._states[token.request_id]
            outputs.append(state.take_output(status.value if status is not None else None))
        return outputs

    def stats(self) -> EngineStats:
        kv = self.scheduler.kv_cache
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=kv.usage,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.pool.num_blocks,
            num_preemptions=self.scheduler.num_preemptions,
            prefix_cache=dataclasses.replace(kv.stats),
            prompt_tokens=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            steps=self._steps,
        )
