"""One step's token masks: which tokens each grammar-bound sample row may take, filled from the requests' matchers
(on a worker thread, while the model runs) and applied to the logits before sampling."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import llguidance
import llguidance.torch as llg_torch
import numpy as np
import torch

from tokenmill.request import Request
from tokenmill.scheduler.plan import StepPlan
from tokenmill.spec.tree import path_tokens, spine_length
from tokenmill.structured.grammar import GrammarCompiler, Matcher


@dataclass
class StructuredOutputStats:
    num_requests: int = 0  # requests added with a grammar
    num_compiled: int = 0  # constraints compiled (successfully or not)
    num_cache_hits: int = 0  # requests whose grammar was already compiled


@dataclass(frozen=True)
class TokenMasks:
    """`rows`: indices into the step's sample rows (as `StepPlan.sample_indices` orders them); `bitmask`: int32
    [len(rows), ceil(vocab / 32)], bit j of word w set where token 32 w + j is allowed."""

    rows: torch.Tensor
    bitmask: torch.Tensor

    def apply(self, logits: torch.Tensor) -> None:
        """Sets the disallowed tokens' logits to -inf, in place."""
        vocab = logits.shape[1]
        # Little-endian words: token 32 w + j is bit j % 8 of byte 4 w + j // 8, so unpacking the bytes
        # least-significant bit first lists the tokens in order.
        bits = np.unpackbits(self.bitmask.numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
        banned = torch.from_numpy(bits).eq(0).to(logits.device)
        if len(self.rows) == logits.shape[0]:  # every row has a grammar (rows are in order): no gather/scatter
            logits.masked_fill_(banned, float("-inf"))
            return
        rows = self.rows.to(logits.device)
        logits[rows] = logits[rows].masked_fill(banned, float("-inf"))


class StructuredOutputManager:
    """Fills the masks of a step's grammar-bound sequences: row 0 from the matcher's state, row i + 1 after the
    drafts on the way to it (a chain's first i + 1; a tree's path, spec/tree.py), which `trim_drafts` has cut to
    what the grammar allows.

    `overlap`: fill on a worker thread while the model runs (llguidance releases the GIL); off, they are filled
    before the step, on the engine thread."""

    def __init__(self, compiler: GrammarCompiler, overlap: bool = True, num_threads: int | None = None) -> None:
        self.compiler = compiler
        self._executor = llguidance.LLExecutor(num_threads)
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenmill-masks") if overlap else None
        self.num_requests = 0

    def stats(self) -> StructuredOutputStats:
        return StructuredOutputStats(self.num_requests, self.compiler.num_compiled, self.compiler.num_cache_hits)

    @staticmethod
    def trim_drafts(requests: Iterable[Request]) -> None:
        """Drops each grammar-bound request's drafts that its grammar forbids: such a draft could never be accepted,
        and the rows after it would have no grammar state to mask with. A chain keeps its allowed prefix; a token
        tree keeps its spine's allowed prefix and the leaves its grammar allows where they hang."""
        for request in requests:
            if request.grammar is None or not request.draft_token_ids:
                continue
            if request.draft_parents:
                request.draft_token_ids, request.draft_parents = allowed_tree(
                    request.grammar, request.draft_token_ids, request.draft_parents)
            else:
                del request.draft_token_ids[request.grammar.num_valid(request.draft_token_ids):]

    def start(self, plan: StepPlan, lookup: Callable[[str], Request | None]) -> Future[TokenMasks] | None:
        """The masks of `plan`'s grammar-bound sample rows, being filled (None when no sampled row has a grammar).
        The matchers must not advance until the future is done."""
        entries, rows, row = [], [], 0
        for seq in plan.seqs:
            if not seq.num_samples:
                continue
            if seq.sampling is None or seq.sampling.params.structured_outputs is None:  # the plan says: no grammar
                row += seq.num_samples
                continue
            request = lookup(seq.request_id)
            if request is not None and request.grammar is not None:
                entries.append((request.grammar.inner, len(rows), list(seq.draft_token_ids), seq.draft_parents))
                rows.extend(range(row, row + seq.num_samples))
            row += seq.num_samples
        if not entries:
            return None
        index = torch.tensor(rows, dtype=torch.long)
        if self._worker is not None:
            return self._worker.submit(self._fill, entries, index)
        done: Future[TokenMasks] = Future()
        done.set_result(self._fill(entries, index))
        return done

    def _fill(self, entries: list[tuple[llguidance.LLMatcher, int, list[int], tuple[int, ...]]],
              rows: torch.Tensor) -> TokenMasks:
        bitmask = llg_torch.allocate_token_bitmask(len(rows), self.compiler.vocab_size)
        # The draft-token fill takes the chains (a tree's spine) and writes row 0 and one row per draft; sequences
        # without drafts take the plain fill, into the same bitmask; a tree's leaves are filled one by one after.
        drafted, plain, leaves = [], [], []
        for matcher, row, drafts, parents in entries:
            spine = spine_length(parents) if parents else len(drafts)
            if spine:
                drafted.append((matcher, row, drafts[:spine]))
            else:
                plain.append((matcher, row))
            leaves.extend((matcher, row, drafts, parents, i) for i in range(spine, len(drafts)))
        if drafted:
            llg_torch.fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, bitmask)
        if plain:
            llg_torch.fill_next_token_bitmask_par(self._executor, plain, bitmask)
        for matcher, row, drafts, parents, i in leaves:
            _fill_after(matcher, path_tokens(parents, drafts, i + 1), bitmask, row + i + 1)
        return TokenMasks(rows, bitmask)


def allowed_tree(grammar: Matcher, drafts: list[int], parents: list[int]) -> tuple[list[int], list[int]]:
    """A token tree (spec/tree.py) cut to what `grammar` allows from its current state: the spine's allowed prefix
    and, in their order, the leaves whose parent row was kept and whose token the grammar allows after that row.
    The result is a tree of the same shape (a leaf off the last kept spine row may continue the spine), or a chain
    (no parents) when no leaf is left."""
    spine = spine_length(parents)
    kept = grammar.num_valid(drafts[:spine])
    tokens, kept_parents = drafts[:kept], list(range(kept))
    for token, parent in zip(drafts[spine:], parents[spine:], strict=True):
        if parent <= kept and grammar.num_valid([*drafts[:parent], token]) == parent + 1:
            tokens.append(token)
            kept_parents.append(parent)
    return tokens, (kept_parents if len(tokens) > kept else [])


def _fill_after(matcher: llguidance.LLMatcher, path: list[int], bitmask: torch.Tensor, row: int) -> None:
    """Fills `row` with the mask after `path` (allowed: `trim_drafts` checked it) and leaves `matcher` as it was.
    A grammar that stops on the way allows only end-of-sequence from there, which the stopped matcher's own mask
    says; consuming past the stop would break the matcher."""
    consumed = 0
    for token in path:
        if matcher.is_stopped():
            break
        if not matcher.consume_token(token):
            matcher.rollback(consumed)
            raise RuntimeError(f"a tree's draft {token} is not allowed by its grammar (it should have been trimmed)")
        consumed += 1
    try:
        llg_torch.fill_next_token_bitmask(matcher, bitmask, row)
    finally:
        matcher.rollback(consumed)
