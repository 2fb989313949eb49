"""Token trees (spec/tree.py): the shape's arithmetic, the scheduler's positions and trimming, the verifier's walk
(greedy paths, SpecInfer's multi-branch rule against the target distribution), the kernels' tree rows as one-row
decodes, and the engine end to end: greedy output identical to plain decoding, the accepted leaf's KV moved, no block
leaked."""

from __future__ import annotations

import pytest
import torch
from conftest import write_tiny_gguf
from test_spec_units import _chi_square_p, _emit, _row, _scheduler

from tokenmill import LLM, SamplingParams
from tokenmill.attention.fused_cpu import FusedCPUBackend
from tokenmill.config import EngineConfig
from tokenmill.kernels import cpu_kernels, isa
from tokenmill.request import Request
from tokenmill.runner.checks import InvalidPlanError, check_plan
from tokenmill.sampler.sampler import Sampler
from tokenmill.sampling_params import SamplingParams as Params
from tokenmill.scheduler.plan import SeqSamples, StepResult
from tokenmill.spec.tree import check_tree, children, depths, path_tokens, spine_length, visible_entries
from tokenmill.spec.verifier import verify

# A chain of three with leaves: one beside draft 0 (off row 0), two beside draft 1 (off row 1), one beside draft 2.
PARENTS = (0, 1, 2, 0, 1, 1, 2)
DRAFTS = (10, 11, 12, 20, 21, 22, 23)

# ---- the shape --------------------------------------------------------------------------------------------------


def test_tree_arithmetic() -> None:
    assert spine_length(PARENTS) == 3 and spine_length(()) == 0
    assert depths(PARENTS, 7) == [1, 2, 3, 1, 2, 2, 3] and depths((), 3) == [1, 2, 3]
    assert children(PARENTS, 7) == [[1, 4], [2, 5, 6], [3, 7], [], [], [], [], []]
    assert path_tokens(PARENTS, DRAFTS, 6) == [10, 22] and path_tokens(PARENTS, DRAFTS, 3) == [10, 11, 12]
    assert path_tokens((), DRAFTS[:3], 2) == [10, 11] and path_tokens(PARENTS, DRAFTS, 0) == []
    # the last real token's row at entry 40 + 2: each draft sees up to its parent's entry
    assert visible_entries(PARENTS, 40, 2, 7) == [43, 44, 45, 43, 44, 44, 45]
    check_tree(PARENTS, 7)
    check_tree((), 5)
    check_tree((0, 1, 1, 2), 4)  # leaves off rows 1 and 2
    for bad in ((0, 0, 2), (1,), (0, 2), (0, 1, 0, 4)):  # a leaf's child, parents not listed before their children
        with pytest.raises(ValueError, match="hangs off"):
            check_tree(bad, len(bad))
    with pytest.raises(ValueError, match="parents for"):
        check_tree((0, 1), 3)


def test_the_plan_positions_a_tree_by_depth_and_trims_it_from_the_end() -> None:
    sched = _scheduler(budget=7)
    a = Request("a", [1, 2, 3, 4, 5], SamplingParams(max_tokens=50))
    sched.add_request(a)
    _emit(sched, {"a": [6]})
    a.draft_token_ids, a.draft_parents = list(DRAFTS), list(PARENTS)
    plan = sched.schedule()
    [seq] = plan.seqs
    # 7 rows of budget: the last real token and six drafts, the deepest leaf trimmed
    assert seq.draft_token_ids == DRAFTS[:6] and seq.draft_parents == PARENTS[:6]
    assert plan.positions == (5, 6, 7, 8, 6, 7, 7)
    assert seq.visible_entries() == [5, 6, 7, 8, 6, 7, 7]
    assert a.draft_token_ids == [] and a.draft_parents == []
    check_plan(plan, 16, 4)
    # the leaf beside draft 1 accepted (row 5): entries past 5 + 1 + 2 roll back as for a chain
    sched.update(plan, StepResult([SeqSamples("a", [10, 21, 30], [None] * 3)]))
    assert a.num_computed_tokens == 8 and sched.kv_cache.num_entries("a") == 8


def test_a_plan_with_a_tree_of_another_shape_is_refused() -> None:
    sched = _scheduler()
    a = Request("a", [1, 2, 3], SamplingParams(max_tokens=50))
    sched.add_request(a)
    _emit(sched, {"a": [4]})
    a.draft_token_ids, a.draft_parents = [5, 6, 7], [0, 0, 2]  # draft 2 hangs off the leaf draft 1
    with pytest.raises(InvalidPlanError, match="hangs off"):
        check_plan(sched.schedule(), 16, 4)


# ---- the verifier -----------------------------------------------------------------------------------------------


def _choices(tokens: list[int], vocab: int = 40) -> torch.Tensor:
    logits = torch.full((len(tokens), vocab), -5.0)
    for r, t in enumerate(tokens):
        logits[r, t] = 5.0
    return logits


def test_greedy_walks_down_the_tree_to_a_leaf() -> None:
    rows = [_row(temperature=0.0) for _ in range(8)]
    # row 0 picks 10 (draft 0, row 1); row 1 picks 22 (the leaf at row 6); row 6 picks 33: the bonus after the leaf
    [v] = verify(Sampler(), _choices([10, 22, 0, 0, 0, 0, 33, 0]), rows, [DRAFTS], [PARENTS])
    assert (v.token_ids, v.path) == ([10, 22, 33], [1, 6])
    # the whole chain, then row 3's choice
    [v] = verify(Sampler(), _choices([10, 11, 12, 5, 0, 0, 0, 0]), rows, [DRAFTS], [PARENTS])
    assert (v.token_ids, v.path) == ([10, 11, 12, 5], [1, 2, 3])
    # the leaf beside draft 0, and nothing matching: the target's own token
    [v] = verify(Sampler(), _choices([20, 0, 0, 0, 7, 0, 0, 0]), rows, [DRAFTS], [PARENTS])
    assert (v.token_ids, v.path) == ([20, 7], [4])
    [v] = verify(Sampler(), _choices([9] * 8), rows, [DRAFTS], [PARENTS])
    assert (v.token_ids, v.path) == ([9], [])


@pytest.mark.parametrize("branches", [(0, 2), (2, 3), (3, 0)])
def test_multi_branch_sampling_emits_the_target_distribution(branches: tuple[int, int]) -> None:
    """Two guesses for the same position (a chain token and a leaf beside it): the first emitted token follows p
    whichever tokens they are."""
    probs = torch.tensor([0.45, 0.25, 0.2, 0.1])
    logits = probs.log().expand(3, -1).contiguous()
    sampler = Sampler(generator=torch.Generator().manual_seed(3))
    rows = [_row(temperature=1.0)] * 3
    counts = [0] * 4
    for _ in range(4000):
        [v] = verify(sampler, logits, rows, [list(branches)], [(0, 0)])
        counts[v.token_ids[0]] += 1
        assert v.path in ([], [1], [2]) and len(v.token_ids) == len(v.path) + 1
    assert _chi_square_p(counts, probs.tolist()) > 0.001


def test_a_one_child_tree_samples_as_the_chain_does() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 20)
    chain = verify(Sampler(), logits, [_row(seed=5, temperature=1.0) for _ in range(3)], [[1, 2]])
    tree = verify(Sampler(), logits, [_row(seed=5, temperature=1.0) for _ in range(3)], [[1, 2]], [(0, 1)])
    assert chain[0].token_ids == tree[0].token_ids


# ---- the kernel -------------------------------------------------------------------------------------------------

BLOCK = 16


@pytest.mark.parametrize("level", isa.supported_levels(isa.cpu_flags()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_rows_are_one_row_decodes_of_their_visible_entries(level: str, dtype: torch.dtype) -> None:
    build = cpu_kernels(level)
    assert build.module is not None, build.error
    kernels = build.module
    gen = torch.Generator().manual_seed(7)
    heads, kv_heads, dim = 6, 2, 64
    # a tree of 8 rows after 37 cached entries, a plain 3-row verify and a decode beside it
    sequences = [(45, 8), (30, 3), (12, 1)]
    num_blocks = 12
    tables = [[3, 7, 1], [0, 9], [5]]
    k_cache = torch.randn(kv_heads, num_blocks * BLOCK, dim, generator=gen).to(dtype)
    v_cache = torch.randn(kv_heads, num_blocks * BLOCK, dim, generator=gen).to(dtype)
    starts = [0, 8, 11, 12]
    q = torch.randn(12, heads, dim, generator=gen).to(dtype)
    slots = [tables[s][e // BLOCK] * BLOCK + e % BLOCK for s, (ctx, n) in enumerate(sequences)
             for e in range(ctx - n, ctx)]
    k = k_cache[:, slots].transpose(0, 1).contiguous()
    v = v_cache[:, slots].transpose(0, 1).contiguous()
    padded = torch.tensor([t + [0] * (3 - len(t)) for t in tables])
    visible = [37, *visible_entries(PARENTS, 37, 0, 7), -1, -1, -1, -1]
    got = kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts), padded,
                                  torch.tensor([c for c, _ in sequences]), BLOCK,
                                  row_visible=torch.tensor(visible))
    for s, (ctx, n) in enumerate(sequences):
        for j in range(n):
            row = starts[s] + j
            seen = visible[row] if visible[row] >= 0 else ctx - n + j
            alone = kernels.paged_attention(q[row:row + 1], k[row:row + 1], v[row:row + 1], k_cache, v_cache,
                                            torch.tensor([0, 1]), padded[s:s + 1], torch.tensor([seen + 1]), BLOCK)
            assert torch.equal(got[row], alone[0]), f"sequence {s}, row {j}"
    with pytest.raises(RuntimeError, match="cannot see"):
        kernels.paged_attention(q, k, v, k_cache, v_cache, torch.tensor(starts), padded,
                                torch.tensor([c for c, _ in sequences]), BLOCK,
                                row_visible=torch.tensor([40] + visible[1:]))


# ---- the engine -------------------------------------------------------------------------------------------------

VOCAB = 300
META = {"tokenizer.ggml.merges": [], "tokenizer.ggml.eos_token_id": 0}
GREEDY = Params(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tree")
    shape = {"hidden": 256, "heads": 4, "kv_heads": 2, "ff": 256, "vocab": VOCAB, "context": 1024, "metadata": META}
    return (write_tiny_gguf(folder / "target.gguf", layers=2, **shape),
            write_tiny_gguf(folder / "draft.gguf", layers=1, **shape))


def _prompts() -> list[list[int]]:
    return [[(31 * j + 11 * i) % (VOCAB - 1) + 1 for j in range(20 + 13 * i)] for i in range(6)]


def _llm(target, draft=None, **options) -> LLM:
    base = {"dtype": "float32", "device": "cpu", "num_kv_blocks": 256, "block_size": 16}
    if draft is not None:
        base |= {"speculative": "draft", "speculative_model": str(draft), "num_speculative_tokens": 4,
                 "speculative_adaptive": False}
    return LLM(str(target), **(base | options))


@pytest.fixture(scope="module")
def reference(pair) -> list[list[int]]:
    return [r.token_ids for r in _llm(pair[0]).generate(_prompts(), GREEDY, use_tqdm=False)]


@pytest.mark.parametrize(("width", "options"), [
    (2, {}), (3, {}), (3, {"enforce_eager": True}), (2, {"max_num_batched_tokens": 24}),
    (3, {"num_kv_blocks": 14}),
], ids=["width2", "width3", "eager", "chunked", "preempted"])
def test_trees_keep_greedy_output_identical(pair, reference, width, options, monkeypatch) -> None:
    llm = _llm(*pair, speculative_tree_width=width, **options)
    runner = llm.engine.runner
    if not options.get("enforce_eager"):
        assert isinstance(runner.backend, FusedCPUBackend) or pytest.skip("fused CPU step not built here")
    moved: list[list[int]] = []
    keep = runner._keep_path
    monkeypatch.setattr(runner, "_keep_path", lambda seq, path, slots: (moved.append(path), keep(seq, path, slots)))
    assert [r.token_ids for r in llm.generate(_prompts(), GREEDY, use_tqdm=False)] == reference
    # some steps accepted a leaf (a path that leaves the chain), whose K/V had to move
    assert any(path and path[-1] != len(path) for path in moved)
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and not llm.engine.has_unfinished_requests()
    proposer = llm.engine.speculator.proposer
    assert proposer.pool.num_free_blocks == proposer.pool.num_blocks


@pytest.mark.parametrize("sinks", [4, 0], ids=["sinks", "window-only"])
def test_trees_under_a_streaming_window_keep_greedy_output_identical(pair, sinks, monkeypatch) -> None:
    """Accepted leaves move within a window's blocks as within any plain cache, and drafts evict nothing that the
    real token alone would not (kv/streaming.py), well past the window's capacity."""
    window = dict(sliding_window=48, attention_sinks=sinks, max_num_batched_tokens=512)
    params = Params(temperature=0, max_tokens=120, ignore_eos=True)
    want = [r.token_ids for r in _llm(pair[0], **window).generate(_prompts(), params, use_tqdm=False)]
    llm = _llm(*pair, speculative_tree_width=3, **window)
    moved: list[list[int]] = []
    keep = llm.engine.runner._keep_path
    monkeypatch.setattr(llm.engine.runner, "_keep_path",
                        lambda seq, path, slots: (moved.append(path), keep(seq, path, slots)))
    assert [r.token_ids for r in llm.generate(_prompts(), params, use_tqdm=False)] == want
    assert any(path and path[-1] != len(path) for path in moved)  # leaves were accepted and moved
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.parametrize("kv_cache_dtype", ["int8", "int4"])
def test_trees_over_a_quantized_cache_keep_greedy_output_identical(pair, kv_cache_dtype, monkeypatch) -> None:
    """A tree's rows stay in the open block (drafts never fill one), which lives in the request's full-precision
    residual slot: the quantized kernels attend each row over its own visible entries, accepted leaves move there."""
    options = dict(kv_cache_dtype=kv_cache_dtype, max_num_seqs=8)
    want = [r.token_ids for r in _llm(pair[0], **options).generate(_prompts(), GREEDY, use_tqdm=False)]
    llm = _llm(*pair, speculative_tree_width=3, **options)
    moved: list[list[int]] = []
    keep = llm.engine.runner._keep_path
    monkeypatch.setattr(llm.engine.runner, "_keep_path",
                        lambda seq, path, slots: (moved.append(path), keep(seq, path, slots)))
    assert [r.token_ids for r in llm.generate(_prompts(), GREEDY, use_tqdm=False)] == want
    assert any(path and path[-1] != len(path) for path in moved)
    llm.engine.step()  # an empty step hands the runner the last finished ids
    stats = llm.engine.stats()
    assert stats.num_free_blocks == stats.num_total_blocks and llm.engine.kv_cache.num_held == 0


def test_a_tree_accepts_more_per_step_than_its_chain(pair) -> None:
    """The same draft, chain against tree: the leaves only add chances, so tokens per verify step do not drop."""
    accepted = {}
    for width in (1, 3):
        llm = _llm(*pair, speculative_tree_width=width)
        llm.generate(_prompts(), GREEDY, use_tqdm=False)
        accepted[width] = llm.engine.stats().spec_decode.mean_accepted_length
    assert accepted[3] > accepted[1]


def test_sampling_with_trees_keeps_the_target_distribution(pair) -> None:
    """The first sampled token of one prompt, with trees and without speculation: the same distribution."""
    params = SamplingParams(temperature=1.0, max_tokens=4, ignore_eos=True)
    prompt = _prompts()[0]
    counts = {}
    for name, llm in (("plain", _llm(pair[0], seed=1)), ("tree", _llm(*pair, speculative_tree_width=3, seed=2))):
        tokens = [r.token_ids[1] for r in llm.generate([prompt] * 600, params, use_tqdm=False)]
        counts[name] = torch.bincount(torch.tensor(tokens), minlength=VOCAB).double()
    # two-sample chi-square over the tokens either drew at least 10 times
    keep = (counts["plain"] + counts["tree"]) >= 10
    a, b = counts["plain"][keep], counts["tree"][keep]
    stat = float(((a - b) ** 2 / (a + b)).sum())
    dof = int(keep.sum()) - 1
    assert dof >= 2 and stat < dof + 4 * (2 * dof) ** 0.5


def test_seeded_sampling_with_trees_gives_the_tokens_without_drafts(pair) -> None:
    """A reached row's draw picks the child it equals, so a seeded request's tokens are those it samples without
    speculation (spec/verifier.py)."""
    params = [SamplingParams(temperature=0.7, top_k=3, max_tokens=30, ignore_eos=True, seed=i) for i in range(6)]
    want = [r.token_ids for r in _llm(pair[0]).generate(_prompts(), params, use_tqdm=False)]
    llm = _llm(*pair, speculative_tree_width=3)
    assert [r.token_ids for r in llm.generate(_prompts(), params, use_tqdm=False)] == want
    assert llm.engine.stats().spec_decode.num_accepted_tokens > 0


def test_tree_width_is_checked() -> None:
    with pytest.raises(ValueError, match="needs a draft model"):
        EngineConfig(model="m", speculative="ngram", speculative_tree_width=2)
    for combines in (dict(kv_cache_dtype="int8"), dict(sliding_window=64)):
        EngineConfig(model="m", speculative="self", speculative_tree_width=2, **combines)
    with pytest.raises(ValueError, match=">= 1"):
        EngineConfig(model="m", speculative_tree_width=0)
