from __future__ import annotations

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
