"""The shared-memory all-reduce kernel (kernels/shm_all_reduce.cpp): ranks played by threads of one process (the
kernel releases the GIL), each rank's result against the fp32 sum in rank order, rounded once; both slot sets and
growing sequence numbers; a rank that never arrives."""

from __future__ import annotations

import threading

import pytest
import torch
import torch.distributed as dist

from tokenmill.kernels import cpu_kernels
from tokenmill.parallel import shm
from tokenmill.ports import free_port


@pytest.fixture(scope="module")
def kernels():
    build = cpu_kernels()
    assert build.module is not None, build.error
    return build.module


def _run_ranks(kernels, shared, partials: list[list[torch.Tensor]], capacity: int) -> list[list[torch.Tensor]]:
    """partials[call][rank]: every rank all-reduces its tensor of each call in order, on its own thread."""
    world = len(partials[0])
    out: list[list[torch.Tensor | None]] = [[None] * world for _ in partials]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            for call, xs in enumerate(partials):
                out[call][rank] = kernels.shm_all_reduce(shared, xs[rank], rank, world, call + 1, capacity, 30.0)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return out  # type: ignore[return-value]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_rank_gets_the_rank_ordered_fp32_sum(kernels, world, dtype) -> None:
    capacity = 4096
    shared = torch.zeros(kernels.shm_all_reduce_bytes(world, capacity), dtype=torch.uint8)
    g = torch.Generator().manual_seed(world)
    sizes = [576, 1, 4096, 7 * 576, 33, 2048]  # six calls: each slot set three times, sizes up and down
    partials = [[(torch.randn(n, generator=g) * 10).to(dtype) for _ in range(world)] for n in sizes]
    out = _run_ranks(kernels, shared, partials, capacity)
    for xs, results in zip(partials, out, strict=True):
        want = xs[0].float()
        for x in xs[1:]:
            want = want + x.float()
        want = want.to(dtype)
        for got in results:
            assert got.dtype == dtype and torch.equal(got, want)


def test_a_rank_that_never_arrives_raises_after_the_timeout(kernels) -> None:
    shared = torch.zeros(kernels.shm_all_reduce_bytes(2, 16), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="rank 1 did not arrive"):
        kernels.shm_all_reduce(shared, torch.ones(16), 0, 2, 1, 16, 0.2)


def test_it_refuses_what_does_not_fit(kernels) -> None:
    shared = torch.zeros(kernels.shm_all_reduce_bytes(2, 16), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match="at most capacity"):
        kernels.shm_all_reduce(shared, torch.ones(17), 0, 2, 1, 16, 1.0)
    with pytest.raises(RuntimeError, match="smaller than"):
        kernels.shm_all_reduce(shared, torch.ones(16), 0, 2, 1, 32, 1.0)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        kernels.shm_all_reduce(shared, torch.ones(16, dtype=torch.float64), 0, 2, 1, 16, 1.0)


def test_setup_caps_the_mapping_and_leaves_no_file(kernels) -> None:
    """One rank: the collective setup maps a file under /dev/shm, unlinks it, and lowers a capacity whose mapping
    would pass MAX_BYTES; a call returns the rank's own tensor."""
    if not shm.SHM_DIR.is_dir():
        pytest.skip("no /dev/shm")
    before = set(shm.SHM_DIR.iterdir())
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        reduce = shm.SharedMemoryAllReduce.create(kernels, 0, 1, 1 << 30, 5.0)
    finally:
        dist.destroy_process_group()
    assert reduce is not None and set(shm.SHM_DIR.iterdir()) == before
    assert kernels.shm_all_reduce_bytes(1, reduce.capacity) <= shm.MAX_BYTES < kernels.shm_all_reduce_bytes(
        1, 2 * reduce.capacity)
    x = torch.randn(3, 100)
    assert reduce.fits(x) and torch.equal(reduce(x), x) and torch.equal(reduce(x.bfloat16()), x.bfloat16())
