from __future__ import annotations

import math

import pytest
import torch

from tokenmill.sampler.sampler import Sampler, SamplingRow, apply_penalties
from tokenmill.sampling_params import SamplingParams


def row(
    prompt: tuple[int, ...] = (),
    output: tuple[int, ...] = (),
    seed: int | None = None,
    blocked: tuple[int, ...] = (),
    **params: object,
) -> SamplingRow:
    sp = SamplingParams(seed=seed, **params)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    return SamplingRow(params=sp, prompt_token_ids=prompt, output_token_ids=output, generator=gen,
                       blocked_token_ids=blocked)


def sample_many(logits_row: list[float], n: int, **params: object) -> list[int]:
    """Draws n tokens from the same distribution in one batch; global RNG seeded so results are fixed."""
    torch.manual_seed(1234)
    logits = torch.tensor([logits_row], dtype=torch.float32).expand(n, -1).contiguous()
    return Sampler()(logits, [row(**params) for _ in range(n)]).token_ids


def test_greedy_is_argmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(5, 50)
    out = Sampler()(logits, [row(temperature=0.0) for _ in range(5)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_bf16_and_slow_path_agree() -> None:
    torch.manual_seed(0)
    logits = torch.randn(4, 30).to(torch.bfloat16)
    fast = Sampler()(logits, [row(temperature=0.0) for _ in range(4)]).token_ids
    # A random row forces the general path; greedy rows must still be the plain argmax.
    rows = [row(temperature=0.0) for _ in range(3)] + [row(temperature=1.0)]
    slow = Sampler()(logits, rows).token_ids
    assert slow[:3] == fast[:3] == logits.float().argmax(dim=-1).tolist()[:3]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_ties_pick_the_first_maximum(dtype: torch.dtype) -> None:
    # Few distinct values: most rows hold several maxima, and greedy must name the first, as argmax does.
    torch.manual_seed(0)
    logits = torch.randint(0, 4, (64, 49152)).to(dtype)
    logits[0, 100] = logits[0, 40000] = 9.0
    out = Sampler()(logits, [row(temperature=0.0) for _ in range(64)]).token_ids
    assert out == logits.float().argmax(dim=-1).tolist()
    assert out[0] == 100


def test_greedy_independent_of_batch() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 40)
    rows = [row(temperature=0.0), row(temperature=0.8), row(temperature=0.0, repetition_penalty=1.3, output=(1, 2)),
            row(temperature=1.0, top_k=3), row(temperature=0.0, logprobs=2), row(temperature=0.5, seed=3)]
    batched = Sampler()(logits, rows).token_ids
    for i in (0, 2, 4):
        alone = Sampler()(logits[i:i + 1], [rows[i]]).token_ids
        assert alone[0] == batched[i]


def test_top_k_limits_support() -> None:
    logits = [0.0, 3.0, 1.0, 2.5, -1.0, 2.0, 0.5, 1.5]
    seen = set(sample_many(logits, 4000, temperature=1.0, top_k=3))
    assert seen == {1, 3, 5}


def test_top_p_nucleus() -> None:
    # probs 0.5, 0.25, 0.125, 0.0625, 0.0625: mass before token 2 is 0.75 < 0.8, before token 3 is 0.875 >= 0.8.
    logits = [math.log(p) for p in (0.5, 0.25, 0.125, 0.0625, 0.0625)] + [-math.inf]
    seen = set(sample_many(logits, 4000, temperature=1.0, top_p=0.8))
    assert seen == {0, 1, 2}
    seen = set(sample_many(logits, 4000, temperature=1.0, top_p=0.7))
    assert seen == {0, 1}


def test_top_p_keeps_top_token() -> None:
    logits = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5]
    seen = set(sample_many(logits, 2000, temperature=1.0, top_p=1e-6))
    assert seen == {0}


def test_top_k_then_top_p_renormalises() -> None:
    # top-k=2 leaves probs 2/3, 1/3 of the pair; top_p=0.6 then keeps only the first.
    logits = [math.log(p) for p in (0.4, 0.2, 0.2, 0.2)]
    seen = set(sample_many(logits, 2000, temperature=1.0, top_k=2, top_p=0.6))
    assert seen == {0}


def test_min_p() -> None:
    # probs 0.4, 0.3, 0.15, 0.1, 0.05; threshold 0.3 * 0.4 = 0.12 keeps the first three.
    logits = [math.log(p) for p in (0.4, 0.3, 0.15, 0.1, 0.05)] + [-5.0, -6.0]
    seen = set(sample_many(logits, 4000, temperature=1.0, min_p=0.3))
    assert seen == {0, 1, 2}


def test_temperature_changes_support_through_min_p() -> None:
    # Low temperature sharpens: probs ratio of token 1 to token 0 drops below min_p.
    logits = [2.0, 1.0, 0.0, -1.0, -2.0, -3.0]
    assert set(sample_many(logits, 3000, temperature=1.0, min_p=0.3)) == {0, 1}
    assert set(sample_many(logits, 3000, temperature=0.5, min_p=0.3)) == {0}


def test_frequencies_match_softmax_batched() -> None:
    logits = [1.0, 0.5, -0.5, 0.0]
    tokens = sample_many(logits, 20000, temperature=1.0)
    expected = torch.softmax(torch.tensor(logits), dim=-1).tolist()
    for t, p in enumerate(expected):
        assert abs(tokens.count(t) / len(tokens) - p) < 0.02


def test_frequencies_match_softmax_seeded_and_temperature() -> None:
    logits = torch.tensor([[1.0, 0.5, -0.5, 0.0]])
    r = row(temperature=0.7, seed=99)
    sampler = Sampler()
    tokens = [sampler(logits, [r]).token_ids[0] for _ in range(20000)]
    expected = torch.softmax(logits[0] / 0.7, dim=-1).tolist()
    for t, p in enumerate(expected):
        assert abs(tokens.count(t) / len(tokens) - p) < 0.02


def test_filtered_frequencies_match_renormalised_probs() -> None:
    logits = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    tokens = sample_many(logits, 20000, temperature=1.0, top_k=2)
    assert abs(tokens.count(0) / 20000 - 4 / 7) < 0.02
    assert abs(tokens.count(1) / 20000 - 3 / 7) < 0.02


def _seeded_sequence(logits: torch.Tensor, position: int, make_batch: bool, seed: int) -> list[int]:
    """Draws 30 tokens for one seeded request, alone or inside a mixed batch at `position`."""
    sampler = Sampler()
    target = row(temperature=0.9, top_p=0.95, seed=seed)
    out = []
    for step in range(30):
        if make_batch:
            torch.manual_seed(step + 17)  # unseeded neighbours draw differently every time
            rows = [row(temperature=1.0), row(temperature=0.0), row(temperature=1.3, top_k=5),
                    row(temperature=1.0, seed=seed + 1)]
            rows.insert(position, target)
            batch_logits = torch.randn(len(rows), logits.shape[0])
            batch_logits[position] = logits
            out.append(sampler(batch_logits, rows).token_ids[position])
        else:
            out.append(sampler(logits.unsqueeze(0), [target]).token_ids[0])
    return out


def test_seeded_rows_independent_of_batch() -> None:
    logits = torch.linspace(-1.0, 1.0, 20)
    alone = _seeded_sequence(logits, 0, make_batch=False, seed=7)
    assert alone == _seeded_sequence(logits, 0, make_batch=True, seed=7)
    assert alone == _seeded_sequence(logits, 3, make_batch=True, seed=7)
    assert alone != _seeded_sequence(logits, 0, make_batch=False, seed=8)
    assert len(set(alone)) > 1  # the generator advances between steps


def test_apply_penalties_hand_computed() -> None:
    logits = torch.tensor([
        [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
        [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
        [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
    ])
    rows = [
        # repetition 2.0 on prompt {0, 1} and output {3}: positives halved, negatives doubled.
        row(prompt=(0, 1), output=(3,), repetition_penalty=2.0),
        # presence 0.5 once for tokens 2 and 5; frequency 0.25 per occurrence (token 2 twice, token 5 once).
        row(prompt=(4,), output=(2, 2, 5), presence_penalty=0.5, frequency_penalty=0.25),
        row(prompt=(0,), output=(0,)),  # no penalties: untouched
    ]
    expected = torch.tensor([
        [1.0, -2.0, 0.5, 1.5, -2.0, 1.0],
        [2.0, -1.0, 0.5 - 0.5 - 0.5, 3.0, -2.0, 1.0 - 0.5 - 0.25],
        [2.0, -1.0, 0.5, 3.0, -2.0, 1.0],
    ])
    original = logits.clone()
    out = apply_penalties(logits, rows)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close(logits, original)  # input untouched


def test_apply_penalties_combined_and_prompt_not_counted_for_frequency() -> None:
    logits = torch.tensor([[1.0, -1.0, 2.0, 0.0]])
    r = row(prompt=(1, 2, 2), output=(0, 0, 1), repetition_penalty=1.5, presence_penalty=0.1,
            frequency_penalty=0.2)
    # token 0: 1/1.5 - 0.1 - 0.4; token 1: -1*1.5 - 0.1 - 0.2; token 2 (prompt only): 2/1.5; token 3 unseen.
    expected = torch.tensor([[1 / 1.5 - 0.5, -1.5 - 0.3, 2 / 1.5, 0.0]])
    torch.testing.assert_close(apply_penalties(logits, [r]), expected)


def test_penalties_change_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.9, 0.0, 0.0]])
    assert Sampler()(logits, [row(temperature=0.0, output=(0,))]).token_ids == [0]
    assert Sampler()(logits, [row(temperature=0.0, output=(0,), frequency_penalty=0.5)]).token_ids == [1]


def test_blocked_tokens_never_chosen() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 4.0]])
    assert Sampler()(logits, [row(temperature=0.0, blocked=(0,))]).token_ids == [3]
    seen = set(sample_many([5.0, 1.0, 0.0, 4.0, 4.5], 3000, temperature=2.0, blocked=(0, 4)))
    assert seen == {1, 2, 3}


def test_blocking_never_leaves_a_row_without_tokens() -> None:
    """A grammar mask that allows only the blocked token (end-of-sequence under min_tokens): the block yields."""
    inf = float("-inf")
    logits = torch.tensor([[inf, inf, inf, 2.0, inf], [1.0, inf, inf, 2.0, inf]])
    for temperature in (0.0, 1.0):
        rows = [row(temperature=temperature, blocked=(3,)), row(temperature=temperature, blocked=(3,))]
        assert Sampler()(logits, rows).token_ids == [3, 0]


def test_logit_bias_moves_greedy_and_sampled_choices() -> None:
    logits = torch.tensor([[5.0, 1.0, 0.0, 4.0]])
    assert Sampler()(logits, [row(temperature=0.0, logit_bias={2: 100.0})]).token_ids == [2]
    assert Sampler()(logits, [row(temperature=0.0, logit_bias={0: -100.0})]).token_ids == [3]
    # Beside a plain greedy row, and a biased row's logprobs are the raw logits' (OpenAI's and vLLM's meaning).
    out = Sampler()(logits.expand(2, -1), [row(temperature=0.0), row(temperature=0.0, logit_bias={1: 4.5},
                                                                      logprobs=1)])
    assert out.token_ids == [0, 1]
    lp = out.logprobs[1]
    assert lp is not None and lp.logprob == pytest.approx(torch.log_softmax(logits[0], -1)[1].item(), abs=1e-6)
    seen = set(sample_many([5.0, 1.0, 0.0, 4.0, 4.5], 3000, temperature=2.0, logit_bias={0: -100, 4: -100}))
    assert seen == {1, 2, 3}


def test_logit_bias_is_added_after_penalties_before_temperature_and_filters() -> None:
    """The sampling distribution (what speculative verification draws from, too) against a hand-made one."""
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 0.0]])
    params = {"temperature": 0.5, "presence_penalty": 1.0, "top_k": 3, "logit_bias": {3: 3.0, 1: -0.25}}
    probs = Sampler().probabilities(logits, [row(output=(0,), **params)])  # type: ignore[arg-type]
    adjusted = torch.tensor([2.0 - 1.0, 1.0 - 0.25, 0.5, -1.0 + 3.0, 0.0]) / 0.5
    kept = adjusted.clone()
    kept[adjusted < adjusted.topk(3).values[-1]] = float("-inf")
    assert torch.allclose(probs[0], torch.softmax(kept, dim=-1), atol=1e-6)
    assert probs[0, 3] > probs[0, 0]  # the bias outweighs the penalty's winner


def test_logit_bias_is_validated() -> None:
    from tokenmill.sampling_params import MAX_LOGIT_BIAS_TOKENS, InvalidRequestError

    for bad in ({-1: 1.0}, {3: 101.0}, {3: float("nan")}, {"3": 1.0}, {True: 1.0}, [3, 1.0],
                dict.fromkeys(range(MAX_LOGIT_BIAS_TOKENS + 1), 1.0)):
        with pytest.raises(InvalidRequestError) as info:
            SamplingParams(logit_bias=bad)  # type: ignore[arg-type]
        assert info.value.field == "logit_bias"
    SamplingParams(logit_bias={0: -100, 49151: 100.0})


def test_logprobs_are_raw_log_softmax() -> None:
    torch.manual_seed(0)
    logits = torch.randn(3, 12)
    rows = [row(temperature=0.0, logprobs=5, output=(0, 1), repetition_penalty=1.7),
            row(temperature=0.8, logprobs=0),
            row(temperature=1.0)]
    out = Sampler()(logits, rows)
    expected = torch.log_softmax(logits, dim=-1)
    assert out.logprobs[2] is None
    for i, k in ((0, 5), (1, 0)):
        lp = out.logprobs[i]
        assert lp is not None
        assert lp.token_id == out.token_ids[i]
        assert lp.logprob == pytest.approx(expected[i, lp.token_id].item(), abs=1e-5)
        assert len(lp.top) == k
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
        ref_vals, ref_ids = torch.topk(expected[i], k)
        assert [t for t, _ in lp.top] == ref_ids.tolist()
        for (_, v), ref in zip(lp.top, ref_vals.tolist(), strict=True):
            assert v == pytest.approx(ref, abs=1e-5)


def test_logprobs_bf16_computed_in_float32() -> None:
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5]], dtype=torch.bfloat16)
    out = Sampler()(logits, [row(temperature=0.0, logprobs=2)])
    lp = out.logprobs[0]
    assert lp is not None and lp.token_id == 2
    expected = torch.log_softmax(logits.float(), dim=-1)[0]
    assert lp.logprob == pytest.approx(expected[2].item(), abs=1e-5)
    assert [t for t, _ in lp.top] == [2, 1]


def test_row_count_mismatch_rejected() -> None:
    with pytest.raises(ValueError):
        Sampler()(torch.zeros(2, 4), [row()])


# ---- the filters without a full sort, and the draw ----


def _full_sort_reference(scaled: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """The filters by a full sort in float64: top-k, top-p over the top-k's renormalised probabilities (a token is
    kept while the mass before it is under top_p), min-p against the likeliest; the likeliest always kept."""
    out = torch.zeros(scaled.shape, dtype=torch.float64)
    for i, r in enumerate(rows):
        values, ids = torch.sort(scaled[i].double(), descending=True)
        k = r.params.top_k if r.params.top_k > 0 else len(values)
        probs = torch.softmax(values[:k], dim=-1)
        keep = (torch.cumsum(probs, 0) - probs < (r.params.top_p if r.params.top_p < 1 else 2.0))
        keep &= probs >= r.params.min_p * probs[0]
        keep[0] = True
        out[i, ids[:k][keep]] = torch.softmax(values[:k][keep], dim=-1)
    return out


@pytest.mark.parametrize("spread", [8.0, 1.0, 0.05])  # peaked (the first candidates), flat, near uniform
def test_filters_over_candidates_equal_a_full_sort(spread: float) -> None:
    from tokenmill.sampler.filters import CANDIDATES, filtered_probs

    vocab = 20000
    torch.manual_seed(0)
    settings = [dict(top_p=0.9), dict(top_p=0.5), dict(top_k=50, top_p=0.8), dict(top_k=300),
                dict(top_k=5000, top_p=0.95), dict(min_p=0.05), dict(min_p=0.5, top_p=0.99), dict(top_k=1),
                dict(top_p=0.999, min_p=1e-4)]
    rows = [row(temperature=1.0, **s) for s in settings]  # type: ignore[arg-type]
    scaled = torch.randn(len(rows), vocab) * spread
    got, want = filtered_probs(scaled, [r.params for r in rows]).double(), _full_sort_reference(scaled, rows)
    for i, r in enumerate(rows):
        differ = ((got[i] > 0) != (want[i] > 0)).nonzero().flatten().tolist()
        if not differ:
            assert torch.allclose(got[i], want[i], atol=1e-7, rtol=1e-5)
            continue
        # fp32 rounding may move a token that sits on the top-p boundary to float64's precision, nothing more
        probs = torch.softmax(scaled[i].double(), dim=-1)
        assert len(differ) == 1 and r.params.top_k == 0
        before = float(probs[probs > probs[differ[0]]].sum())
        assert abs(before - r.params.top_p) < 1e-5
    assert CANDIDATES[-1] < vocab  # the flat rows went through every level, the full sort included


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_rows_distribution_is_bitwise_the_same_in_any_batch(dtype: torch.dtype) -> None:
    """What a seeded request's tokens rest on: its distribution must not depend on what else is batched. Plain rows
    beside filtered ones went through the filters' path, and a row's candidate count followed the batch's largest
    top-k (both rounded the row differently; found by fuzz/server_consistency.py)."""
    settings = [dict(temperature=1.3), dict(temperature=0.7, top_p=0.9), dict(temperature=0.8, top_k=40),
                dict(temperature=1.3, min_p=0.2), dict(temperature=1.0, top_k=5000, top_p=0.95),
                dict(temperature=1.0, top_p=0.99), dict(temperature=0.9, presence_penalty=1.0, top_k=300)]
    torch.manual_seed(0)
    logits = (torch.randn(len(settings), 49152) * 3).to(dtype)
    sampler = Sampler()
    for i, setting in enumerate(settings):
        alone = sampler.probabilities(logits[i : i + 1], [row(output=(3, 4), **setting)])  # type: ignore[arg-type]
        for others in ([j for j in range(len(settings)) if j != i], [i - 1], [(i + 2) % len(settings), i - 3]):
            order = [*others[: len(others) // 2], i, *others[len(others) // 2 :]]
            rows = [row(output=(3, 4), **settings[j]) for j in order]  # type: ignore[arg-type]
            batched = sampler.probabilities(logits[order], rows)[order.index(i)]
            assert torch.equal(batched, alone[0]), (setting, [settings[j] for j in others])


def test_draw_follows_the_probabilities_and_never_picks_a_token_without_mass(monkeypatch) -> None:
    from tokenmill.sampler import filters

    probs = torch.tensor([[0.0, 0.2, 0.0, 0.5, 0.3, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(torch.cat([filters.draw(probs, [None], generator) for _ in range(6000)]), minlength=7)
    assert counts[[0, 2, 5, 6]].sum() == 0
    assert torch.allclose(counts.double() / 6000, probs[0].double(), atol=0.02)
    # A uniform within rounding of 1, an unnormalised row: the last token with mass, not the zeros after it.
    monkeypatch.setattr(filters.torch, "rand", lambda n, **kw: torch.full((n,), 1 - 2**-53, dtype=torch.float64))
    assert filters.draw(probs * 3.3, [None], None).tolist() == [4]
