"""Features against each other: random engine configurations (speculation of every kind, quantized KV, a streaming
window, scheduling policies, prefix caching, chunking, few seats and blocks) on tiny random models, each run to the
end with aborts, then checked for what must hold whatever the combination: every request finishes, every block and
open-block slot comes back, and speculation changes no token (greedy, and seeded sampling) against the same engine
without it. Fixed seeds: a failure names its configuration. A wider run of this kind found the bugs these guard."""

from __future__ import annotations

import random
from typing import Any

import pytest
from conftest import write_tiny_gguf

from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.sampling_params import SamplingParams

META = {"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0}
SPEC_KEYS = ("speculative", "num_speculative_tokens", "speculative_adaptive", "speculative_model",
             "speculative_layers", "speculative_tree_width", "speculative_draft_vocab")


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("combos")
    shape: dict[str, Any] = dict(hidden=256, heads=4, kv_heads=2, ff=256, vocab=300, context=1024, metadata=META)
    out = {}
    for arch in ("llama", "qwen2"):
        out[arch] = str(write_tiny_gguf(folder / f"{arch}.gguf", arch=arch, **shape))
        out[arch + "_draft"] = str(write_tiny_gguf(folder / f"{arch}_draft.gguf", arch=arch, layers=1, **shape))
    return out


def configuration(rng: random.Random, models: dict[str, str]) -> dict[str, Any]:
    arch = rng.choice(["llama", "qwen2"])
    cfg: dict[str, Any] = dict(model=models[arch], dtype="float32", block_size=rng.choice([4, 16]),
                               num_kv_blocks=rng.choice([48, 200]), max_num_seqs=rng.choice([2, 4, 16]),
                               max_num_batched_tokens=rng.choice([32, 128, 512]),
                               enable_prefix_caching=rng.random() < 0.5,
                               scheduling_policy=rng.choice(["fcfs", "priority", "fair", "sjf"]))
    spec = rng.choice(["ngram", "lookahead", "self", "draft"])
    cfg |= dict(speculative=spec, num_speculative_tokens=rng.choice([1, 3, 5]),
                speculative_adaptive=rng.random() < 0.5)
    if spec == "draft":
        cfg["speculative_model"] = models[arch + "_draft"]
    if spec == "self":
        cfg["speculative_layers"] = (0,)
    memory = rng.choice(["plain", "plain", "quantized", "window"])
    if memory == "quantized":
        cfg["kv_cache_dtype"] = rng.choice(["int8", "int4", "int2"])
    elif memory == "window":  # a budget that never splits a prompt differently when drafts take a share of it
        cfg |= dict(sliding_window=rng.choice([32, 64]), attention_sinks=rng.choice([0, 4]),
                    max_num_batched_tokens=512, num_kv_blocks=200)
    elif spec in ("draft", "self") and rng.random() < 0.4:
        cfg["speculative_tree_width"] = 2
    return cfg


def requests(rng: random.Random, greedy: bool) -> list[tuple[list[int], SamplingParams]]:
    base = [rng.randrange(1, 300) for _ in range(rng.choice([5, 40]))]
    out = []
    for i in range(rng.choice([3, 6])):
        phrase = [rng.randrange(1, 300) for _ in range(rng.randrange(2, 6))]
        prompt = base + phrase if rng.random() < 0.4 else (phrase * 20)[: rng.randrange(3, 90)]
        sampling = dict(temperature=0.0) if greedy else dict(temperature=0.8, top_k=rng.choice([2, 20]), seed=i)
        out.append((prompt, SamplingParams(max_tokens=rng.choice([3, 12, 30]), ignore_eos=rng.random() < 0.7,
                                           logprobs=rng.choice([None, 2]), **sampling)))
    return out


def run(cfg: dict[str, Any], reqs: list[tuple[list[int], SamplingParams]], abort: bool = False) -> dict[str, list]:
    engine = LLMEngine(EngineConfig(**cfg))
    priority = cfg["scheduling_policy"] == "priority"
    ids = [engine.add_request(p, sp, f"r{i}", priority=i % 3 if priority else 0, client_id=f"c{i % 2}")
           for i, (p, sp) in enumerate(reqs)]
    tokens: dict[str, list[int]] = {i: [] for i in ids}
    finished: set[str] = set()
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            assert out.request_id not in finished
            tokens[out.request_id] = list(out.token_ids)
            if out.finished:
                finished.add(out.request_id)
        steps += 1
        if abort and steps == 3:
            engine.abort(ids[1])
            finished.add(ids[1])
        assert steps < 2000, "no progress"
    assert finished == set(ids)
    engine.step()  # an empty step hands the runner the last finished ids
    stats = engine.stats()
    held = stats.num_total_blocks - stats.num_free_blocks
    assert held == 0, f"{held} blocks held after every request finished"
    assert getattr(engine.kv_cache, "num_held", 0) == 0  # a quantized cache's open-block slots
    return tokens


@pytest.mark.parametrize("seed", range(24))
def test_speculation_changes_no_token_in_any_combination(models, seed: int) -> None:
    rng = random.Random(seed)
    cfg = configuration(rng, models)
    reqs = requests(rng, greedy=seed % 3 != 2)
    got = run(cfg, reqs)
    plain = run({k: v for k, v in cfg.items() if k not in SPEC_KEYS}, reqs)
    assert got == plain, {k: v for k, v in cfg.items() if k != "model"}
    run(cfg, reqs, abort=True)
