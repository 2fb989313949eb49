"""Prefix caching and forks: exact block accounting (no model), then output identity on the real model."""

from __future__ import annotations

import pytest

from tests.test_scheduler import run_step as step
from tokenmill import LLM, SamplingParams
from tokenmill.kv.block_pool import BlockPool
from tokenmill.kv.hashing import chain_hash
from tokenmill.kv.manager import KVCacheManager
from tokenmill.request import Request, RequestStatus
from tokenmill.sampling_params import fan_out
from tokenmill.scheduler.scheduler import Scheduler, SchedulerConfig

BS = 4


def make_scheduler(num_blocks: int = 16, caching: bool = True, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=64),
                     KVCacheManager(num_blocks, BS, enable_prefix_caching=caching, cache_salt="test"))


def req(rid: str, tokens: list[int], fork_of: str | None = None) -> Request:
    return Request(rid, list(tokens), SamplingParams(max_tokens=50), fork_of=fork_of)


PROMPT = list(range(10, 20))  # 10 tokens: blocks [10..13], [14..17], and a partial [18, 19]


def test_hash_chain_is_stable_and_depends_on_the_whole_prefix() -> None:
    kv = KVCacheManager(8, BS, enable_prefix_caching=True, cache_salt="m|bf16")
    a = kv.block_hashes(req("a", PROMPT), 2)
    assert a == kv.block_hashes(req("b", PROMPT), 2)  # same tokens, same chain
    assert a[1] == chain_hash(a[0], [14, 15, 16, 17])
    other_first = kv.block_hashes(req("c", [11, 10, 12, 13, 14, 15, 16, 17]), 2)
    assert other_first[1] != a[1]  # identical second block, different parent: different hash
    salted = KVCacheManager(8, BS, enable_prefix_caching=True, cache_salt="m|fp32")
    assert salted.block_hashes(req("d", PROMPT), 1) != a[:1]  # another KV format never matches


def test_finished_request_blocks_are_reused_exactly() -> None:
    sched = make_scheduler()
    a = req("a", PROMPT)
    sched.add_request(a)
    assert step(sched) == {"a": 10}
    assert sched.kv_cache.block_table("a") == [0, 1, 2]
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert sched.kv_cache.num_free_blocks == 16
    b = req("b", PROMPT + [30, 31])
    sched.add_request(b)
    # blocks 0 and 1 hold the first 8 tokens: only the 4 after them are computed
    assert step(sched) == {"b": 4}
    assert b.num_cached_tokens == 8
    assert sched.kv_cache.block_table("b")[:2] == [0, 1]
    assert sched.kv_cache.pool.ref_count(0) == 1 and sched.kv_cache.pool.ref_count(1) == 1
    stats = sched.kv_cache.stats
    assert (stats.queries, stats.hits, stats.requests, stats.requests_hit) == (22, 8, 2, 1)


def test_a_request_waiting_for_blocks_is_counted_once_when_admitted() -> None:
    sched = make_scheduler(num_blocks=4)
    a = req("a", PROMPT)  # 3 blocks of 4
    sched.add_request(a)
    assert step(sched) == {"a": 10}
    b = req("b", list(range(40, 50)))  # needs 3 blocks, only 1 is free: waits
    sched.add_request(b)
    assert "b" not in step(sched) and "b" not in step(sched)
    stats = sched.kv_cache.stats
    assert (stats.requests, stats.queries) == (1, 10)
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert step(sched) == {"b": 10}
    assert (stats.requests, stats.queries) == (2, 20)


def test_running_requests_share_blocks_by_reference() -> None:
    sched = make_scheduler()
    sched.add_request(req("a", PROMPT))
    step(sched)
    sched.add_request(req("b", PROMPT[:8] + [50, 51, 52]))
    assert step(sched) == {"a": 1, "b": 3}
    assert sched.kv_cache.block_table("b")[:2] == [0, 1]
    assert sched.kv_cache.pool.ref_count(0) == 2
    sched.finish("a", RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.pool.ref_count(0) == 1  # b still holds it
    sched.finish("b", RequestStatus.FINISHED_ABORTED)
    assert sched.kv_cache.pool.ref_count(0) == 0 and sched.kv_cache.num_free_blocks == 16


def test_no_sharing_across_different_tokens() -> None:
    sched = make_scheduler()
    sched.add_request(req("a", PROMPT))
    step(sched)
    sched.add_request(req("b", [10, 11, 12, 77] + PROMPT[4:]))  # first block differs in its last token
    assert step(sched) == {"a": 1, "b": 10}
    assert set(sched.kv_cache.block_table("b")).isdisjoint(sched.kv_cache.block_table("a"))


def test_full_hit_still_computes_the_last_token() -> None:
    sched = make_scheduler()
    sched.add_request(req("a", PROMPT[:8]))
    step(sched)
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    b = req("b", PROMPT[:8])
    sched.add_request(b)
    # 8 tokens = exactly 2 cached blocks, but the last token's logits are needed: block 1 is recomputed elsewhere
    assert step(sched) == {"b": 4}
    assert sched.kv_cache.block_table("b")[0] == 0 and sched.kv_cache.block_table("b")[1] != 1


def test_lru_eviction_order() -> None:
    sched = make_scheduler(num_blocks=6)
    for rid, base in (("a", 100), ("b", 200)):
        sched.add_request(req(rid, list(range(base, base + 8))))
        step(sched)
        sched.finish(rid, RequestStatus.FINISHED_STOPPED)
    pool = sched.kv_cache.pool
    # a computed 8 tokens in blocks [0, 1] and freed them tail first behind the never-used 2..5;
    # b then took [2, 3] from the front and freed them the same way: least recently used is in front
    assert pool.free_block_ids() == [4, 5, 1, 0, 3, 2]
    assert all(pool.block_hash(b) is not None for b in (0, 1, 2, 3))
    # a 16-token request takes 4 blocks from the front: 4 and 5 were empty, 1 and 0 evict a's prefix
    sched.add_request(req("c", list(range(300, 316))))
    step(sched)
    assert sched.kv_cache.block_table("c") == [4, 5, 1, 0]
    assert pool.num_evictions == 2
    sched.finish("c", RequestStatus.FINISHED_STOPPED)
    sched.add_request(req("d", list(range(200, 208)) + [1]))
    assert step(sched)["d"] == 1  # b's 8 tokens are still cached
    assert sched.kv_cache.block_table("d")[:2] == [2, 3]
    sched.finish("d", RequestStatus.FINISHED_STOPPED)
    sched.add_request(req("e", list(range(100, 108)) + [1]))
    assert step(sched)["e"] == 9  # a's prefix is gone


def test_preempted_request_hits_its_own_blocks_on_resume() -> None:
    sched = make_scheduler(num_blocks=6)
    a, b = req("a", list(range(100, 108))), req("b", list(range(200, 208)))
    sched.add_request(a)
    sched.add_request(b)
    for _ in range(5):  # prefill (2 blocks each), then 4 decodes: 12 tokens computed, 3 full blocks each
        step(sched)
    assert sched.kv_cache.num_free_blocks == 0 and b.num_tokens == 13
    plan = sched.schedule()  # a needs a 4th block: b is preempted, its full blocks stay cached
    assert plan.preempted_request_ids == ("b",)
    # a's 4th block was b's tail block (freed tail first, so evicted first): 8 of b's 13 tokens are still cached
    assert sched.kv_cache.block_table("a") == [0, 1, 4, 5]
    sched.update(plan)
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert step(sched) == {"b": 5}
    assert b.num_cached_tokens == 8


def test_fork_shares_full_blocks_and_copies_the_partial_one() -> None:
    sched = make_scheduler(caching=False)
    parent, child = req("p", PROMPT), req("c", PROMPT, fork_of="p")
    sched.add_request(parent)
    sched.add_request(child)
    assert step(sched) == {"p": 10}  # the child waits for its sibling's prompt
    plan = sched.schedule()
    # child shares blocks 0, 1 (tokens 0-7); block 2 (tokens 8, 9) is copied to a fresh block
    assert [(s.request_id, s.num_tokens) for s in plan.seqs] == [("p", 1), ("c", 1)]
    assert plan.block_copies == ((2, 3),)
    assert sched.kv_cache.block_table("c") == [0, 1, 3]
    assert [sched.kv_cache.pool.ref_count(b) for b in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert child.num_computed_tokens == 9 and child.num_cached_tokens == 9
    sched.update(plan)
    for rid in ("p", "c"):
        sched.finish(rid, RequestStatus.FINISHED_STOPPED)
    assert sched.kv_cache.num_free_blocks == 16


def test_pool_share_rejects_plain_free_block() -> None:
    pool = BlockPool(2)
    with pytest.raises(ValueError):
        pool.share(0)


# ---- on the real model ---------------------------------------------------------------------------------------

SYSTEM = ("You are a meticulous assistant for a hardware store. Answer briefly and politely. Our store opens at "
          "8am and closes at 6pm, sells tools, paint, garden supplies and lumber, and offers free delivery over "
          "fifty dollars within ten miles. ") * 3
QUESTIONS = ["When do you open?", "Do you sell paint?", "Is delivery free?", "What do you sell?",
             "Can I buy lumber?", "When do you close?"]


def run(llm: LLM, prompts: list[str], max_tokens: int = 24) -> list[list[int]]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm_nocache(model_path) -> LLM:
    return LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=512, enable_prefix_caching=False)


def test_shared_prefix_outputs_identical_with_cache_on_and_off(llm_fp32, llm_nocache) -> None:
    chats = [llm_fp32.tokenizer.apply_chat_template([{"role": "system", "content": SYSTEM},
                                                     {"role": "user", "content": q}]) for q in QUESTIONS]
    before = llm_fp32.engine.stats().prefix_cache.hits
    expected = run(llm_nocache, chats)
    assert run(llm_fp32, chats[:1]) == expected[:1]  # warms the cache with the system prompt
    assert run(llm_fp32, chats[1:]) == expected[1:]
    ids = [llm_fp32.tokenizer.encode(c) for c in chats]
    shared = min(next(i for i, (x, y) in enumerate(zip(ids[0], other, strict=False)) if x != y) for other in ids[1:])
    assert shared > 140  # the system prompt
    assert llm_fp32.engine.stats().prefix_cache.hits - before >= 5 * (shared // 16 * 16)
    assert llm_nocache.engine.stats().prefix_cache.hits == 0


def test_multi_turn_reuses_generated_tokens(llm_fp32, llm_nocache) -> None:
    tok = llm_fp32.tokenizer
    messages = [{"role": "user", "content": "Name three rivers in Europe."}]
    for turn in range(3):
        prompt = tok.apply_chat_template(messages)
        [cold] = llm_nocache.generate(prompt, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
        [warm] = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=32), use_tqdm=False)
        assert warm.token_ids == cold.token_ids
        if turn > 0:
            # everything up to the previous answer (minus the partial last block) came from the cache
            assert warm.outputs[0].token_ids and llm_fp32.engine.stats().prefix_cache.hits > 0
        messages += [{"role": "assistant", "content": warm.text}, {"role": "user", "content": "And one more?"}]


def test_multi_turn_hit_counts_tokens_of_the_previous_turn(llm_fp32) -> None:
    engine = llm_fp32.engine
    prompt = llm_fp32.tokenizer.encode("A long story about a lighthouse keeper and the sea. " * 4)
    [first] = llm_fp32.generate(prompt, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True),
                                use_tqdm=False)
    follow_up = prompt + first.token_ids + llm_fp32.tokenizer.encode(" Then what?")
    rid = engine.add_request(follow_up, SamplingParams(temperature=0, max_tokens=1))
    outs = []
    while engine.has_unfinished_requests():
        outs += [o for o in engine.step() if o.request_id == rid]
    # prompt and generated tokens whose KV was computed last turn are reused, whole blocks only
    reusable = (len(prompt) + len(first.token_ids) - 1) // 16 * 16
    assert outs[-1].num_cached_tokens == reusable


def peak_blocks_used(llm: LLM) -> int:
    peak = 0
    while llm.engine.has_unfinished_requests():
        llm.engine.step()
        stats = llm.engine.stats()
        peak = max(peak, stats.num_total_blocks - stats.num_free_blocks)
    return peak


def test_n_samples_share_prompt_blocks(model_path) -> None:
    prompt = "Write a long story about dragons. " * 8  # ~64 tokens: 4 blocks
    forked = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, enable_prefix_caching=False)
    for i, params in enumerate(fan_out(SamplingParams(n=4, temperature=1.0, seed=3, max_tokens=8, ignore_eos=True))):
        forked.engine.add_request(prompt, params, f"s{i}", fork_of="s0" if i else None)
    peak_forked = peak_blocks_used(forked)
    separate = LLM(str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, enable_prefix_caching=False)
    for i in range(4):
        separate.engine.add_request(prompt, SamplingParams(temperature=1.0, seed=3 + i, max_tokens=8, ignore_eos=True))
    peak_separate = peak_blocks_used(separate)
    assert peak_forked < peak_separate
    for llm in (forked, separate):
        assert llm.engine.stats().num_free_blocks == llm.engine.stats().num_total_blocks


def test_n_samples_via_generate_match_separate_seeded_requests(llm_fp32) -> None:
    # a fork reuses its sibling's prompt KV; the tokens must be those of an unforked request with the same seed
    params = SamplingParams(n=3, temperature=0.8, seed=11, max_tokens=12, ignore_eos=True)
    [result] = llm_fp32.generate("Tell me about the moon.", params, use_tqdm=False)
    for i, completion in enumerate(result.outputs):
        single = SamplingParams(temperature=0.8, seed=11 + i, max_tokens=12, ignore_eos=True)
        assert completion.token_ids == llm_fp32.generate("Tell me about the moon.", single,
                                                         use_tqdm=False)[0].token_ids


def test_reset_cache_refused_while_blocks_in_use() -> None:
    sched = make_scheduler()
    sched.add_request(req("a", PROMPT))
    step(sched)
    assert not sched.kv_cache.pool.reset_cache()
    sched.finish("a", RequestStatus.FINISHED_STOPPED)
    assert sched.kv_cache.pool.reset_cache()
    sched.add_request(req("b", PROMPT))
    assert step(sched) == {"b": 10}  # nothing cached any more
