from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokenmill.model.gguf_file import ModelLoadError, default_model_path

torch.set_num_threads(max(1, torch.get_num_threads()))


@pytest.fixture(scope="session")
def model_path():
    try:
        path = default_model_path()
    except ModelLoadError as exc:
        pytest.skip(f"default model not installed: {exc}")
    if not path.exists():
        pytest.skip(f"default model file missing: {path}")
    return path


@pytest.fixture(scope="session")
def llm_fp32(model_path):
    from tokenmill import LLM

    return LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=512)


@pytest.fixture(scope="session")
def hf_model(model_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(model_path.parent), gguf_file=model_path.name, dtype=torch.float32
    )
    return model.eval()


# Varied prompts: chat-formatted and raw, prose, code, digits, unicode, a long one.
RAW_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Translate to French: Good morning, how are you?",
    "import numpy as np\nx = np.arange(10)\nprint(",
    "Les fleurs du printemps sont",
    "The theory of relativity states that",
    "🙂 Emoji test: the weather today is",
    "SELECT name, age FROM users WHERE",
    "List three primary colors:\n1.",
    "In 1969, Neil Armstrong",
    "Q: What is 12 times 7?\nA:",
    "<html>\n  <body>\n    <h1>",
    "Water boils at a temperature of",
    "The quick brown fox",
    "Python is a programming language that " * 12,
    "東京は日本の首都で、",
]
CHAT_QUESTIONS = [
    "What is the capital of Germany?",
    "Write a haiku about the ocean.",
    "Explain what a hash map is in two sentences.",
    "Give me three tips for better sleep.",
    "What is 15 + 27?",
    "Name a famous painting by Leonardo da Vinci.",
    "How do I reverse a list in Python?",
    "Why is the sky blue?",
    "Summarize the plot of Romeo and Juliet in one sentence.",
    "What are the benefits of exercise?",
    "Tell me a fun fact about octopuses.",
    "Write a short greeting for a birthday card.",
    "What does CPU stand for?",
    "Describe a cat in five words.",
]


def chat_prompt(tokenizer, question: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True)


def tiny_gguf_tensors(arch: str, layers: int, hidden: int, heads: int, kv_heads: int, ff: int, vocab: int,
                      tied: bool) -> dict[str, tuple[int, ...]]:
    """Tensor names and (rows, cols) shapes of a llama/qwen2 model (qwen2 with q/k/v biases)."""
    head_dim = hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    shapes: dict[str, tuple[int, ...]] = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tied:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(layers):
        p = f"blk.{i}."
        shapes |= {p + "attn_norm.weight": (hidden,), p + "attn_q.weight": (q, hidden),
                   p + "attn_k.weight": (kv, hidden), p + "attn_v.weight": (kv, hidden),
                   p + "attn_output.weight": (hidden, q), p + "ffn_norm.weight": (hidden,),
                   p + "ffn_gate.weight": (ff, hidden), p + "ffn_up.weight": (ff, hidden),
                   p + "ffn_down.weight": (hidden, ff)}
        if arch == "qwen2":
            shapes |= {p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)}
    return shapes


def _add_kv(writer: Any, key: str, value: Any) -> None:
    """One metadata entry, typed from its Python value (ints as u32 when they fit, else u64/i64)."""
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        if 0 <= value < 2**32:
            writer.add_uint32(key, value)
        else:
            (writer.add_uint64 if value >= 0 else writer.add_int64)(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, value)


def write_tiny_gguf(path: Path, *, arch: str = "llama", layers: int = 2, hidden: int = 64, heads: int = 4,
                    kv_heads: int = 2, ff: int = 128, vocab: int = 300, context: int = 256, tensor_type: str = "F32",
                    tied: bool = True, metadata: dict[str, Any] | None = None,
                    shapes: dict[str, tuple[int, ...]] | None = None,
                    tensor_types: dict[str, str] | None = None) -> Path:
    """A small random model in GGUF, loadable by `load_model`. `metadata` adds or replaces entries (None drops
    one; keys outside general.* and tokenizer.* get the architecture prefix), `shapes` replaces tensor shapes: both
    for building files that disagree with themselves. Matrices are stored as `tensor_type` (F32, F16, Q8_0,
    Q4_0..., Q4_K and Q6_K as random blocks), or as `tensor_types[name]`; vectors as F32."""
    import gguf

    meta: dict[str, Any] = {
        "block_count": layers, "context_length": context, "embedding_length": hidden, "feed_forward_length": ff,
        "attention.head_count": heads, "attention.head_count_kv": kv_heads, "attention.layer_norm_rms_epsilon": 1e-5,
        "rope.freq_base": 10000.0, "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [f"t{i}" for i in range(vocab)],
    }
    meta |= metadata or {}
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in meta.items():
        if value is not None:
            _add_kv(writer, key if key.startswith(("general.", "tokenizer.")) else f"{arch}.{key}", value)
    rng = np.random.default_rng(0)
    all_shapes = tiny_gguf_tensors(arch, layers, hidden, heads, kv_heads, ff, vocab, tied) | (shapes or {})
    for name, shape in all_shapes.items():
        data = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        kind = (tensor_types or {}).get(name, tensor_type)
        if len(shape) == 1 or kind == "F32":
            writer.add_tensor(name, data)
        elif kind == "F16":
            writer.add_tensor(name, data.astype(np.float16))
        elif kind in ("Q4_K", "Q6_K"):  # the gguf package cannot quantize to them
            writer.add_tensor(name, random_k_quant(kind, shape, rng), raw_dtype=gguf.GGMLQuantizationType[kind])
        else:
            qtype = gguf.GGMLQuantizationType[kind]
            writer.add_tensor(name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def random_k_quant(kind: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Random Q4_K or Q6_K blocks for a [rows, cols] tensor (cols a multiple of 256), as raw bytes [rows, bytes]:
    random codes and sub-block scales under small positive f16 super-block scales (Q4_K: d and dmin at bytes 0-3
    of 144; Q6_K: d at bytes 208-209 of 210)."""
    rows, cols = shape
    size, scales = {"Q4_K": (144, [(0, 0.001, 0.004), (2, 0.0005, 0.002)]),
                    "Q6_K": (210, [(208, 0.0001, 0.0004)])}[kind]
    blocks = rng.integers(0, 256, size=(rows * cols // 256, size), dtype=np.uint8)
    for offset, low, high in scales:
        values = rng.uniform(low, high, len(blocks)).astype(np.float16)
        blocks[:, offset:offset + 2] = values.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(rows, -1)


def write_head64_gguf(path: Path, vocab: int = 300) -> Path:
    """A tiny random llama of head size 64, so that the fused C++ step runs it where it can be built; EOS is id 0."""
    return write_tiny_gguf(path, hidden=256, heads=4, kv_heads=2, ff=256, vocab=vocab, context=1024,
                           metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


def write_draft_pair(folder: Path, vocab: int = 300) -> tuple[Path, Path]:
    """A 2-layer target and a 1-layer draft of the same vocabulary, head size 64 (the fused step's); the same random
    stream makes the draft's embedding the target's."""
    shape: dict[str, Any] = {"hidden": 256, "heads": 4, "kv_heads": 2, "ff": 256, "vocab": vocab, "context": 1024,
                             "metadata": {"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0}}
    return (write_tiny_gguf(folder / "target.gguf", layers=2, **shape),
            write_tiny_gguf(folder / "draft.gguf", layers=1, **shape))


def tiny_llm(path: Path, **options: Any) -> Any:
    """An `LLM` over a tiny model file with the small-engine defaults of the engine-level tests (fp32 on the CPU,
    256 KV blocks of 16 tokens); `options` add or override any EngineConfig field."""
    from tokenmill import LLM

    base: dict[str, Any] = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 256, "block_size": 16}
    return LLM(str(path), **(base | options))


def lookup_prompts(vocab: int) -> list[list[int]]:
    """Token-id prompts that repeat themselves (drafts for prompt lookup to find) and ones that do not, of 5 to 59
    tokens, over ids in [1, vocab)."""
    out = []
    for i in range(8):
        phrase = [(7 * i + 3 * j) % (vocab - 1) + 1 for j in range(5 + i)]
        out.append(phrase * (2 + i % 3) + phrase[: i % 4])
    out += [[(31 * j + 11 * i) % (vocab - 1) + 1 for j in range(20 + 13 * i)] for i in range(4)]
    return out


def loop_prompt(plain: Any, vocab: int) -> list[int]:
    """The model's own greedy continuation of a prompt: where it repeats, so that drafts are often among the tokens
    sampling can pick."""
    from tokenmill import SamplingParams

    seed = [(13 * j) % (vocab - 1) + 1 for j in range(12)]
    return plain.generate(seed, SamplingParams(temperature=0, max_tokens=60, ignore_eos=True),
                          use_tqdm=False)[0].token_ids[20:]


def two_token_chi_square(llm: Any, plain: Any, prompt: list[int], trials: int = 600) -> float:
    """Samples the first two tokens of `prompt` `trials` times with `llm` (top-k 2, temperature 1, a seed per trial;
    max_tokens 3, so that the second can go through verification of a draft) and returns the chi-square statistic
    of the four outcomes' counts against their exact probabilities from `plain` (3 degrees of freedom)."""
    from tokenmill import SamplingParams

    target = two_token_distribution(plain, prompt)
    params = [SamplingParams(temperature=1.0, top_k=2, max_tokens=3, ignore_eos=True, seed=i) for i in range(trials)]
    counts = dict.fromkeys(target, 0)
    for result in llm.generate([prompt] * trials, params, use_tqdm=False):
        counts[tuple(result.token_ids[:2])] += 1
    return sum((counts[c] - trials * p) ** 2 / (trials * p) for c, p in target.items())


# chi-square with 3 degrees of freedom: P(stat > 16.27) = 0.001
CHI_SQUARE_3_DOF_P001 = 16.27


def two_token_distribution(plain: Any, prompt: list[int]) -> dict[tuple[int, int], float]:
    """The exact probability of each (first, second) token pair under top-k 2 sampling at temperature 1, from a
    plain engine's top-2 logprobs: the reference for sampling-lossless tests."""
    from tokenmill import SamplingParams

    def top2(tokens: list[int]) -> list[tuple[int, float]]:
        return plain.generate(tokens, SamplingParams(temperature=0, max_tokens=1, logprobs=2),
                              use_tqdm=False)[0].outputs[0].logprobs[0].top

    target: dict[tuple[int, int], float] = {}
    first = top2(prompt)
    z1 = sum(math.exp(lp) for _, lp in first)
    for t1, lp1 in first:
        nxt = top2(prompt + [t1])
        z2 = sum(math.exp(lp) for _, lp in nxt)
        for t2, lp2 in nxt:
            target[(t1, t2)] = math.exp(lp1) / z1 * math.exp(lp2) / z2
    return target


def load_fuzz_script(name: str) -> Any:
    """A script of the repository's fuzz/ folder (not a package) imported as a module, for its harness functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).resolve().parent.parent / "fuzz" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
