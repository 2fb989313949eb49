"""KV cache memory on transparent huge pages (2 MiB) where Linux offers them on request (`madvise` mode).

Why: decode attention reads each sequence's cache blocks where they lie, 2 KiB per block and KV head, so one step
touches tens of thousands of distinct 4 KiB pages per layer, far more than the TLB covers, and most block reads began
with a page walk. With 2 MiB pages a few hundred TLB entries cover the cache. PyTorch's own switch
(THP_MEM_ALLOC_ENABLE) must be set before its first allocation and covers every tensor; this covers just the cache.

The memory is a fresh anonymous mapping advised before its first write: huge pages are only handed out at first touch
(memory a tensor allocator reuses from its heap was touched already). It is written once at creation, so that the
page faults (and any compaction the kernel does to find free 2 MiB pages) happen at start-up, not in the first steps.
"""

from __future__ import annotations

import contextlib
import math
import mmap
import sys

import torch

HUGE_PAGE = 2 << 20


def available() -> bool:
    return sys.platform.startswith("linux") and hasattr(mmap, "MADV_HUGEPAGE")


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, huge_pages: bool) -> torch.Tensor:
    """torch.zeros, on huge pages when asked for, on CPU, and the platform has them."""
    if not huge_pages or device.type != "cpu" or not available():
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    # Private: a shared anonymous mapping would be shmem, which anonymous THP does not cover. One huge page spare, to
    # start the tensor on a 2 MiB boundary.
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # THP switched off ("never"): ordinary pages, still zeroed
        region.madvise(mmap.MADV_HUGEPAGE)
    raw = torch.frombuffer(region, dtype=torch.uint8)  # keeps `region` alive as long as any view of it
    start = -raw.data_ptr() % HUGE_PAGE
    return raw[start:start + nbytes].view(dtype).view(shape).zero_()
