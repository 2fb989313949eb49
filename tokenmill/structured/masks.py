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
from tokenmill.spec.tree import spine_length
from tokenmill.structured.grammar import GrammarCompiler


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
    sequence's first i + 1 drafts (which `trim_drafts` has kept to the prefix the grammar allows).

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
        """Drops each grammar-bound request's drafts from the first one its grammar forbids: such a draft could
        never be accepted, and the rows after it would have no grammar state to mask with. A token tree keeps its
        spine only (the grammar's draft masks follow one line of tokens)."""
        for request in requests:
            if request.grammar is not None and request.draft_token_ids:
                if request.draft_parents:
                    del request.draft_token_ids[spine_length(request.draft_parents):]
                    request.draft_parents = []
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
                entries.append((request.grammar.inner, len(rows), list(seq.draft_token_ids)))
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

    def _fill(self, entries: list[tuple[llguidance.LLMatcher, int, list[int]]], rows: torch.Tensor) -> TokenMasks:
        bitmask = llg_torch.allocate_token_bitmask(len(rows), self.compiler.vocab_size)
        # The draft-token fill takes only sequences with drafts; the others take the plain fill, into the same rows.
        drafted = [e for e in entries if e[2]]
        plain = [(m, r) for m, r, drafts in entries if not drafts]
        if drafted:
            llg_torch.fill_next_token_bitmask_par_with_draft_tokens(self._executor, drafted, bitmask)
        if plain:
            llg_torch.fill_next_token_bitmask_par(self._executor, plain, bitmask)
        return TokenMasks(rows, bitmask)
