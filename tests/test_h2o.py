"""H2O's heavy-hitter eviction: the budget arithmetic and eviction order on hand-made score tables, exact block
accounting in the KV manager and scheduler (positions keep counting), the kernels' attention-mass side output
against a float64 reference on the decode, verify-row and chunk paths, and the engine on a tiny random model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import write_tiny_gguf

from tests.test_fused_step import BLOCK, LEVELS, scattered_attention_batch
from tests.test_scheduler import run_step
from tokenmill import LLM, SamplingParams
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


def test_budget_arithmetic_and_eviction_order_on_a_score_table() -> None:
    assert (BUDGET.budget_blocks, BUDGET.recent_blocks, BUDGET.capacity) == (5, 2, 20)
    scores = [9.0, 1.0, 3.0, 1.0, 0.5, 0.0]
    assert BUDGET.victims(scores, 19, 1) == []  # the 20th entry still fits
    # 20 entries (5 full blocks), one more: blocks 0..2 are candidates (3 and 4 are the recent window); the lowest
    # score goes.
    assert BUDGET.victims(scores, 20, 1) == [1]
    assert BUDGET.victims([9.0, 3.0, 3.0, 1.0, 0.5], 20, 1) == [1]  # equal scores: the older goes
    assert BUDGET.victims(scores, 20, 5) == [1, 2]  # 25 entries need 7 blocks: two go
    # 18 entries: 4 full blocks and the open one, candidates 0 and 1 only; 26 entries need both gone, whatever the
    # scores, and that is the most one step may add.
    assert BUDGET.victims(scores, 18, 8) == [0, 1]
    assert BUDGET.max_new(18) == 20 - (2 * BS + 2) == 10
    with pytest.raises(ValueError, match="room"):
        BUDGET.victims(scores, 20, 13)
    assert BUDGET.max_new(0) == 20 and BUDGET.max_new(20) == 12
    with pytest.raises(ValueError, match="at least one block besides"):
        HeavyHitterBudget(16, 13, BS)  # 4 blocks of budget, 4 recent
    with pytest.raises(ValueError, match="h2o_recent"):
        HeavyHitterBudget(16, -1, BS)


def test_manager_evicts_the_lowest_scored_blocks_and_keeps_scores_aligned() -> None:
    kv = KVCacheManager(16, BS, enable_prefix_caching=True, h2o=BUDGET)
    assert not kv.enable_prefix_caching and not kv.forks and kv.collects_attention
    a = req("a", 20)
    assert kv.allocate_slots(a, 20)
    kv.commit(a, 20)
    assert kv.block_table("a") == [0, 1, 2, 3, 4] and kv.block_scores("a") == [0.0] * 5
    kv.add_attention("a", [5.0, 0.5, 2.0, 1.0, 1.0])
    kv.add_attention("a", [1.0, 0.0, 0.0, 0.0])  # a shorter step's blocks: the rest gain nothing
    assert kv.evict(a, 1) is None  # H2O moves no keys: no shift
    assert kv.block_table("a") == [0, 2, 3, 4] and kv.block_scores("a") == [6.0, 2.0, 1.0, 1.0]
    assert (kv.num_entries("a"), kv.num_evicted("a"), kv.position_shift("a")) == (16, 4, 0)
    assert kv.pool.free_block_ids()[-1] == 1  # the evicted block went back to the pool
    assert kv.allocate_slots(a, 1)
    assert kv.block_table("a") == [0, 2, 3, 4, 5]
    assert kv.slots("a", 16, 17) == [20]  # the new entry opens block 5
    kv.commit(a, 1)
    kv.truncate(a, 16)  # a rejected draft: the block and its score go
    assert kv.block_table("a") == [0, 2, 3, 4] and len(kv.block_scores("a")) == 4
    kv.free(a)
    assert kv.num_free_blocks == 16 and kv.block_scores("a") == []


def test_scheduler_keeps_token_positions_and_a_bounded_table() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=1000),
                      KVCacheManager(16, BS, h2o=BUDGET))
    a = req("a", 30)
    sched.add_request(a)
    plan = sched.schedule()  # the prompt is longer than the budget: a first chunk up to the budget
    assert plan.collect_attention and plan.seqs[0].num_tokens == 20 and plan.positions == tuple(range(20))
    sched.update(plan, StepResult(attention_mass={"a": [4.0, 1.0, 3.0, 2.0, 5.0]}))
    plan = sched.schedule()  # 10 more: 3 blocks must go, the candidates 0..2 in order of score (1, 2, 0)
    assert plan.seqs[0].num_tokens == 10 and plan.positions == tuple(range(20, 30))
    assert plan.seqs[0].block_table == (3, 4, 5, 6, 7) and plan.seqs[0].context_len == 18
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
    kv.add_attention("b", [1.0, 2.0, 3.0])
    assert run_step(sched) == {"a": 1}  # a's next entry opens a block: b, the latest, is preempted
    assert b.status is RequestStatus.PREEMPTED and kv.block_scores("b") == [] and kv.num_evicted("b") == 0
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


def test_collecting_scores_without_evicting_changes_no_token(tiny_model) -> None:
    plain = LLM(str(tiny_model), max_num_batched_tokens=32, **OPTIONS)
    collect = LLM(str(tiny_model), max_num_batched_tokens=32, h2o_budget=4096, **OPTIONS)
    assert greedy(collect, PROMPTS) == greedy(plain, PROMPTS)
    # Scores add up to one per query head, layer and computed token (nothing evicted, nothing lost).
    engine = collect.engine
    rid = engine.add_request(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))
    for _ in range(6):
        engine.step()
    request = engine.scheduler.get(rid)
    assert request is not None
    total = sum(engine.scheduler.kv_cache.block_scores(rid))
    cfg = engine.model_config
    assert total == pytest.approx(request.num_computed_tokens * cfg.num_heads * cfg.num_layers, rel=1e-4)
    engine.abort(rid)


SPECULATIVE = dict(speculative="ngram", num_speculative_tokens=4, prompt_lookup_min=1, speculative_adaptive=False)


@pytest.mark.parametrize("extra", [{}, {"kv_cache_dtype": "int4"}, SPECULATIVE], ids=["plain", "int4", "speculative"])
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
    if extra == {"kv_cache_dtype": "int4"}:
        assert engine.kv_cache.num_held == 0  # every residual slot came back
    if extra == SPECULATIVE:
        stats = engine.stats().spec_decode
        assert stats is not None and stats.num_draft_tokens > 0  # drafts were verified, and rolled back in budget


def test_engine_refuses_h2o_without_what_it_needs(tiny_model, monkeypatch) -> None:
    import argparse

    from tokenmill.entrypoints.args import add_engine_args, engine_config

    parser = argparse.ArgumentParser()
    add_engine_args(parser)
    config = engine_config(parser.parse_args(["--h2o-budget", "256", "--h2o-recent", "64"]))
    assert (config.h2o_budget, config.h2o_recent) == (256, 64)
    assert EngineConfig(h2o_budget=256).h2o() == HeavyHitterBudget(256, 128, 16)
    for options, match in ((dict(h2o_recent=8), "h2o_recent needs"), (dict(h2o_budget=16), "at least one block"),
                           (dict(h2o_budget=64, sliding_window=64), "sliding_window"),
                           (dict(h2o_budget=64, enforce_eager=True), "enforce_eager"),
                           (dict(h2o_budget=64, enable_chunked_prefill=False, max_num_batched_tokens=4096),
                            "chunked prefill")):
        with pytest.raises(ValueError, match=match):
            EngineConfig(**options)
    # Without the kernels nothing adds up the attention: refused, not run blind.
    monkeypatch.setattr("tokenmill.engine.cpu_kernels", lambda: KernelBuild(None, 0.0, "no C++ compiler"))
    with pytest.raises(ValueError, match="h2o_budget needs the fused CPU step"):
        LLM(str(tiny_model), h2o_budget=64, **OPTIONS)
