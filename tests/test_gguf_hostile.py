"""Hostile GGUF files: every damaged or lying file fails fast with ModelLoadError, never a hang, a raw Python
exception or a huge allocation. Files are written byte by byte (`gguf_bytes`) or as a valid tiny model
(`write_tiny_gguf`) that is then patched or made to disagree with its own metadata."""

from __future__ import annotations

import contextlib
import importlib.util
import signal
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import load_fuzz_script, write_tiny_gguf
from tokenmill.model import gguf_check
from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_check import check_gguf_header
from tokenmill.model.gguf_file import GGUFFile, ModelLoadError
from tokenmill.model.llama import DEFAULT_ROPE_ELEMENTS
from tokenmill.model.loader import load_model

REPO = Path(__file__).resolve().parent.parent
CRASHES = Path(__file__).parent / "fixtures" / "gguf_crashes"
CPU = torch.device("cpu")

# GGUF value types and tensor types used below (the GGUF spec's numbering).
UINT8, UINT32, STRING, ARRAY, UINT64 = 0, 4, 8, 9, 10
F32, Q8_0 = 0, 8


class DeadlineExceeded(BaseException):
    """Not an Exception: the code under test catches Exception, and a hang must not turn into a passing error."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: Any) -> None:
        raise DeadlineExceeded(f"still running after {seconds}s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---- raw GGUF bytes ---------------------------------------------------------------------------------------------


def gstr(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + struct.pack("<I", vtype) + payload


def tensor_info(name: str | bytes, dims: tuple[int, ...], type_id: int = F32, offset: int = 0,
                n_dims: int | None = None) -> bytes:
    n = len(dims) if n_dims is None else n_dims
    return gstr(name) + struct.pack(f"<I{len(dims)}QIQ", n, *dims, type_id, offset)


def gguf_bytes(kvs: tuple[bytes, ...] = (), tensors: tuple[bytes, ...] = (), data: bytes = b"", version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors) if n_tensors is None else n_tensors,
                                 len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32) + data


def write(tmp_path: Path, data: bytes, name: str = "hostile.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def patch_after(data: bytes, marker: bytes, skip: int, fmt: str, value: int) -> bytes:
    """`data` with `value` packed as `fmt` at `skip` bytes past the first occurrence of `marker`."""
    out = bytearray(data)
    struct.pack_into(fmt, out, out.index(marker) + len(marker) + skip, value)
    return bytes(out)


def tiny_config(tmp_path: Path, **kwargs: Any) -> ModelConfig:
    f = GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf", **kwargs))
    return ModelConfig.from_gguf_metadata(f.metadata, f.tensor_names())


def tiny_model(tmp_path: Path, max_positions: int | None = None, **kwargs: Any) -> Any:
    return load_model(GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf", **kwargs)), torch.float32, CPU,
                      max_positions=max_positions)


# ---- finding 1: the header scan ----------------------------------------------------------------------------------


def test_huge_array_length_fails_fast_instead_of_hanging(tmp_path: Path) -> None:
    # The gguf reader loops on this forever (reads past EOF give empty arrays) while its memory grows.
    blob = kv("general.blob", ARRAY, struct.pack("<IQ", UINT8, 1 << 62) + bytes(16))
    path = write(tmp_path, gguf_bytes((blob,)))
    with deadline(5), pytest.raises(ModelLoadError, match=r"general.blob' declares 4611686018427387904 elements"):
        GGUFFile(path)


def test_huge_array_in_a_real_model_file_fails_fast(tmp_path: Path) -> None:
    data = write_tiny_gguf(tmp_path / "ok.gguf", metadata={"tokenizer.ggml.flags": [True] * 300}).read_bytes()
    path = write(tmp_path, patch_after(data, b"tokenizer.ggml.flags", 8, "<Q", (1 << 62) + 7))
    with deadline(5), pytest.raises(ModelLoadError, match="tokenizer.ggml.flags.*truncated or corrupt"):
        GGUFFile(path)


def test_array_element_budget(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(gguf_check, "MAX_ARRAY_ELEMENTS", 100)
    blob = kv("general.blob", ARRAY, struct.pack("<IQ", UINT8, 60) + bytes(60))
    names = kv("general.names", ARRAY, struct.pack("<IQ", STRING, 50) + gstr("x") * 50)
    with pytest.raises(ModelLoadError, match="general.names.: more than 100 array elements"):
        GGUFFile(write(tmp_path, gguf_bytes((blob, names))))


def _nested(depth: int) -> bytes:
    inner = struct.pack("<IQ", UINT8, 1) + b"\x01"
    for _ in range(depth - 1):
        inner = struct.pack("<IQ", ARRAY, 1) + inner
    return inner


ONE_TENSOR = tensor_info("w", (4,))
HEADER_CASES: dict[str, tuple[bytes, str]] = {
    "version 1": (gguf_bytes(version=1), "version 1 is not supported"),
    "big-endian": (b"GGUF" + struct.pack(">IQQ", 3, 0, 0), "big-endian"),
    "kv count": (gguf_bytes(n_kv=1 << 40), "metadata count 1099511627776 exceeds"),
    "tensor count": (gguf_bytes(n_tensors=1 << 40), "tensor count 1099511627776 exceeds"),
    "kv past EOF": (b"GGUF" + struct.pack("<IQQ", 3, 0, 3), "key of metadata entry 0 length needs 8 bytes"),
    "key length": (gguf_bytes((kv(b"k" * 70000, UINT8, b"\x00"),)), "is 70000 bytes long"),
    "huge key length": (gguf_bytes((struct.pack("<Q", 1 << 62),)), "is 4611686018427387904 bytes long"),
    "key not UTF-8": (gguf_bytes((kv(b"\xff\xfe", UINT8, b"\x00"),)), "not UTF-8"),
    "duplicate key": (gguf_bytes((kv("a", UINT8, b"\x00"), kv("a", UINT8, b"\x01"))), "duplicate metadata key 'a'"),
    "reserved key": (gguf_bytes((kv("GGUF.version", UINT8, b"\x00"),)), "duplicate metadata key 'GGUF.version'"),
    "value type": (gguf_bytes((kv("a", 13, b""),)), "unknown value type 13"),
    "huge string": (gguf_bytes((kv("a", STRING, struct.pack("<Q", 1 << 62) + b"abc"),)),
                    "metadata 'a' needs 4611686018427387904 bytes"),
    "item type": (gguf_bytes((kv("a", ARRAY, struct.pack("<IQ", 99, 1) + bytes(8)),)), "unknown item type 99"),
    "string count": (gguf_bytes((kv("a", ARRAY, struct.pack("<IQ", STRING, 1000) + gstr("x")),)),
                     "declares 1000 elements of at least 8 bytes"),
    "array count": (gguf_bytes((kv("a", ARRAY, struct.pack("<IQ", ARRAY, 1000) + _nested(1)),)),
                    "declares 1000 elements of at least 12 bytes"),
    "nesting": (gguf_bytes((kv("a", ARRAY, _nested(9)),)), "nested deeper than 8"),
    "alignment type": (gguf_bytes((kv("general.alignment", STRING, gstr("32")),)),
                       "general.alignment has value type 8"),
    "alignment value": (gguf_bytes((kv("general.alignment", UINT32, struct.pack("<I", 48)),)),
                        "alignment 48 is not a power of two"),
    "n_dims 5": (gguf_bytes(tensors=(tensor_info("w", (1, 1, 1, 1, 1)),)), "'w' has 5 dimensions"),
    "n_dims 0": (gguf_bytes(tensors=(tensor_info("w", ()),)), "'w' has 0 dimensions"),
    "empty dim": (gguf_bytes(tensors=(tensor_info("w", (4, 0)),), data=bytes(16)), "empty dimension"),
    "tensor type": (gguf_bytes(tensors=(tensor_info("w", (4,), type_id=200),)), "unknown type 200"),
    "dims product": (gguf_bytes(tensors=(tensor_info("w", (1 << 30, 1 << 30, 1 << 30)),)), "over 1099511627776"),
    "block size": (gguf_bytes(tensors=(tensor_info("w", (48, 2), type_id=Q8_0),), data=bytes(102)),
                   "rows of 48 elements, not a multiple of its type's block of 32"),
    "misaligned": (gguf_bytes(tensors=(tensor_info("w", (4,), offset=4),), data=bytes(64)),
                   "offset 4 is not a multiple of the alignment 32"),
    "offset past EOF": (gguf_bytes(tensors=(tensor_info("w", (4,), offset=1 << 40),), data=bytes(16)),
                        "extends past the end of the file"),
    "truncated data": (gguf_bytes(tensors=(ONE_TENSOR,), data=bytes(15)), "extends past the end"),
    "duplicate tensor": (gguf_bytes(tensors=(ONE_TENSOR, ONE_TENSOR), data=bytes(16)), "duplicate tensor name 'w'"),
    "tensor name not UTF-8": (gguf_bytes(tensors=(tensor_info(b"\xc3", (4,)),), data=bytes(16)), "not UTF-8"),
}


@pytest.mark.parametrize("case", list(HEADER_CASES))
def test_header_violations_are_model_load_errors(tmp_path: Path, case: str) -> None:
    data, message = HEADER_CASES[case]
    with deadline(5), pytest.raises(ModelLoadError, match=message) as info:
        GGUFFile(write(tmp_path, data))
    assert "hostile.gguf" in str(info.value)


def test_empty_file_is_rejected_by_the_scan(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="empty"):
        check_gguf_header(write(tmp_path, b""))


def test_valid_header_scan_agrees_with_the_reader(tmp_path: Path) -> None:
    path = write_tiny_gguf(tmp_path / "ok.gguf", tensor_type="Q8_0")
    header = check_gguf_header(path)
    f = GGUFFile(path)
    assert set(header.tensors) == set(f.tensor_names())
    q = header.tensors["blk.0.attn_q.weight"]
    assert q.dims == (64, 64) and q.nbytes == 64 * 64 // 32 * 34
    assert f.raw_tensor("blk.0.attn_q.weight")[0].nbytes == q.nbytes


def test_truncated_model_data(tmp_path: Path) -> None:
    data = write_tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    with pytest.raises(ModelLoadError, match="'blk.1.ffn_down.weight' data .* extends past the end"):
        GGUFFile(write(tmp_path, data[:-100]))


def test_model_tensor_offset_past_eof(tmp_path: Path) -> None:
    data = write_tiny_gguf(tmp_path / "ok.gguf").read_bytes()
    # 1-D tensor info after the name: u32 n_dims, u64 dim, u32 type, then the u64 offset.
    path = write(tmp_path, patch_after(data, b"output_norm.weight", 16, "<Q", 1 << 50))
    with pytest.raises(ModelLoadError, match="'output_norm.weight' data .* extends past the end of the file"):
        GGUFFile(path)


# ---- findings 2 and 5: hyper-parameters ----------------------------------------------------------------------------


def test_head_count_zero(tmp_path: Path) -> None:
    # Was a ZeroDivisionError (embedding_length // head_count).
    with pytest.raises(ModelLoadError, match=r"llama.attention.head_count' = 0 is out of range"):
        tiny_config(tmp_path, metadata={"attention.head_count": 0})


def test_kv_heads_not_dividing_heads(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="num_heads 4 is not a multiple of num_kv_heads 3"):
        tiny_config(tmp_path, metadata={"attention.head_count_kv": 3})


BAD_METADATA: dict[str, tuple[dict[str, Any], str]] = {
    "heads as text": ({"attention.head_count": "four"}, "head_count' = 'four' is not an integer"),
    "heads as list": ({"attention.head_count": [4, 4]}, "is not an integer"),
    "bool layers": ({"block_count": True}, "block_count' = True is not an integer"),
    "no layers": ({"block_count": 0}, "block_count' = 0 is out of range"),
    "a million layers": ({"block_count": 10**6}, "block_count' = 1000000 is out of range"),
    "kv heads 0": ({"attention.head_count_kv": 0}, "head_count_kv' = 0 is out of range"),
    "more kv heads than heads": ({"attention.head_count_kv": 8}, "head_count_kv' = 8 is out of range"),
    "negative ff": ({"feed_forward_length": -1}, "feed_forward_length' = -1 is out of range"),
    "hidden not a multiple of heads": ({"embedding_length": 62}, "62 is not a multiple of"),
    "odd head dim": ({"attention.key_length": 15}, "head dimension 15 is odd"),
    "value length": ({"attention.value_length": 32}, "value_length' = 32 differs"),
    "partial rotary": ({"rope.dimension_count": 8}, "rope.dimension_count' = 8 differs"),
    "context 0": ({"context_length": 0}, "context_length' = 0 is out of range"),
    "context 2^64-1": ({"context_length": 2**64 - 1}, "context_length' = 18446744073709551615 is out of range"),
    "eps 0": ({"attention.layer_norm_rms_epsilon": 0.0}, "must be finite and in"),
    "eps nan": ({"attention.layer_norm_rms_epsilon": float("nan")}, "must be finite and in"),
    "eps text": ({"attention.layer_norm_rms_epsilon": "tiny"}, "is not a number"),
    "theta inf": ({"rope.freq_base": float("inf")}, "freq_base' = inf must be finite"),
    "theta negative": ({"rope.freq_base": -1.0}, "freq_base' = -1.0 must be finite"),
    "vocab 0": ({"vocab_size": 0}, "vocab_size' = 0 is out of range"),
    "no vocabulary": ({"tokenizer.ggml.tokens": None}, "neither 'llama.vocab_size' nor"),
    "architecture not text": ({"general.architecture": 7}, "unsupported architecture 7"),
}


@pytest.mark.parametrize("case", list(BAD_METADATA))
def test_bad_hyper_parameters_are_model_load_errors(tmp_path: Path, case: str) -> None:
    metadata, message = BAD_METADATA[case]
    with pytest.raises(ModelLoadError, match=message):
        tiny_config(tmp_path, layers=1, metadata=metadata)


def test_config_constructor_rejects_zero_kv_heads() -> None:
    with pytest.raises(ModelLoadError, match="num_kv_heads must be a positive integer"):
        ModelConfig(architecture="llama", num_layers=1, hidden_size=64, intermediate_size=128, num_heads=4,
                    num_kv_heads=0, head_dim=16, vocab_size=10, max_position=64, rope_theta=1e4, rms_norm_eps=1e-5,
                    attention_bias=False, tie_word_embeddings=True)


# ---- finding 3: the RoPE tables do not grow with context_length ------------------------------------------------------


def test_huge_context_length_keeps_the_rope_table_capped(tmp_path: Path) -> None:
    # 2^40 positions x 16 would be 64 TiB of fp32 table; the context itself is only a bound and is accepted.
    with deadline(10):
        capped = tiny_model(tmp_path, max_positions=100, layers=1, context=2**40)
        default = tiny_model(tmp_path, layers=1, context=2**40)
    assert capped.cfg.max_position == 2**40
    assert capped.max_positions == 100 and capped.rope_cos.shape == (100, 16) and capped.rope_sin.shape == (100, 16)
    assert default.max_positions == DEFAULT_ROPE_ELEMENTS // 16 == default.rope_cos.shape[0]


def test_rope_table_is_never_longer_than_the_context(tmp_path: Path) -> None:
    model = tiny_model(tmp_path, max_positions=4096, layers=1, context=64)
    assert model.max_positions == 64 and model.rope_cos.shape[0] == 64


def test_max_positions_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_positions must be >= 1"):
        tiny_model(tmp_path, max_positions=0, layers=1)


# ---- finding 4: tensors against the config -------------------------------------------------------------------------


def test_vocab_larger_than_the_embedding_rows(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"'token_embd.weight' .* has shape \[256, 64\], expected \[300, 64\]"):
        tiny_model(tmp_path, shapes={"token_embd.weight": (256, 64)})


def test_tokenizer_larger_than_a_declared_vocabulary(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="has 300 tokens but the embedding table only 256 rows"):
        tiny_model(tmp_path, metadata={"vocab_size": 256}, shapes={"token_embd.weight": (256, 64)})


@pytest.mark.parametrize(("arch", "name", "shape", "want"), [
    ("llama", "blk.1.attn_k.weight", (16, 64), (32, 64)),  # the fused qkv width the C++ step assumes
    ("llama", "blk.0.attn_q.weight", (64, 48), (64, 64)),
    ("llama", "blk.0.attn_output.weight", (64, 32), (64, 64)),
    ("llama", "blk.0.ffn_down.weight", (128, 64), (64, 128)),
    ("llama", "blk.1.ffn_norm.weight", (63,), (64,)),
    ("llama", "output.weight", (300, 32), (300, 64)),
    ("qwen2", "blk.0.attn_v.bias", (16,), (32,)),
])
def test_tensor_shapes_must_match_the_metadata(tmp_path: Path, arch: str, name: str, shape: tuple[int, ...],
                                              want: tuple[int, ...]) -> None:
    with pytest.raises(ModelLoadError, match=rf"'{name}' .* has shape \{list(shape)}, expected \{list(want)}"):
        tiny_model(tmp_path, arch=arch, tied=name != "output.weight", shapes={name: shape})


@pytest.mark.parametrize("tensor_type", ["F32", "F16", "Q8_0", "Q4_0"])
def test_valid_tiny_models_load(tmp_path: Path, tensor_type: str) -> None:
    model = tiny_model(tmp_path, tensor_type=tensor_type, arch="qwen2", tied=False)
    assert model.cfg.vocab_size == 300 and model.cfg.attention_bias and model.max_positions == 256


# ---- finding 5: nothing but ModelLoadError escapes -----------------------------------------------------------------


def test_unexpected_errors_while_building_become_model_load_errors(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    f = GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf", layers=1))

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise IndexError("index 7 is out of bounds")

    monkeypatch.setattr(GGUFFile, "tensor", broken)
    with pytest.raises(ModelLoadError, match="cannot build the model from .*tiny.gguf: IndexError"):
        load_model(f, torch.float32, CPU)


def test_dequantization_errors_become_model_load_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import tokenmill.model.gguf_file as gguf_file

    f = GGUFFile(write_tiny_gguf(tmp_path / "tiny.gguf", layers=1))

    def broken(t: Any) -> Any:
        raise ValueError("cannot reshape")

    monkeypatch.setattr(gguf_file, "_dequantize", broken)
    with pytest.raises(ModelLoadError, match="cannot read tensor 'output_norm.weight'.*ValueError: cannot reshape"):
        f.tensor("output_norm.weight")


def test_non_utf8_string_value(tmp_path: Path) -> None:
    path = write(tmp_path, gguf_bytes((kv("general.name", STRING, gstr(b"\xff\xff")),)))
    with pytest.raises(ModelLoadError, match="unreadable metadata 'general.name'"):
        GGUFFile(path)


# ---- the fuzz harness ----------------------------------------------------------------------------------------------


def test_fuzzer_crash_reproducers_now_load_or_fail_cleanly() -> None:
    """Inputs the fuzzer once crashed on (none yet: the first 30-minute run found nothing past the fixes above)."""
    harness = load_fuzz_script("gguf_fuzz")
    for path in sorted(CRASHES.glob("*")) if CRASHES.is_dir() else []:
        with deadline(10):
            try:
                harness.test_one_input(path.read_bytes())
            except Exception as exc:
                raise AssertionError(f"fuzzer reproducer {path.name} still crashes") from exc


TOKENIZER = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab", "<|endoftext|>"],
             "tokenizer.ggml.merges": ["a b"]}


@pytest.mark.parametrize("bad", [
    {"tokenizer.ggml.tokens": ["a", "a", "b"]},  # a panic in the Rust tokenizer: a BaseException
    {"tokenizer.ggml.tokens": "abc"}, {"tokenizer.ggml.tokens": [1, 2, 3]}, {"tokenizer.ggml.tokens": [[1], [2]]},
    {"tokenizer.ggml.merges": [1, 2]}, {"tokenizer.ggml.merges": ["x y"]}, {"tokenizer.ggml.tokens": ["", "a"]},
    {"tokenizer.ggml.token_type": 5}, {"tokenizer.chat_template": 5},
], ids=lambda bad: repr(bad)[:40])
def test_malformed_tokenizer_metadata_is_a_model_load_error(bad: dict) -> None:
    from tokenmill.tokenizer import Tokenizer

    Tokenizer.from_gguf_metadata(TOKENIZER)
    with pytest.raises(ModelLoadError):
        Tokenizer.from_gguf_metadata({**TOKENIZER, **bad})


def test_fuzzer_seeds_load(tmp_path: Path) -> None:
    harness = load_fuzz_script("gguf_fuzz")
    for seed in harness.write_seeds(tmp_path / "corpus"):
        harness.test_one_input(seed.read_bytes())


def test_short_seeded_fuzz_run(tmp_path: Path) -> None:
    if importlib.util.find_spec("atheris") is None:
        pytest.skip("atheris is not installed (pip install atheris)")
    result = subprocess.run(
        [sys.executable, str(REPO / "fuzz" / "gguf_fuzz.py"), "-runs=2000", "-seed=1",
         f"-artifact_prefix={tmp_path}/", str(tmp_path / "corpus")],
        capture_output=True, text=True, timeout=90, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Done 2000 runs" in result.stderr
