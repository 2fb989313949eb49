"""The KV cache on transparent huge pages (tokenmill/model/huge_pages.py): zeroed like torch.zeros, and backed by
2 MiB pages where the kernel offers them on request."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from tokenmill.kv import huge_pages
from tokenmill.kv.cache import KVCache
from tokenmill.model.config import ModelConfig

THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of Linux's THP switch ("always", "madvise", "never"), None off Linux."""
    if not sys.platform.startswith("linux") or not THP_SETTING.exists():
        return None
    text = THP_SETTING.read_text()
    return text[text.index("[") + 1:text.index("]")]


def huge_kib_at(address: int) -> int:
    """AnonHugePages (KiB) of the mapping holding `address`, from /proc/self/smaps."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            low, high = (int(part, 16) for part in head.split("-"))
            inside = low <= address < high
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def test_zeros_are_zero_with_and_without_huge_pages() -> None:
    for huge in (True, False):
        t = huge_pages.zeros((3, 1000, 64), torch.bfloat16, torch.device("cpu"), huge)
        assert t.shape == (3, 1000, 64) and t.dtype == torch.bfloat16
        assert not t.any()


@pytest.mark.skipif(thp_mode() not in ("always", "madvise"), reason="Linux transparent huge pages are off here")
def test_kv_cache_is_backed_by_huge_pages_when_asked() -> None:
    cfg = ModelConfig(architecture="llama", num_layers=4, hidden_size=128, intermediate_size=256, num_heads=2,
                      num_kv_heads=2, head_dim=64, vocab_size=64, max_position=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True)
    huge = KVCache(cfg, num_blocks=1024, block_size=16, dtype=torch.bfloat16, device=torch.device("cpu"),
                   huge_pages=True)  # 16 MiB per tensor
    assert not huge.k.any() and not huge.v.any()
    huge.k.fill_(1.0)  # pages are only handed out at the first write
    huge.v.fill_(1.0)
    assert huge_kib_at(huge.k.data_ptr() + huge.k.nbytes // 2) >= 2048
    assert huge_kib_at(huge.v.data_ptr() + huge.v.nbytes // 2) >= 2048


def test_kv_cache_takes_ordinary_memory_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    # Whether ordinary memory ends up on huge pages is the allocator's and kernel's business (a glibc tunable, THP
    # "always", khugepaged), so the test checks that the cache does not map or advise memory itself when not asked.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the huge-page mapping was used without being asked for")

    monkeypatch.setattr(huge_pages.mmap, "mmap", refuse)
    cfg = ModelConfig(architecture="llama", num_layers=2, hidden_size=128, intermediate_size=256, num_heads=2,
                      num_kv_heads=2, head_dim=64, vocab_size=64, max_position=4096, rope_theta=10000.0,
                      rms_norm_eps=1e-5, attention_bias=False, tie_word_embeddings=True)
    plain = KVCache(cfg, num_blocks=64, block_size=16, dtype=torch.bfloat16, device=torch.device("cpu"))
    assert plain.k.shape == plain.v.shape and not plain.k.any()
    if huge_pages.available():  # and the spy does see the mapping when it is asked for
        with pytest.raises(AssertionError, match="without being asked"):
            KVCache(cfg, num_blocks=64, block_size=16, dtype=torch.bfloat16, device=torch.device("cpu"),
                    huge_pages=True)


def test_huge_page_tensors_are_ordinary_writable_tensors() -> None:
    t = huge_pages.zeros((4, 300, 64), torch.float32, torch.device("cpu"), True)
    assert t.is_contiguous() and t.data_ptr() % 64 == 0
    t[1, 2] = torch.arange(64.0)
    assert t.sum().item() == sum(range(64)) and t[1, 2, 5].item() == 5
