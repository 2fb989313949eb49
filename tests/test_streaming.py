"""StreamingLLM's attention sinks and sliding window: exact block accounting, positions and key shifts (no model),
then a tiny random model against a reference that keeps keys before RoPE and rotates them at their cache positions
(the paper's own formulation), past the model's context."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf

from tests.test_scheduler import run_step
from tokenmill import LLM, SamplingParams
from tokenmill.config import EngineConfig
from tokenmill.kernels import cpu_kernels, isa
from tokenmill.kv.cache import KVCache
from tokenmill.kv.manager import KVCacheManager
from tokenmill.kv.streaming import KVShift, StreamingWindow
from tokenmill.model.config import ModelConfig
from tokenmill.model.llama import apply_rope, rope_rotation, rope_tables
from tokenmill.request import Request, RequestStatus
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4
WINDOW = StreamingWindow(sink_tokens=3, window_tokens=8, block_size=BS)  # 1 sink block + 2 window blocks


def make_scheduler(budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=1 << 30),
                     KVCacheManager(16, BS, enable_prefix_caching=True, window=WINDOW))


def req(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=1000))


def test_window_arithmetic() -> None:
    assert (WINDOW.sink_blocks, WINDOW.window_blocks, WINDOW.capacity) == (1, 2, 12)
    assert WINDOW.blocks_to_evict(12, 1) == 1  # full: the oldest window block goes
    assert WINDOW.blocks_to_evict(11, 1) == 0
    assert WINDOW.blocks_to_evict(4, 8) == 0  # only sinks held: nothing to drop
    assert WINDOW.blocks_to_evict(10, 6) == 1  # one full window block ([4, 8)) frees room; the partial one stays
    assert WINDOW.max_new(0) == 12 and WINDOW.max_new(3) == 9
    assert WINDOW.max_new(12) == 8 and WINDOW.max_new(10) == 6  # sinks plus the partial block stay
    # Drafts evict nothing the real token alone would not: full, one block goes and the rows may refill it.
    assert [WINDOW.max_drafts(n) for n in (12, 11, 10, 8, 5, 2)] == [3, 0, 1, 3, 6, 9]
    with pytest.raises(ValueError, match="sliding_window"):
        StreamingWindow(4, 2, BS)
    with pytest.raises(ValueError, match="attention_sinks"):
        StreamingWindow(-1, 8, BS)
    assert StreamingWindow(0, 8, BS).capacity == 8  # window only


def test_decode_evicts_the_oldest_window_block_and_shifts_the_rest() -> None:
    sched = make_scheduler()
    a = req("a", 10)
    sched.add_request(a)
    kv = sched.kv_cache
    assert not kv.enable_prefix_caching  # eviction rewrites blocks: nothing may share them
    assert run_step(sched) == {"a": 10}
    assert kv.block_table("a") == [0, 1, 2]
    run_step(sched)
    run_step(sched)  # 12 entries: the window is full
    plan = sched.schedule()
    assert plan.kv_shifts == (KVShift((2,), 4),)  # block 1 dropped, block 2's keys move back 4 positions
    [seq] = plan.seqs
    assert seq.block_table == (0, 2, 3) and seq.context_len == 9
    assert plan.positions == (8,) and plan.slot_mapping == (12,)  # position = entry index, in the new block 3
    assert kv.pool.free_block_ids()[-1] == 1 and kv.num_evicted("a") == 4



def test_a_request_paused_after_its_eviction_keeps_the_key_shift_for_its_resumption() -> None:
    # sjf with pausing: "a" evicts a block as the step is planned, then the short request takes its seat; the
    # remaining keys' rotation must go with the step that next runs "a", not with this one.
    sched = Scheduler(SchedulerConfig(max_num_seqs=1, max_num_batched_tokens=64, max_model_len=1 << 30,
                                      policy="sjf", sjf_pause_ratio=2.0),
                      KVCacheManager(16, BS, window=WINDOW))
    sched.add_request(req("a", 10))
    for _ in range(3):
        run_step(sched)  # 12 entries: the window is full
    sched.add_request(Request("s", [1, 2], SamplingParams(max_tokens=1)))
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["s"] and plan.kv_shifts == ()
    assert sched.get("a").status is RequestStatus.PAUSED and sched.kv_cache.block_table("a") == [0, 2, 3]
    sched.update(plan)
    sched.finish("s", RequestStatus.FINISHED_LENGTH)
    plan = sched.schedule()
    assert [s.request_id for s in plan.seqs] == ["a"] and plan.kv_shifts == (KVShift((2,), 4),)
    assert plan.positions == (8,) and plan.slot_mapping == (12,)
    sched.update(plan)
    sched.get("a").output_token_ids.append(7)
    assert sched.schedule().kv_shifts == ()  # applied once

def test_eviction_sequence_over_a_long_decode() -> None:
    sched = make_scheduler()
    a = req("a", 10)
    sched.add_request(a)
    kv = sched.kv_cache
    shifts, positions = [], []
    for _ in range(12):
        plan = sched.schedule()
        shifts.append(plan.kv_shifts)
        positions.append(plan.positions[-1])
        sched.update(plan)
        a.output_token_ids.append(7)
    # Prefill (positions 0..9), then decode at 10, 11, then every fourth token evicts one block.
    assert positions == [9, 10, 11, 8, 9, 10, 11, 8, 9, 10, 11, 8]
    assert [s for s in shifts if s] == [(KVShift((2,), 4),), (KVShift((3,), 4),), (KVShift((4,), 4),)]
    assert kv.block_table("a") == [0, 4, 5]
    assert kv.num_evicted("a") == 12 and kv.num_entries("a") == 9
    assert kv.num_free_blocks == 13  # never more than capacity / block_size = 3 held
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert kv.num_free_blocks == 16 and kv.num_evicted("a") == 0


def test_a_long_prompt_is_chunked_to_fit_the_window() -> None:
    sched = make_scheduler()
    a = req("a", 30)
    sched.add_request(a)
    steps = [run_step(sched) for _ in range(5)]
    # 12 fill it; later chunks get the room left after evicting every full window block: 8 each, then the rest.
    assert steps == [{"a": 12}, {"a": 8}, {"a": 8}, {"a": 2}, {"a": 1}]
    assert a.num_computed_tokens == 31 and sched.kv_cache.num_evicted("a") == 20


def test_preempted_streaming_request_restarts_cleanly() -> None:
    sched = make_scheduler()
    a = req("a", 14)
    sched.add_request(a)
    run_step(sched)
    run_step(sched)
    assert sched.kv_cache.num_evicted("a") > 0
    sched._preempt(a)
    assert sched.kv_cache.num_evicted("a") == 0 and sched.kv_cache.num_free_blocks == 16
    plan = sched.schedule()
    assert plan.positions[0] == 0 and plan.seqs[0].num_tokens == 12  # recomputed from the start, chunked again


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="needs a sliding_window"):
        EngineConfig(attention_sinks=4)
    with pytest.raises(ValueError, match="at least one block"):
        EngineConfig(sliding_window=8, block_size=16)
    with pytest.raises(ValueError, match="chunked prefill"):
        EngineConfig(sliding_window=64, enable_chunked_prefill=False)


def test_rope_rotation_moves_keys_by_an_offset() -> None:
    cfg = ModelConfig("llama", num_layers=1, hidden_size=128, intermediate_size=8, num_heads=2, num_kv_heads=1,
                      head_dim=64, vocab_size=10, max_position=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                      attention_bias=False, tie_word_embeddings=True)
    cos, sin = rope_tables(cfg, torch.float32, torch.device("cpu"), 4096)
    raw = torch.randn(5, cfg.head_dim)
    at_3000 = apply_rope(raw, cos[3000], sin[3000])
    back = apply_rope(at_3000, *rope_rotation(cfg, -2990))
    # The model's tables compute angles in fp32: at position 3000 they are off by up to 3000 * 2**-24 radians.
    assert (back - apply_rope(raw, cos[10], sin[10])).abs().max() < 1e-3
    assert (apply_rope(back, *rope_rotation(cfg, 2990)) - at_3000).abs().max() < 1e-5  # and back again


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("level", isa.supported_levels(isa.cpu_flags()))
def test_the_in_place_key_rotation_kernel_is_bit_identical_to_the_pytorch_path(level: str, dtype: torch.dtype) -> None:
    build = cpu_kernels(level)
    assert build.module is not None, build.error
    cfg = ModelConfig("llama", num_layers=2, hidden_size=192, intermediate_size=8, num_heads=3, num_kv_heads=3,
                      head_dim=64, vocab_size=10, max_position=4096, rope_theta=10000.0, rms_norm_eps=1e-5,
                      attention_bias=False, tie_word_embeddings=True)
    torch_path, kernel = (KVCache(cfg, 8, BS, dtype, torch.device("cpu")) for _ in range(2))
    kernel.use_kernels(build.module)
    for cache in (torch_path, kernel):
        cache.k.copy_(torch.linspace(-3, 3, cache.k.numel()).view_as(cache.k).sin() * 2)
        cache.v.fill_(0.5)
    before = kernel.k.clone()
    for cache in (torch_path, kernel):
        cache.rotate_keys([5, 1, 6], *rope_rotation(cfg, -24))
    assert torch.equal(kernel.k, torch_path.k)
    moved = torch.zeros(8, dtype=torch.bool)
    moved[[5, 1, 6]] = True
    slots_moved = moved.repeat_interleave(BS)
    assert not torch.equal(kernel.k[:, :, slots_moved], before[:, :, slots_moved])
    assert torch.equal(kernel.k[:, :, ~slots_moved], before[:, :, ~slots_moved])  # other blocks untouched
    assert bool((kernel.v == 0.5).all())
    with pytest.raises(RuntimeError, match="block id out of range"):
        kernel.rotate_keys([8], *rope_rotation(cfg, -24))


# ---- a tiny model against the paper's formulation ----------------------------------------------------------------

VOCAB, CONTEXT = 300, 128
SINKS, WINDOW_TOKENS, MODEL_BS = 4, 40, 8  # 1 sink block + 5 window blocks = 48 entries


# qwen2: keys carry a bias added before RoPE, so a rotated key is only right if the bias was rotated with it.
@pytest.fixture(scope="module", params=["llama", "qwen2"])
def tiny_model(tmp_path_factory, request) -> Path:
    path = tmp_path_factory.mktemp("stream") / f"tiny_{request.param}.gguf"
    return write_tiny_gguf(path, arch=request.param, hidden=256, heads=4, kv_heads=2, ff=256, vocab=VOCAB,
                           context=CONTEXT,
                           metadata={"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0})


@torch.inference_mode()
def reference_stream(llm: LLM, prompt: list[int], num_new: int) -> tuple[list[float], list[int]]:
    """Prompt logprobs and greedy tokens, one token per step, with keys kept before RoPE and rotated at their index
    in the cache; a full cache drops the oldest block after the sinks."""
    model, cfg = llm.engine.model, llm.engine.model_config
    window = StreamingWindow(SINKS, WINDOW_TOKENS, MODEL_BS)
    sink_entries = window.sink_blocks * MODEL_BS
    keys: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]
    values: list[list[torch.Tensor]] = [[] for _ in range(cfg.num_layers)]
    tokens, logprobs = list(prompt), []
    group = cfg.num_heads // cfg.num_kv_heads
    forward = [rope_rotation(cfg, j) for j in range(window.capacity)]
    backward = [rope_rotation(cfg, -j) for j in range(window.capacity)]
    for i in range(len(prompt) + num_new - 1):
        if len(keys[0]) + 1 > window.capacity:
            for kept in (*keys, *values):
                del kept[sink_entries : sink_entries + MODEL_BS]
        pos = len(keys[0])

        def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            keys[layer].append(apply_rope(k[0].float(), *backward[pos]))  # noqa: B023
            values[layer].append(v[0].float())
            cached = torch.stack([apply_rope(kp, *forward[j]) for j, kp in enumerate(keys[layer])])
            vals = torch.stack(values[layer])  # [n, Hkv, D]
            qh = q[0].float().view(cfg.num_kv_heads, group, cfg.head_dim)
            scores = torch.einsum("kgd,nkd->kgn", qh, cached) / cfg.head_dim**0.5
            out = torch.einsum("kgn,nkd->kgd", scores.softmax(-1), vals)
            return out.reshape(1, cfg.num_heads, cfg.head_dim).to(q.dtype)

        hidden = model(torch.tensor([tokens[i]]), torch.tensor([pos]), attend)
        row = torch.log_softmax(model.compute_logits(hidden)[0], dim=-1)
        if i + 1 < len(prompt):
            logprobs.append(float(row[prompt[i + 1]]))
        else:
            tokens.append(int(row.argmax()))
    return logprobs, tokens[len(prompt):]


@pytest.mark.parametrize("eager", [False, True], ids=["fused", "eager"])
def test_stream_past_the_context_matches_the_papers_formulation(tiny_model, eager: bool) -> None:
    llm = LLM(str(tiny_model), dtype="float32", device="cpu", num_kv_blocks=32, block_size=MODEL_BS,
              sliding_window=WINDOW_TOKENS, attention_sinks=SINKS, max_num_batched_tokens=1, enforce_eager=eager)
    prompt = [(13 * j + 5) % (VOCAB - 1) + 1 for j in range(150)]  # longer than the context alone
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=0)
    rid = llm.engine.add_request(prompt, params)
    most_blocks, final = 0, None
    while llm.engine.has_unfinished_requests():
        for out in llm.engine.step():
            final = out if out.request_id == rid else final
        stats = llm.engine.stats()
        most_blocks = max(most_blocks, stats.num_total_blocks - stats.num_free_blocks)
    assert final is not None and final.prompt_logprobs is not None and len(final.token_ids) == 60
    assert most_blocks == 6  # sinks + window, whatever the length
    ref_logprobs, ref_tokens = reference_stream(llm, prompt, 60)
    got = [e.logprob for e in final.prompt_logprobs[1:]]
    # Rotating the wrong way is off by more than 1e-3 here; summation order alone stays below 1e-6.
    assert max(abs(a - b) for a, b in zip(got, ref_logprobs, strict=True)) < 1e-5
    assert final.token_ids == ref_tokens
    assert llm.engine.stats().num_free_blocks == 32


@pytest.mark.parametrize("sinks", [SINKS, 0], ids=["sinks", "window-only"])
def test_speculation_under_a_window_gives_the_tokens_of_plain_decoding(tiny_model, sinks: int) -> None:
    """A verify step's rows must each see the entries that decoding them one at a time keeps: drafts that made the
    step evict early would change what the first rows attend to (and a rejected one would have cost a block)."""
    prompt = [(7 * (j % 9) + 3) % (VOCAB - 1) + 1 for j in range(30)]  # repeats itself: prompt lookup finds drafts
    params = SamplingParams(max_tokens=150, temperature=0, ignore_eos=True)  # past the context, many evictions
    options = dict(dtype="float32", device="cpu", num_kv_blocks=32, block_size=MODEL_BS, max_num_batched_tokens=16,
                   sliding_window=WINDOW_TOKENS, attention_sinks=sinks)
    plain = LLM(str(tiny_model), **options).generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    spec = LLM(str(tiny_model), speculative="ngram", num_speculative_tokens=5, prompt_lookup_min=1,
               speculative_adaptive=False, **options)
    assert spec.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == plain
    stats = spec.engine.stats()
    assert stats.spec_decode is not None and stats.spec_decode.num_accepted_tokens > 0
    assert stats.num_free_blocks == 32
