"""The all-reduce of tensor-parallel ranks on one machine through memory they all map (kernels/shm_all_reduce.cpp):
each rank writes its partial sum to its own slot, raises a flag and, once every flag is up, adds the slots in rank
order. Every rank gets the same bits, as with gloo, without gloo's trip through the loopback TCP stack per call.

Setting it up is collective: rank 0 creates a zeroed file under /dev/shm, every rank maps it, and the file is
unlinked once all have (the mapping outlives the name, so nothing is left behind by a crash after that).
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from types import ModuleType

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
# The mapping's size at most: containers often give /dev/shm 64 MiB. Larger sums (long prefill chunks, where one
# call's latency matters little) go over the process group.
MAX_BYTES = 32 << 20


class SharedMemoryAllReduce:
    """Sums a contiguous fp32 or bf16 CPU tensor of at most `capacity` elements over the ranks; every rank calls it
    with tensors of the same size in the same order."""

    def __init__(self, kernels: ModuleType, shared: torch.Tensor, rank: int, world: int, capacity: int,
                 timeout_s: float) -> None:
        self._kernels, self._shared = kernels, shared
        self.rank, self.world, self.capacity, self.timeout_s = rank, world, capacity, timeout_s
        self._seq = 0

    def fits(self, x: torch.Tensor) -> bool:
        return (x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and x.numel() <= self.capacity)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._seq += 1
        return self._kernels.shm_all_reduce(self._shared, x.contiguous(), self.rank, self.world, self._seq,
                                            self.capacity, self.timeout_s)

    @classmethod
    def create(cls, kernels: ModuleType | None, rank: int, world: int, capacity: int,
               timeout_s: float) -> SharedMemoryAllReduce | None:
        """Collective over the default process group: the mapping on every rank, or None on every rank when any of
        them cannot have it (no kernels, no /dev/shm, no room there, a failed mapping). `capacity` is lowered to what
        fits MAX_BYTES."""
        if kernels is not None:  # the mapping's bytes are header + capacity · per element
            header = kernels.shm_all_reduce_bytes(world, 0)
            per_element = kernels.shm_all_reduce_bytes(world, 1) - header
            capacity = min(capacity, (MAX_BYTES - header) // per_element)
        size = 0 if kernels is None else kernels.shm_all_reduce_bytes(world, capacity)
        box: list[str | None] = [None]
        if rank == 0 and kernels is not None and SHM_DIR.is_dir():
            path = SHM_DIR / f"tokenmill-tp-{os.getpid()}-{uuid.uuid4().hex}"
            try:
                with open(path, "wb") as f:
                    # The pages reserved now (zero-filled: every flag starts at 0), so a full /dev/shm fails here
                    # rather than with SIGBUS at the first write.
                    os.posix_fallocate(f.fileno(), 0, size)
                box[0] = str(path)
            except OSError as exc:
                path.unlink(missing_ok=True)
                logger.warning("no shared memory for the all-reduce: %s", exc)
        dist.broadcast_object_list(box, src=0)
        shared = None
        if box[0] is not None and kernels is not None:
            try:
                shared = torch.from_file(box[0], shared=True, size=size, dtype=torch.uint8)
            except RuntimeError as exc:
                logger.warning("tensor parallel rank %d cannot map %s: %s", rank, box[0], exc)
        mapped = torch.tensor([int(shared is not None)])
        dist.all_reduce(mapped, op=dist.ReduceOp.MIN)  # also: every rank has tried, so the name can go
        if rank == 0 and box[0] is not None:
            Path(box[0]).unlink(missing_ok=True)
        if not mapped.item() or shared is None or kernels is None:
            logger.info("tensor parallel rank %d: all-reduce over the process group", rank)
            return None
        return cls(kernels, shared, rank, world, capacity, timeout_s)
