"""Replays of prompt-lookup drafting (tokenmill/bench/lookup_replay.py): exact step counts on hand-made outputs."""

from __future__ import annotations

import random

import pytest

from tokenmill.bench.lookup_replay import copy_bound, lookup_branches, replay_chain, replay_tree, tree_rows
from tokenmill.spec.ngram import NgramProposer


def linear_cost(rows: int) -> float:
    return 1.0 + 0.1 * (rows - 1)


def ngram_guess(min_n: int, max_n: int):
    proposer = NgramProposer(min_n, max_n)
    return lambda tokens, k: proposer.propose("r", tokens, (), k)


def test_chain_copies_a_run_in_one_step():
    prompt, output = [10, 1, 2, 3, 4, 5, 6, 11], [1, 2, 3, 4, 5, 6, 9]
    r = replay_chain(prompt, output, ngram_guess(1, 4), 5, linear_cost, adaptive=False)
    # After the first token (from the prefill) the 1-gram "1" finds 2..6: all five accepted, the step adds 9 itself.
    assert (r.steps, r.rows, r.tokens, r.drafted, r.accepted) == (1, 6, 6, 5, 5)
    assert r.plain_seconds == pytest.approx(6.0) and r.seconds == pytest.approx(1.5)
    assert r.speedup == pytest.approx(4.0) and r.tokens_per_step == 6


def test_chain_without_matches_is_plain_decoding():
    r = replay_chain([1, 2, 3], [4, 5, 6, 7], ngram_guess(2, 4), 5, linear_cost)
    assert (r.steps, r.rows, r.drafted, r.tokens) == (3, 3, 0, 3)
    assert r.speedup == pytest.approx(1.0)


def test_branches_longest_suffix_first_most_recent_first_distinct():
    tokens = [5, 1, 7, 5, 1, 8, 5, 1]
    assert lookup_branches(tokens, 3, 2, 1, 2) == [[8, 5], [7, 5]]
    assert lookup_branches(tokens, 1, 2, 1, 2) == [[8, 5]]
    assert lookup_branches([1, 2, 3], 4, 2, 1, 2) == []
    assert tree_rows([[8, 5], [7, 5]]) == 5
    assert tree_rows([[8, 5], [8, 6]]) == 4  # the shared first token is one row
    assert tree_rows([]) == 1


def test_tree_of_width_one_is_the_engines_chain():
    rng = random.Random(0)
    for _ in range(20):
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 40))]
        output = [rng.randrange(6) for _ in range(rng.randrange(2, 40))]
        chain = replay_chain(prompt, output, ngram_guess(1, 4), 5, linear_cost, adaptive=False)
        tree = replay_tree(prompt, output, 1, 5, 1, 4, linear_cost)
        assert chain == tree


def test_no_lookup_drafter_beats_the_copy_bound():
    # Every accepted lookup draft is a run of the context, and from a later position the longest such run reaches
    # at least as far, so taking the longest run at every step needs the fewest steps.
    rng = random.Random(1)
    for _ in range(20):
        prompt = [rng.randrange(5) for _ in range(30)]
        output = [rng.randrange(5) for _ in range(30)]
        bound = copy_bound(prompt, output, 5).steps
        for width in (1, 2, 4, 8):
            assert bound <= replay_tree(prompt, output, width, 5, 1, 4, linear_cost).steps


def test_copy_bound_counts_runs_found_anywhere():
    r = copy_bound([1, 2, 3], [1, 2, 3, 4], 5)
    assert (r.steps, r.tokens) == (1, 3)  # 2 and 3 copied, 4 the step's own
