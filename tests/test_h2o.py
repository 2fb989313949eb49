"""H2O's heavy-hitter eviction: the budget arithmetic, eviction order, blocks freed and rows moved on hand-made score
tables, exact block accounting in the KV manager and scheduler (positions keep counting), the kernels' attention-mass
side output and per-head block tables against a float64 reference on the decode, verify-row and chunk paths, and the
engine on a tiny random model against a plain-PyTorch H2O (tokenmill/bench/h2o_reference.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf

from tests.test_fused_step import BLOCK, LEVELS, reference_attention, scattered_attention_batch
from tests.test_scheduler import run_step
from tokenmill import LLM, SamplingParams
from tokenmill.bench.h2o_reference import H2OReference
from tokenmill.config import EngineConfig
from tokenmill.kernels import KernelBuild, cpu_kernels
from tokenmill.kv.h2o import HeavyHitterBudget
from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.scheduler.plan import StepResult
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4
BUDGET = HeavyHitterBudget(budget_tokens=20, recent_tokens=8, block_size=BS)  # 5 blocks, the last 2 full ones kept


def req(rid: str, prompt_len: int) -> Request:
    return Request(rid, list(range(1, prompt_len + 1)), SamplingParams(max_tokens=1000))


def test_budget_arithmetic() -> None:
    assert (BUDGET.budget_blocks, BUDGET.recent_blocks, BUDGET.capacity) == (5, 2, 20)
    assert BUDGET.max_new(0) == 20 and BUDGET.max_new(20) == 12
    assert BUDGET.max_new(18) == 20 - (2 * BS + 2) == 10  # 4 full blocks: two may go, the open one stays
    tables = torch.arange(5)[None]
    assert BUDGET.evict(tables, torch.zeros(1, 20), 19, 1) is None  # the 20th entry still fits
    with pytest.raises(ValueError, match="room"):
        BUDGET.evict(tables, torch.zeros(1, 20), 20, 13)
    with pytest.raises(ValueError, match="at least one block besides"):
        HeavyHitterBudget(16, 13, BS)  # 4 blocks of budget, 4 recent
    with pytest.raises(ValueError, match="h2o_recent"):
        HeavyHitterBudget(16, -1, BS)


def test_eviction_on_hand_made_score_tables() -> None:
    rule = HeavyHitterBudget(budget_tokens=12, recent_tokens=4, block_size=2)  # 6 blocks of 2, the last 2 kept
    # Two lanes holding blocks 10..15 in their own orders (the recent tail 14, 15 alike); 12 entries, one more
    # needs a block: each lane drops its 2 lowest-scored entries among the first 8.
    tables = torch.tensor([[10, 11, 12, 13, 14, 15], [12, 10, 11, 13, 14, 15]])
    scores = torch.tensor([[1.0, 0.0, 3.0, 4.0, 0.5, 7.0] + [9.0] * 6,
                           [0.0, 5.0, 1.0, 8.0, 2.0, 3.0] + [9.0] * 6], dtype=torch.float64)
    ev = rule.evict(tables, scores, 12, 1)
    assert ev is not None
    # Lane 0 drops entries 1 (block 10) and 4 (block 12), lane 1 entries 0 (block 12) and 2 (block 10): blocks 10
    # and 12 hold two dropped entries each, the lower id goes.
    assert ev.freed == [10]
    assert ev.tables.tolist() == [[11, 12, 13, 14, 15], [12, 11, 13, 14, 15]]
    # Each lane's survivor in block 10 moves into the hole it left in block 12 (slot 2 * 12 + 0).
    assert ev.copies.tolist() == [[0, 20, 24], [1, 21, 24]]
    assert ev.source.tolist() == [[2, 3, 0, 5, 6, 7, 8, 9, 10, 11], [3, 1, 4, 5, 6, 7, 8, 9, 10, 11]]
    # Equal scores: the older entries go, and a block whose entries all go moves nothing.
    flat = torch.tensor([[5.0] * 12])
    ev = rule.evict(tables[:1], flat, 12, 1)
    assert ev is not None and ev.freed == [10] and ev.copies.shape == (0, 3)
    # 11 entries (5 full blocks and the open one) and 4 more: 2 blocks must go, so 4 entries, from the first 3
    # blocks only: entries 0, 1, 2 and 4. Block 10 holds two, blocks 11 and 12 one each: 10 and 11 are freed, and
    # entry 3 (block 11) moves into entry 4's hole in block 12.
    ev = rule.evict(tables[:1], scores[:1], 11, 4)
    assert ev is not None and ev.freed == [10, 11] and ev.tables.tolist() == [[12, 13, 14, 15]]
    assert ev.copies.tolist() == [[0, 23, 24]]
    assert ev.source.tolist() == [[3, 5, 6, 7, 8, 9, 10, 11]]


def test_manager_evicts_tokens_by_score_and_keeps_everything_aligned() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True, h2o=BUDGET)
    assert not kv.enable_prefix_caching and not kv.forks and kv.collects_attention
    a = req("a", 20)
    assert kv.allocate_slots(a, 20)
    kv.commit(a, 20)
    assert kv.block_table("a") == [0, 1, 2, 3, 4] and kv.lane_tables("a") is None  # one lane: the table itself
    scores = torch.tensor([[5.0, 5.0, 5.0, 5.0, 0.0, 5.0, 5.0, 0.1, 0.2, 0.3, 5.0, 0.4] + [1.0] * 8],
                          dtype=torch.float64)
    kv.add_attention("a", scores)
    assert torch.equal(kv.entry_scores("a"), scores)
    # 20 entries, one more: a block's worth goes from the first 3 blocks (12 entries), the 4 lowest: entries 4, 7
    # (block 1), 8, 9 (block 2). Both blocks hold two: the lower id, 1, is freed.
    assert kv.evict(a, 1) is None  # H2O moves no keys by rotation: no shift
    assert kv.block_table("a") == [0, 2, 3, 4]
    assert kv.pool.free_block_ids()[-1] == 1
    moves = kv.pop_lane_copies("a")
    assert moves is not None and moves.tolist() == [[-1, 5, 8], [-1, 6, 9]]  # entries 5, 6 into 8, 9's holes
    assert kv.pop_lane_copies("a") is None
    assert kv.entry_scores("a")[0, :4].tolist() == [5.0] * 4
    assert kv.entry_scores("a")[0, 4:8].tolist() == [5.0, 5.0, 5.0, 0.4]  # block 2: entries 5, 6 moved in
    assert (kv.num_entries("a"), kv.num_evicted("a"), kv.position_shift("a")) == (16, 4, 0)
    assert kv.allocate_slots(a, 1)
    assert kv.block_table("a") == [0, 2, 3, 4, 5] and kv.slots("a", 16, 17) == [20]
    kv.commit(a, 1)
    kv.truncate(a, 16)  # a rejected draft: its block and score go
    assert kv.block_table("a") == [0, 2, 3, 4] and kv.entry_scores("a").shape == (1, 16)
    kv.free(a)
    assert kv.num_free_blocks == 16 and kv.entry_scores("a").shape == (1, 0)


def test_per_head_lanes_keep_their_own_tables() -> None:
    kv = KVCacheManager(16, BS, h2o=BUDGET, h2o_lanes=2)
    a = req("a", 20)
    assert kv.allocate_slots(a, 20)
    kv.commit(a, 20)
    assert kv.lane_tables("a").tolist() == [[0, 1, 2, 3, 4]] * 2
    low = [0.0, 0.0, 0.0, 0.0]
    kv.add_attention("a", torch.tensor([[9.0] * 4 + low + [9.0] * 12, low + [9.0] * 16]))
    kv.evict(a, 1)
    # Lane 0 dropped block 1's entries, lane 1 block 0's: each holds 4; block 0 is freed (the lower id), and lane 0
    # moves block 0's entries into block 1.
    assert kv.block_table("a") == [1, 2, 3, 4]
    assert kv.lane_tables("a").tolist() == [[1, 2, 3, 4], [1, 2, 3, 4]]
    moves = kv.pop_lane_copies("a")
    assert moves is not None and moves.tolist() == [[0, s, 4 + s] for s in range(4)]
    kv.free(a)
    assert kv.num_free_blocks == 16


def test_scheduler_keeps_token_positions_and_a_bounded_table() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1000),
                      KVCacheManager(16, BS, h2o=BUDGET))
    a = req("a", 30)
    sched.add_request(a)
    plan = sched.schedule()  # the prompt is longer than the budget: a first chunk up to the budget
    assert plan.collect_attention and plan.seqs[0].num_tokens == 20 and plan.positions == tuple(range(20))
    sched.update(plan, StepResult(attention_mass={"a": torch.arange(20, dtype=torch.float64)[None]}))
    plan = sched.schedule()  # 10 more: 3 blocks' worth of the 12 oldest entries go (the lowest scores: 0..11)
    assert plan.seqs[0].num_tokens == 10 and plan.positions == tuple(range(20, 30))
    assert plan.seqs[0].block_table == (3, 4, 5, 6, 7) and plan.seqs[0].context_len == 18
    assert plan.lane_copies is None  # whole blocks went: nothing to move
    sched.update(plan)
    a.output_token_ids.append(7)
    for _ in range(40):  # decode: the table never outgrows the budget
        plan = sched.schedule()
        assert plan.seqs[0].context_len <= BUDGET.capacity
        sched.update(plan)
        a.output_token_ids.append(7)
    assert a.num_computed_tokens == 70 and plan.positions == (69,)
    sched.finish("a", RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.num_free_blocks == 16  # nothing leaks


def test_preempted_request_loses_its_scores_and_recomputes() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1000),
                      KVCacheManager(6, BS, h2o=BUDGET))
    a, b = req("a", 12), req("b", 12)
    sched.add_request(a)
    sched.add_request(b)
    assert run_step(sched) == {"a": 12, "b": 12}  # 3 blocks each: the pool is full
    kv = sched.kv_cache
    kv.add_attention("b", torch.ones(1, 12))
    assert run_step(sched) == {"a": 1}  # a's next entry opens a block: b, the latest, is preempted
    assert b.status is RequestStatus.PREEMPTED and kv.entry_scores("b").numel() == 0 and kv.num_evicted("b") == 0
    sched.finish("a", RequestStatus.FINISHED_ABORTED)
    assert run_step(sched) == {"b": 13}  # recomputed: its prompt and the token it had
    sched.finish("b", RequestStatus.FINISHED_ABORTED)
    assert kv.num_free_blocks == 6


# ---- the kernels' side output ----


@pytest.fixture(scope="module", params=LEVELS)
def kernels(request):
    build = cpu_kernels(request.param)
    assert build.module is not None, build.error
    return build.module


def reference_mass(q, k_cache, starts, tables, context_lens, kv_heads) -> torch.Tensor:
    """[S, kv_heads, max ctx] float64: the causal softmax probabilities each entry received, summed over the
    sequence's rows and each KV head's query heads."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    group = num_heads // kv_heads
    out = torch.zeros(len(tables), kv_heads, max(context_lens), dtype=torch.float64)
    for s, (table, ctx) in enumerate(zip(tables, context_lens, strict=True)):
        slots = [b * BLOCK + i for b in table for i in range(BLOCK)][:ctx]
        q_len = starts[s + 1] - starts[s]
        keys = k_cache[:, slots].double().repeat_interleave(group, 0)  # [H, ctx, D]
        scores = q[starts[s] : starts[s + 1]].double().transpose(0, 1) @ keys.transpose(1, 2) / head_dim**0.5
        future = torch.arange(ctx)[None, :] > torch.arange(ctx - q_len, ctx)[:, None]
        probs = scores.masked_fill(future, float("-inf")).softmax(-1)  # [H, q_len, ctx]
        out[s, :, :ctx] = probs.sum(1).view(kv_heads, group, ctx).sum(1)
    return out


# fp32: float rounding only. bf16: scores and probabilities are rounded to bf16 as the eager path rounds them.
@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize(("num_heads", "kv_heads"), [(9, 3), (10, 2)])
def test_attention_mass_matches_a_float64_reference(kernels, dtype, tolerance, num_heads, kv_heads) -> None:
    generator = torch.Generator().manual_seed(1)
    # Decodes, verify-sized runs (2..16 rows) and chunks (tiles of 16 queries with a remainder).
    sequences = [(1, 1), (37, 1), (17, 2), (64, 16), (40, 40), (300, 50)]
    q, k, v, k_cache, v_cache, starts, tables = scattered_attention_batch(generator, dtype, num_heads, kv_heads, 64,
                                                                           sequences)
    width = max(len(t) for t in tables)
    context_lens = [ctx for ctx, _ in sequences]
    args = (q, k, v, k_cache, v_cache, torch.tensor(starts), torch.tensor([t + [0] * (width - len(t)) for t in tables]),
            torch.tensor(context_lens), BLOCK)
    mass = torch.full((len(sequences), kv_heads, width * BLOCK), 0.25)  # added to, not overwritten
    out = kernels.paged_attention(*args, attention_mass=mass)
    assert torch.equal(out, kernels.paged_attention(*args))  # the side output changes nothing else
    want = reference_mass(q, k_cache, starts, tables, context_lens, kv_heads)
    for s, ctx in enumerate(context_lens):
        got = mass[s, :, :ctx].double() - 0.25
        assert float((got - want[s, :, :ctx]).abs().max() / want[s].max()) <= tolerance
        assert torch.all(mass[s, :, ctx:] == 0.25)  # entries past the context gain nothing
        # Every query head's probabilities sum to 1: each KV head's entries gained rows × group in all.
        rows = starts[s + 1] - starts[s]
        assert torch.allclose(got.sum(-1), torch.full((kv_heads,), rows * num_heads / kv_heads, dtype=torch.float64),
                              rtol=tolerance)
    with pytest.raises(RuntimeError, match="attention_mass"):
        kernels.paged_attention(*args, attention_mass=torch.zeros(len(sequences), kv_heads, 8))


def test_per_head_tables_read_each_heads_own_blocks(kernels) -> None:
    generator = torch.Generator().manual_seed(2)
    sequences = [(37, 1), (40, 5), (100, 30)]
    kv_heads, num_heads = 2, 6
    q, k, v, k_cache, v_cache, starts, tables = scattered_attention_batch(generator, torch.float32, num_heads,
                                                                           kv_heads, 64, sequences)
    # KV head 1 reads the same blocks in another order, except its new tokens' (last) block: its keys then differ.
    width = max(len(t) for t in tables)
    shared = torch.tensor([t + [0] * (width - len(t)) for t in tables])
    other = [t[:-1][::-1] + t[-1:] for t in tables]
    per_head = torch.stack((shared, torch.tensor([t + [0] * (width - len(t)) for t in other])), dim=1)
    context_lens = [ctx for ctx, _ in sequences]
    mass = torch.zeros(len(sequences), kv_heads, width * BLOCK)
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts), per_head,
                                  torch.tensor(context_lens), BLOCK, attention_mass=mass)
    group = num_heads // kv_heads
    for head, head_tables in ((0, tables), (1, other)):
        want = reference_attention(q, k_cache, v_cache, starts, head_tables, context_lens)
        heads = slice(head * group, (head + 1) * group)
        assert float((got[:, heads].double() - want[:, heads]).abs().max() / want.abs().max()) <= 1e-5
        want_mass = reference_mass(q, k_cache, starts, head_tables, context_lens, kv_heads)
        for s, ctx in enumerate(context_lens):
            assert torch.allclose(mass[s, head, :ctx].double(), want_mass[s, head, :ctx], atol=1e-4)


# ---- the engine ----


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("h2o") / "tiny.gguf", hidden=256, heads=4, kv_heads=2, ff=256,
                           vocab=300, context=512)


PROMPTS = [[(7 * i + 3 * j) % 290 + 5 for j in range(n)] for i, n in enumerate((45, 20, 77, 3))]
OPTIONS = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=16, max_num_seqs=4)


def greedy(llm: LLM, prompts: list[list[int]], max_tokens: int = 24) -> list[list[int]]:
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True),
                        use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outs]


@pytest.mark.parametrize("per_head", [True, False], ids=["per-head", "shared"])
def test_collecting_scores_without_evicting_changes_no_token(tiny_model, per_head) -> None:
    plain = LLM(str(tiny_model), max_num_batched_tokens=32, **OPTIONS)
    collect = LLM(str(tiny_model), max_num_batched_tokens=32, h2o_budget=4096, h2o_per_head=per_head, **OPTIONS)
    assert greedy(collect, PROMPTS) == greedy(plain, PROMPTS)
    # Scores add up to one per query head, layer and computed token (nothing evicted, nothing lost).
    engine = collect.engine
    rid = engine.add_request(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for _ in range(6):
        engine.step()
    request = engine.scheduler.get(rid)
    assert request is not None
    scores = engine.scheduler.kv_cache.entry_scores(rid)
    cfg = engine.model_config
    assert scores.shape == (cfg.num_layers * cfg.num_kv_heads if per_head else 1, request.num_computed_tokens)
    total = float(scores.sum())
    assert total == pytest.approx(request.num_computed_tokens * cfg.num_heads * cfg.num_layers, rel=1e-4)
    engine.abort(rid)


@pytest.mark.parametrize("form", ["per-head", "shared"])
def test_engine_matches_a_plain_pytorch_h2o(tiny_model, form) -> None:
    """Prompt logprobs one token per step, evicting as it goes: the engine (kernels' scores, eviction, row moves,
    per-head tables) against the same rule over a dense cache with eviction as a mask."""
    prompt = [(11 * j) % 290 + 5 for j in range(150)]
    llm = LLM(str(tiny_model), max_num_batched_tokens=1, h2o_budget=48, h2o_recent=16, h2o_per_head=form == "per-head",
              **OPTIONS)
    out = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert out.prompt_logprobs is not None
    got = [e.logprob for e in out.prompt_logprobs[1:] if e is not None]
    want = H2OReference(llm.engine.model, HeavyHitterBudget(48, 16, 16), form, len(prompt)).logprobs(prompt)
    assert max(abs(a - b) for a, b in zip(got, want, strict=True)) <= 1e-4
    # And eviction did happen: the full cache scores differently.
    full = LLM(str(tiny_model), max_num_batched_tokens=16, **OPTIONS)
    dense = full.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    assert dense.prompt_logprobs is not None
    assert max(abs(a - e.logprob) for a, e in zip(got, dense.prompt_logprobs[1:], strict=True) if e) > 1e-2


@pytest.mark.parametrize("extra", [{}, {"h2o_per_head": False}], ids=["per-head", "shared"])
def test_engine_runs_within_the_budget_and_frees_everything(tiny_model, extra) -> None:
    llm = LLM(str(tiny_model), max_num_batched_tokens=32, h2o_budget=64, h2o_recent=32, **OPTIONS, **extra)
    engine, kv = llm.engine, llm.engine.scheduler.kv_cache
    for i, prompt in enumerate(PROMPTS):
        engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True), f"r{i}")
    most, lengths = 0, {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            lengths[out.request_id] = out.num_output_tokens
        most = max([most] + [len(kv.block_table(r.request_id)) for r in engine.scheduler.running])
    assert most == 4  # 64 tokens of budget, never more
    assert lengths == {f"r{i}": 60 for i in range(4)}
    assert max(kv.num_evicted(r) for r in ("r0", "r2")) == 0  # forgotten once finished
    engine.step()  # an empty step hands the runner the last finished ids
    assert kv.num_free_blocks == 64


def test_engine_refuses_h2o_without_what_it_needs(tiny_model, monkeypatch) -> None:
    import argparse

    from tokenmill.entrypoints.args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--h2o-budget", "256", "--h2o-recent", "64", "--no-h2o-per-head"]))
    assert (config.h2o_budget, config.h2o_recent, config.h2o_per_head) == (256, 64, False)
    assert EngineConfig(h2o_budget=256).h2o() == HeavyHitterBudget(256, 128, 16)
    for options, match in ((dict(h2o_recent=8), "h2o_recent needs"), (dict(h2o_budget=16), "at least one block"),
                           (dict(h2o_budget=64, sliding_window=64), "sliding_window"),
                           (dict(h2o_budget=64, enforce_eager=True), "enforce_eager"),
                           (dict(h2o_budget=64, kv_cache_dtype="int4"), "quantized"),
                           (dict(h2o_budget=64, enable_chunked_prefill=False, max_num_batched_tokens=4096),
                            "chunked prefill"),
                           (dict(h2o_budget=64, speculative="ngram"), "speculative decoding")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**options)
    # Without the kernels nothing adds up the attention: refused, not run blind.
    monkeypatch.setattr("tokenmill.attention.select.cpu_kernels", lambda: KernelBuild(None, 0.0, "no C++ compiler"))
    with pytest.raises(ValueError, match="h2o_budget needs the fused CPU step"):
        LLM(str(tiny_model), h2o_budget=64, **OPTIONS)
