"""The memory check before a model loads (tokenmill/model/memory.py): what is available, what a format will hold,
and the refusal, on tiny random models."""

from __future__ import annotations

import platform

import pytest
import torch
from conftest import tiny_llm, write_tiny_gguf

from tokenmill.model import memory
from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_blocks import Q4_TYPES, Q8_TYPES
from tokenmill.model.gguf_file import GGUFFile, ModelLoadError
from tokenmill.model.loader import load_model

MIB = 2**20


def write_meminfo(root, available_kib: int) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "meminfo").write_text(f"MemTotal:       32000000 kB\nMemFree:         1000 kB\n"
                                  f"MemAvailable:   {available_kib} kB\nBuffers:        0 kB\n")


def test_available_memory_is_the_smaller_of_meminfo_and_the_cgroup_room(tmp_path) -> None:
    proc, v2, v1, none = tmp_path / "proc", tmp_path / "v2", tmp_path / "v1", tmp_path / "none"
    write_meminfo(proc, 8 * 1024 * 1024)  # 8 GiB
    v2.mkdir()
    (v2 / "memory.max").write_text("4294967296\n")  # a 4 GiB container with 1 GiB used
    (v2 / "memory.current").write_text(f"{2**30}\n")
    assert memory.available_bytes(proc, v2) == 3 * 2**30
    (v2 / "memory.max").write_text("max\n")  # no limit: meminfo alone
    assert memory.available_bytes(proc, v2) == 8 * 2**30
    (v1 / "memory").mkdir(parents=True)
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{2**63 - 4096}\n")  # v1's "unlimited"
    (v1 / "memory" / "memory.usage_in_bytes").write_text("1\n")
    assert memory.available_bytes(proc, v1) == 8 * 2**30
    (v1 / "memory" / "memory.limit_in_bytes").write_text(f"{20 * 2**30}\n")
    (v1 / "memory" / "memory.usage_in_bytes").write_text(f"{18 * 2**30}\n")
    assert memory.available_bytes(proc, v1) == 2 * 2**30
    assert memory.available_bytes(none, none) is None  # neither readable: no check


def test_the_cgroup_is_the_one_proc_self_cgroup_names(tmp_path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    write_meminfo(proc, 8 * 1024 * 1024)
    (proc / "self").mkdir()
    (proc / "self" / "cgroup").write_text("0::/system.slice/tokenmill.service\n")
    service = root / "system.slice" / "tokenmill.service"
    service.mkdir(parents=True)
    (service / "memory.max").write_text(f"{2 * 2**30}\n")
    (service / "memory.current").write_text(f"{2**29}\n")
    assert memory.available_bytes(proc, root) == 3 * 2**29  # the service's 2 GiB less its 0.5 GiB
    (proc / "self" / "cgroup").write_text("12:cpu,cpuacct:/x\n11:memory:/docker/abc\n")  # v1 hierarchy
    v1 = root / "memory" / "docker" / "abc"
    v1.mkdir(parents=True)
    (v1 / "memory.limit_in_bytes").write_text(f"{2**30}\n")
    (v1 / "memory.usage_in_bytes").write_text(f"{2**28}\n")
    assert memory.available_bytes(proc, root) == 3 * 2**28


def held_bytes(model: torch.nn.Module) -> tuple[int, int]:
    """Bytes of every distinct tensor storage the model's modules hold (parameters, buffers, packed weights), and
    of those the norms' and RoPE tables' (which the estimate leaves out)."""
    seen: dict[int, tuple[int, bool]] = {}
    for module in model.modules():
        values = {**module._parameters, **module._buffers, **vars(module)}
        for name, value in values.items():
            if isinstance(value, torch.Tensor) and value.numel():
                storage = value.untyped_storage()
                seen[storage.data_ptr()] = (storage.nbytes(), "norm" in name or "rope" in name)
    return sum(n for n, _ in seen.values()), sum(n for n, small in seen.values() if small)


@pytest.mark.parametrize(("weight_format", "dtype", "tensor_type", "tied"), [
    ("float", torch.float32, "Q8_0", True), ("float", torch.bfloat16, "Q4_0", False),
    ("gguf", torch.bfloat16, "Q4_1", True), ("gguf", torch.bfloat16, "Q4_K", False),
    ("gguf", torch.bfloat16, "Q5_0", True), ("gguf", torch.bfloat16, "Q6_K", True),
    ("int8", torch.bfloat16, "F16", True), ("int4", torch.bfloat16, "Q8_0", True), ("q4", torch.bfloat16, "F32", True),
])
def test_the_estimate_is_what_the_loaded_layers_hold(tmp_path, weight_format, dtype, tensor_type, tied) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", hidden=256, heads=4, kv_heads=2, ff=512, vocab=512,
                           tensor_type=tensor_type, tied=tied)
    gguf_file = GGUFFile(path)
    cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
    need = memory.estimate(gguf_file, cfg, weight_format, dtype, kv_cache_bytes=0)
    model = load_model(gguf_file, dtype, torch.device("cpu"), weight_format)
    held, small = held_bytes(model)
    # Left out: the tiles' padding to whole tiles of 16 rows, per-row scales' rounding.
    assert 0.97 * (held - small) <= need.weights <= held - small, (need.weights, held, small)
    largest = max(rows * cols for name in gguf_file.tensor_names()
                  if len(shape := gguf_file.raw_tensor(name)[2]) == 2 for rows, cols in [shape])
    assert need.load_temporary >= 4 * largest


def test_every_type_with_tiles_has_its_size() -> None:
    assert set(memory._TILE_BYTES) == Q4_TYPES | Q8_TYPES | {"Q6_K"}


def test_formats_are_ordered_by_what_they_hold(tmp_path) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", hidden=256, heads=4, kv_heads=2, ff=512, vocab=512,
                           tensor_type="Q4_0")
    gguf_file = GGUFFile(path)
    cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
    sizes = {(fmt, dtype): memory.estimate(gguf_file, cfg, fmt, dtype, 0).weights
             for fmt, dtype in [("float", torch.float32), ("float", torch.bfloat16), ("int8", torch.bfloat16),
                                ("gguf", torch.bfloat16)]}
    assert sizes[("float", torch.float32)] == 2 * sizes[("float", torch.bfloat16)]
    assert sizes[("float", torch.bfloat16)] > sizes[("int8", torch.bfloat16)] > sizes[("gguf", torch.bfloat16)]
    # A prepacked bf16 float head also keeps the embedding's plain rows.
    packed = memory.estimate(gguf_file, cfg, "float", torch.bfloat16, 0, prepack=True).weights
    assert packed - sizes[("float", torch.bfloat16)] == 512 * 256 * 2


def test_a_model_that_does_not_fit_is_refused_before_its_weights_load(tmp_path, monkeypatch) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf", hidden=256, heads=4, kv_heads=2, ff=512, vocab=512,
                           tensor_type="Q4_0")
    monkeypatch.setattr(memory, "available_bytes", lambda: 6 * MIB)  # fits the gguf blocks, not fp32 floats

    def no_load(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr("tokenmill.engine.load_model", no_load)
    with pytest.raises(memory.InsufficientMemoryError) as refused:
        tiny_llm(path, num_kv_blocks=16)
    message = str(refused.value)
    assert "m.gguf as float weights in float32 needs about" in message and "and 6.0 MiB of memory" in message
    assert "weight formats that would fit: gguf about" in message and "--weight-format" in message
    assert isinstance(refused.value, ModelLoadError)  # the CLI and the server report it as a bad model file
    # The KV cache counts too: a gguf model with a KV cache past the room is refused as well.
    with pytest.raises(memory.InsufficientMemoryError, match="KV cache"):
        tiny_llm(path, dtype="bfloat16", weight_format="gguf", num_kv_blocks=4096)
    monkeypatch.setenv(memory.ENV_SWITCH, "0")  # the switch: loads anyway (here, into the stub)
    with pytest.raises(AssertionError, match="the weights were loaded"):
        tiny_llm(path, num_kv_blocks=16)


def test_nothing_is_refused_where_the_memory_cannot_be_read(tmp_path, monkeypatch) -> None:
    path = write_tiny_gguf(tmp_path / "m.gguf")
    monkeypatch.setattr(memory, "available_bytes", lambda: None)
    assert tiny_llm(path).generate([1, 2, 3])[0].token_ids


def test_a_draft_model_counts_after_the_target() -> None:
    target = memory.MemoryEstimate(weights=100, load_temporary=40, kv_cache=10)
    small_draft = memory.MemoryEstimate(weights=20, load_temporary=10, kv_cache=5)
    # The draft loads once the target holds its weights: the peak is 100 + 40 (the target's load) here ...
    assert memory.with_draft(target, small_draft) == memory.MemoryEstimate(120, 20, 15)
    # ... and 100 + 20 + 30 (the draft's load on top) there.
    big_draft = memory.MemoryEstimate(weights=20, load_temporary=30, kv_cache=5)
    assert memory.with_draft(target, big_draft).total == 100 + 20 + 30 + 15


def test_a_draft_model_that_does_not_fit_beside_the_target_is_refused(tmp_path, monkeypatch) -> None:
    from tokenmill.kv.cache import KVCache

    target = write_tiny_gguf(tmp_path / "target.gguf", hidden=256, heads=4, kv_heads=2, ff=512, vocab=512)
    draft = write_tiny_gguf(tmp_path / "draft.gguf", hidden=256, heads=4, kv_heads=2, ff=512, vocab=512, layers=1)
    gguf_file = GGUFFile(target)
    cfg = ModelConfig.from_gguf_metadata(gguf_file.metadata, gguf_file.tensor_names())
    alone = memory.estimate(gguf_file, cfg, "float", torch.float32, 16 * KVCache.bytes_per_block(cfg, 16,
                                                                                                   torch.float32))
    monkeypatch.setattr(memory, "available_bytes", lambda: alone.total + MIB // 4)
    monkeypatch.setattr("tokenmill.engine.load_model", lambda *a, **k: (_ for _ in ()).throw(AssertionError("load")))
    with pytest.raises(AssertionError, match="load"):  # alone it fits: the load goes on (into the stub)
        tiny_llm(target, num_kv_blocks=16)
    with pytest.raises(memory.InsufficientMemoryError, match="with its draft model draft.gguf"):
        tiny_llm(target, num_kv_blocks=16, speculative="draft", speculative_model=str(draft))
    # Self-speculation on the target's own tensors holds nothing more; in a format of its own, a second copy.
    with pytest.raises(AssertionError, match="load"):
        tiny_llm(target, num_kv_blocks=16, speculative="self")
    with pytest.raises(memory.InsufficientMemoryError, match="self-speculative draft of its weights as int8"):
        tiny_llm(target, num_kv_blocks=16, speculative="self", speculative_weight_format="int8")


def test_freed_heap_is_handed_back_once_the_engine_is_loaded(tmp_path, monkeypatch) -> None:
    status = tmp_path / "self" / "status"
    status.parent.mkdir()
    status.write_text("Name: python\nRssAnon:\t  300000 kB\nRssFile:\t 1000 kB\n")
    calls = []

    def fake_trim(pad: int) -> int:  # what glibc's malloc_trim does to the process: fewer resident pages
        calls.append(pad)
        status.write_text("Name: python\nRssAnon:\t  200000 kB\nRssFile:\t 1000 kB\n")
        return 1

    monkeypatch.setattr(memory, "_malloc_trim", lambda: fake_trim)
    assert memory.release_freed_memory(tmp_path) == 100000 * 1024 and calls == [0]
    monkeypatch.setenv(memory.TRIM_SWITCH, "0")
    assert memory.release_freed_memory(tmp_path) is None and calls == [0]  # off: not called
    monkeypatch.delenv(memory.TRIM_SWITCH)
    monkeypatch.setattr(memory, "_malloc_trim", lambda: None)  # no glibc
    assert memory.release_freed_memory(tmp_path) is None

    engine_calls = []
    monkeypatch.setattr(memory, "release_freed_memory", lambda: engine_calls.append(1) or 0)
    tiny_llm(write_tiny_gguf(tmp_path / "m.gguf"))
    assert engine_calls == [1]


def test_malloc_trim_is_found_where_the_c_library_is_glibc() -> None:
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("malloc_trim is glibc's")
    assert memory._malloc_trim() is not None
    released = memory.release_freed_memory()
    assert released is not None and released >= 0
