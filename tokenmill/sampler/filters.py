"""Top-k, top-p and min-p without sorting the vocabulary, and the categorical draw.

A nucleus is the head of the row's tokens sorted by probability, and almost always a short one. So the filters look
at the row's `CANDIDATES[0]` likeliest tokens first (`torch.topk`, a partial sort), and only rows whose kept set
could reach past them try the next count, up to the whole vocabulary (a full sort). A row is settled by a candidate
count when every token past the candidates is dropped anyway: by top-k (k within the count), or, for a row without
a top-k, by top-p (the candidates already hold `top_p` of the mass, and a token's mass before it is at least
theirs) or by min-p (the last candidate, which is at least as likely as any token past it, is below `min_p` times
the likeliest); a row whose top-k lies past the count waits for the count that holds it, where its probabilities
are renormalised over it. The kept set is then the one a full sort gives (ties at the boundary aside, which no
order settles).

The draw is by inverse CDF: one uniform per row, found in the running sum of the row's probabilities. A row with
its own generator takes its uniform from it alone, and its probabilities are bitwise the same in any batch, so its
token does not depend on the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from tokenmill.sampling_params import SamplingParams

CANDIDATES = (256, 4096)  # then the whole vocabulary


def _column(values: Sequence[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def filtered_probs(scaled: torch.Tensor, rows: Sequence[SamplingParams]) -> torch.Tensor:
    """[n, vocab] fp32 sampling distributions in vocab order from temperature-scaled fp32 logits: top-k, then top-p
    over the top-k's renormalised probabilities, then min-p against the likeliest (always kept); zero elsewhere.

    A row's result is bitwise the same in any batch: rows are filtered in groups of one candidate count (a row's own
    top-k caps it), so no row's count depends on another's, and every reduction is one whose rounding does not
    depend on the batch (softmax, cumsum; a log-sum-exp over the vocabulary is not one)."""
    n, vocab = scaled.shape
    out = torch.zeros_like(scaled)
    top_k = [min(r.top_k, vocab) if r.top_k > 0 else vocab for r in rows]
    todo = list(range(n))
    for count in (*CANDIDATES, vocab):
        # One group per candidate count, and apart by whether the candidates are the row's whole top-k.
        groups: dict[tuple[int, bool], list[int]] = {}
        for i in todo:
            k = min(count, top_k[i])
            groups.setdefault((k, top_k[i] == k), []).append(i)
        todo = []
        for (k, whole_top_k), group in groups.items():
            settled = _filter_candidates(scaled, out, group, k, whole_top_k, [top_k[i] for i in group],
                                         [rows[i] for i in group])
            todo += [i for i, done in zip(group, settled, strict=True) if not done]
        if not todo:
            return out
    raise AssertionError("a full sort settles every row")


def _filter_candidates(scaled: torch.Tensor, out: torch.Tensor, todo: list[int], k: int, whole_top_k: bool,
                       top_k: list[int], rows: Sequence[SamplingParams]) -> list[bool]:
    """Filters rows `todo` of `scaled` over their k likeliest tokens (k at most each row's top-k), writing the
    distributions of the rows this settles into `out`; returns which rows it settled. `whole_top_k`: k is every
    row's own top-k, over which the rows renormalise (and which settles them); otherwise they renormalise over the
    whole row."""
    device, vocab = scaled.device, scaled.shape[1]
    index = torch.tensor(todo, dtype=torch.long, device=device)
    logits = scaled if len(todo) == scaled.shape[0] else scaled[index]
    values, ids = torch.topk(logits, k, dim=-1)
    probs = torch.softmax(values, dim=-1) if whole_top_k else torch.softmax(logits, dim=-1).gather(1, ids)
    top_p = _column([r.top_p if r.top_p < 1.0 else 2.0 for r in rows], device)
    min_p = _column([r.min_p for r in rows], device)
    below = probs >= min_p * probs[:, :1]
    before = torch.cumsum(probs, dim=-1)
    keep = (before - probs < top_p) & below
    keep[:, 0] = True
    if whole_top_k or k == vocab:
        settled = torch.ones(len(todo), dtype=torch.bool, device=device)
    else:
        # Without a top-k of its own a row's probabilities here are final, and the candidates may already decide
        # its kept set; with a top-k beyond k they are not yet renormalised over it, so it waits for the count that
        # holds it.
        no_k = torch.tensor([t == vocab for t in top_k], device=device)
        settled = no_k & ((before[:, -1] >= top_p.squeeze(1)) | ~below[:, -1])
    kept = torch.softmax(values.masked_fill(~keep, float("-inf")), dim=-1)
    done = settled.nonzero().squeeze(1)
    flat = index[done].unsqueeze(1) * vocab + ids[done]  # `out` rows are zero: write the kept ones in place
    out.view(-1)[flat.flatten()] = kept[done].flatten()
    return settled.tolist()


def draw(probs: torch.Tensor, generators: Sequence[torch.Generator | None],
         generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from its (possibly unnormalised) probabilities: the first whose running sum exceeds a
    uniform share of the row's total. A row with a generator of its own (`generators[i]`) takes its uniform from it,
    the others from `generator` (None: torch's global one)."""
    uniforms = torch.rand(len(generators), dtype=torch.float64, generator=generator,
                          device=generator.device if generator is not None else "cpu")
    for i, own in enumerate(generators):
        if own is not None:
            uniforms[i] = torch.rand((), dtype=torch.float64, generator=own, device=own.device).to(uniforms.device)
    cdf = torch.cumsum(probs.float(), dim=-1)
    total = cdf[:, -1:]
    target = (uniforms.to(probs.device).unsqueeze(1) * total.double()).float()
    # Kept below the total, which a uniform within rounding of 1 could reach: the first running sum above the target
    # is then at most the last token with mass, never one of the zeros after it.
    target = torch.minimum(target, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, target, right=True).squeeze(1)
