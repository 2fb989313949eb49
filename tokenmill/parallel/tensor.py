"""Tensor parallelism (Megatron-LM's split): each of `world` processes holds 1/world of every layer's attention
heads and MLP columns, and two all-reduces per layer (after the attention output and after the MLP's down
projection) give every process the whole hidden state again.

Rank 0 is the engine: it schedules, samples and answers. The other ranks are workers, each an engine of its own
that only runs the plans rank 0 sends it, so that every process makes the same collective calls in the same
order. What crosses is the plan itself (plain, picklable data) and the all-reduced activations; the KV cache of
each process holds its own heads, in the blocks rank 0's scheduler hands out. Collectives run over
torch.distributed: gloo on CPU, NCCL on CUDA; on CPU the layers' all-reduces go through a shared memory mapping
instead (parallel/shm.py), since gloo's loopback TCP costs about a millisecond per call whatever its size. The fused
CPU step calls the same all-reduce from its C++ layer loop (kernels/cpu_step.cpp, `FusedStep`'s `all_reduce`).

Limits: float weights only (the linear layers are sliced by rows and columns), and no speculative decoding (a
drafter's timing and draft steps would run on rank 0 alone).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import multiprocessing
import weakref
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from tokenmill.model.config import ModelConfig
from tokenmill.model.linear import FloatLinear
from tokenmill.parallel.shm import SharedMemoryAllReduce
from tokenmill.ports import free_port

if TYPE_CHECKING:
    from tokenmill.config import EngineConfig
    from tokenmill.model.llama import LlamaModel
    from tokenmill.runner.model_runner import ModelRunner
    from tokenmill.scheduler.plan import StepPlan

logger = logging.getLogger(__name__)

# A rank that stops answering (it died) fails the collective after this long instead of hanging forever.
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=120)


@dataclass(frozen=True)
class TensorParallelContext:
    rank: int
    world: int
    init_method: str  # where the processes meet: tcp://127.0.0.1:PORT


class TensorParallelGroup:
    """This process's place in the group: the all-reduce the layers call, and the plan channel from rank 0."""

    def __init__(self, context: TensorParallelContext, device: torch.device, kernels: ModuleType | None = None,
                 shm_capacity: int = 0) -> None:
        """`kernels` and `shm_capacity` > 0 (CPU): all-reduces of up to that many elements go through a shared memory
        mapping (parallel/shm.py), larger ones over gloo."""
        self.rank, self.world = context.rank, context.world
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=context.init_method, rank=context.rank,
                                world_size=context.world, timeout=COLLECTIVE_TIMEOUT)
        # gloo sums float32 natively; other dtypes are summed in float32 and rounded back once.
        self._widen = backend == "gloo"
        self.shm: SharedMemoryAllReduce | None = None
        if backend == "gloo" and shm_capacity > 0:
            self.shm = SharedMemoryAllReduce.create(kernels, self.rank, self.world, shm_capacity,
                                                    COLLECTIVE_TIMEOUT.total_seconds())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.shm is not None and self.shm.fits(x):  # the same choice on every rank: same sizes, same order
            return self.shm(x)
        if self._widen and x.dtype != torch.float32:
            wide = x.float()
            dist.all_reduce(wide)
            return wide.to(x.dtype)
        dist.all_reduce(x)
        return x

    def broadcast_plan(self, plan: StepPlan | None) -> StepPlan | None:
        """Rank 0 sends `plan` (None: stop); every other rank receives it."""
        box: list[Any] = [plan]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def check_shardable(cfg: ModelConfig, world: int) -> None:
    for name in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(cfg, name)
        if value % world:
            raise ValueError(f"tensor_parallel_size={world} does not divide the model's {name} ({value})")


def shard_model(model: LlamaModel, cfg: ModelConfig, rank: int, world: int, all_reduce: Any) -> ModelConfig:
    """Keep this rank's heads and MLP columns of every layer (in place) and have each layer all-reduce its two
    partial sums; returns the model config of one rank (its head counts), which sizes its KV cache."""
    check_shardable(cfg, world)
    q, kv, ff = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.intermediate_size
    lq, lkv, lff = q // world, kv // world, ff // world
    local = dataclasses.replace(cfg, num_heads=cfg.num_heads // world, num_kv_heads=cfg.num_kv_heads // world)
    for layer in model.layers:
        for linear in (layer.qkv, layer.o, layer.gate_up, layer.down):
            if not isinstance(linear, FloatLinear) or linear.packed is not None:
                raise ValueError("tensor parallelism needs float weights that are not prepacked")
        # Column-parallel: q, k and v rows of this rank's heads; gate and up rows of its MLP columns.
        spans = [(rank * lq, lq), (q + rank * lkv, lkv), (q + kv + rank * lkv, lkv)]
        layer.qkv = _sliced_rows(layer.qkv, spans)
        layer.gate_up = _sliced_rows(layer.gate_up, [(rank * lff, lff), (ff + rank * lff, lff)])
        # Row-parallel: the input columns that match, a bias (if any) added once, on rank 0.
        layer.o = _sliced_columns(layer.o, rank * lq, lq, keep_bias=rank == 0)
        layer.down = _sliced_columns(layer.down, rank * lff, lff, keep_bias=rank == 0)
        layer.cfg = local
        layer.q_size, layer.kv_size = lq, lkv
        layer.all_reduce = all_reduce
    return local


def _sliced_rows(linear: FloatLinear, spans: list[tuple[int, int]]) -> FloatLinear:
    weight = torch.cat([linear.weight[s:s + n] for s, n in spans]).contiguous()
    bias = None if linear.bias is None else torch.cat([linear.bias[s:s + n] for s, n in spans]).contiguous()
    return FloatLinear(weight, bias)


def _sliced_columns(linear: FloatLinear, start: int, count: int, keep_bias: bool) -> FloatLinear:
    return FloatLinear(linear.weight[:, start:start + count].contiguous(), linear.bias if keep_bias else None)


class TensorParallelRunner:
    """Rank 0's runner: sends each plan to the workers, then runs its own share of the step."""

    def __init__(self, runner: ModelRunner, group: TensorParallelGroup, workers: list[Any]) -> None:
        self.runner = runner
        self.group = group
        self._finalizer = weakref.finalize(self, _stop, group, workers)

    def execute(self, plan: StepPlan, token_masks: Any = None) -> Any:
        self.group.broadcast_plan(plan)
        return self.runner.execute(plan, token_masks)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.runner, name)

    def close(self) -> None:
        self._finalizer()


def _stop(group: TensorParallelGroup, workers: list[Any]) -> None:
    try:
        group.broadcast_plan(None)
    except Exception:  # a worker already gone: nothing left to tell
        logger.warning("could not tell the tensor-parallel workers to stop", exc_info=True)
    for worker in workers:
        worker.join(timeout=10)
        if worker.is_alive():
            worker.terminate()
    group.close()


def start_workers(config: EngineConfig, engine_class: type) -> tuple[TensorParallelContext, list[Any]]:
    """Rank 0: spawn ranks 1..world-1, each building its own `engine_class` (the caller's, passed in so that this
    module does not import the engine that imports it) from `config`; returns rank 0's context."""
    world = config.tensor_parallel_size
    init_method = f"tcp://127.0.0.1:{free_port()}"
    spawn = multiprocessing.get_context("spawn")
    workers = []
    for rank in range(1, world):
        context = TensorParallelContext(rank, world, init_method)
        worker = spawn.Process(target=worker_main, args=(engine_class, config, context),
                               name=f"tokenmill-tp{rank}", daemon=True)
        worker.start()
        workers.append(worker)
    return TensorParallelContext(0, world, init_method), workers


def worker_main(engine_class: type, config: EngineConfig, context: TensorParallelContext) -> None:
    """A worker rank: build the engine's shard, then run every plan rank 0 broadcasts until it sends None. A plan
    that fails here fails on rank 0 too (the same checks on the same data), which handles it."""
    engine = engine_class(config, parallel=context)
    group = engine.tensor_parallel
    assert group is not None
    while (plan := group.broadcast_plan(None)) is not None:
        try:
            engine.runner.forward(plan)  # the logits and samples are rank 0's alone
        except Exception:
            logger.exception("tensor-parallel rank %d: a step failed", context.rank)
    group.close()
