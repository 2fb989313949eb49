"""One step's logits to tokens: penalties, logit bias, greedy or random selection, top-k/top-p/min-p, seeded draws,
logprobs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from tokenmill.sampler.filters import draw, filtered_probs
from tokenmill.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """One sequence that gets a token this step."""

    params: SamplingParams
    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    generator: torch.Generator | None  # set when params.seed is not None; advanced only by this request's draws
    blocked_token_ids: Sequence[int] = ()  # e.g. EOS while min_tokens is not reached


@dataclass
class TokenLogprobs:
    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token_id, logprob), highest first, length params.logprobs


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]  # None where params.logprobs is None


def has_penalties(params: SamplingParams) -> bool:
    return params.repetition_penalty != 1.0 or params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _needs_filter(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1.0 or params.min_p > 0.0


def _token_counts(token_lists: Sequence[Sequence[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(token_lists), vocab] float counts of each token per list, built with one scatter."""
    counts = torch.zeros(len(token_lists), vocab, dtype=torch.float32, device=device)
    flat = [row * vocab + t for row, tokens in enumerate(token_lists) for t in tokens]
    if flat:
        index = torch.tensor(flat, dtype=torch.long, device=device)
        counts.view(-1).scatter_add_(0, index, torch.ones(len(flat), dtype=torch.float32, device=device))
    return counts


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)


def _penalise(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Penalties for rows that all have some penalty; logits is float32 [len(rows), V] and is modified in place."""
    vocab, device = logits.shape[1], logits.device
    output_counts = _token_counts([r.output_token_ids for r in rows], vocab, device)
    rep = [r.params.repetition_penalty for r in rows]
    if any(p != 1.0 for p in rep):
        seen = (output_counts > 0) | (_token_counts([r.prompt_token_ids for r in rows], vocab, device) > 0)
        rep_col = _column(rep, device)
        penalised = torch.where(logits > 0, logits / rep_col, logits * rep_col)
        logits = torch.where(seen, penalised, logits)
    presence = _column([r.params.presence_penalty for r in rows], device)
    frequency = _column([r.params.frequency_penalty for r in rows], device)
    return logits - presence * (output_counts > 0).float() - frequency * output_counts


def apply_penalties(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition/presence/frequency penalties; returns a new float32 tensor, the input is left untouched."""
    out = logits.to(torch.float32, copy=True)  # one copy, whether it widens or not
    idx = [i for i, r in enumerate(rows) if has_penalties(r.params)]
    if not idx:
        return out
    # Only penalised rows pay for building count tensors; long prompts make that the costly part.
    index = torch.tensor(idx, dtype=torch.long, device=out.device)
    out[index] = _penalise(out[index], [rows[i] for i in idx])
    return out


def apply_bias(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Adds each row's `logit_bias` to its logits, in place (one indexed add per biased row, from the tensors its
    SamplingParams built once)."""
    for i, row in enumerate(rows):
        if row.params.bias_tensors is not None:
            ids, values = row.params.bias_tensors
            logits[i].index_add_(0, ids.to(logits.device), values.to(logits.device, logits.dtype))


def apply_blocked(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> None:
    """Sets each row's blocked tokens to -inf, in place, with one indexed write. A row left with no token at all
    keeps its blocked ones: a grammar that allows nothing but end-of-sequence outranks `min_tokens`."""
    pairs = [(i, t) for i, r in enumerate(rows) for t in r.blocked_token_ids]
    if not pairs:
        return
    index = torch.tensor(pairs, dtype=torch.long, device=logits.device)
    kept = logits[index[:, 0], index[:, 1]]
    logits[index[:, 0], index[:, 1]] = float("-inf")
    blocked_rows = index[:, 0].unique()  # only rows that lost tokens can have none left
    empty = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
    empty[blocked_rows] = torch.isneginf(logits[blocked_rows]).all(dim=1)
    if bool(empty.any()):
        restore = empty[index[:, 0]]
        logits[index[restore, 0], index[restore, 1]] = kept[restore]


def _random_probs(logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Sampling distribution in vocab order for random rows (temperature applied, filters applied); each row's is
    the same whatever else is batched (rows without filters never take the filters' path)."""
    scaled = logits / _column([r.params.temperature for r in rows], logits.device)
    filtered = [_needs_filter(r.params) for r in rows]
    if not any(filtered):
        return torch.softmax(scaled, dim=-1)
    if all(filtered):
        return filtered_probs(scaled, [r.params for r in rows])
    probs = torch.empty_like(scaled)
    for wanted in (True, False):
        picked = [i for i, f in enumerate(filtered) if f == wanted]
        index = torch.tensor(picked, dtype=torch.long, device=logits.device)
        probs[index] = (filtered_probs(scaled[index], [rows[i].params for i in picked]) if wanted
                        else torch.softmax(scaled[index], dim=-1))
    return probs


def _logprobs(raw: torch.Tensor, tokens: torch.Tensor, rows: Sequence[SamplingRow]) -> list[TokenLogprobs | None]:
    """Chosen-token and top-k logprobs from the raw logits, for the rows that asked."""
    out: list[TokenLogprobs | None] = [None] * len(rows)
    idx = [i for i, r in enumerate(rows) if r.params.logprobs is not None]
    if not idx:
        return out
    index = torch.tensor(idx, dtype=torch.long, device=raw.device)
    scored = score_tokens(raw[index], tokens[index].tolist(), [rows[i].params.logprobs or 0 for i in idx])
    for i, entry in zip(idx, scored, strict=True):
        out[i] = entry
    return out


def score_tokens(raw: torch.Tensor, token_ids: Sequence[int], num_top: Sequence[int]) -> list[TokenLogprobs]:
    """Row i's log-probability of `token_ids[i]` and its `num_top[i]` most likely tokens, from raw logits
    [rows, vocab] (log-softmax in fp32, nothing else applied)."""
    # log_softmax, not x - logsumexp(x): the latter's reduction rounds differently by a row's place in the batch,
    # and a row's logprobs must not depend on what else is batched.
    logprobs = torch.log_softmax(raw.float(), dim=-1)
    chosen = logprobs.gather(1, torch.tensor(token_ids, dtype=torch.long, device=raw.device)[:, None])
    chosen_l = chosen.squeeze(1).tolist()
    top_vals, top_ids = torch.topk(logprobs, max(num_top, default=0), dim=-1)
    top_vals_l, top_ids_l = top_vals.tolist(), top_ids.tolist()
    return [TokenLogprobs(token_id=token_ids[j], logprob=chosen_l[j],
                          top=list(zip(top_ids_l[j][:k], top_vals_l[j][:k], strict=True)))
            for j, k in enumerate(num_top)]


def _is_plain_greedy(row: SamplingRow) -> bool:
    p = row.params
    return (p.greedy and not has_penalties(p) and not p.logit_bias and not row.blocked_token_ids
            and p.logprobs is None)


class Sampler:
    """Picks one token per row from `logits` [len(rows), vocab], in the model's dtype (computed in fp32).

    `greedy`: optionally a faster `logits → first maximal index per row` for contiguous CPU fp32/bf16 logits (the
    compiled CPU kernels' `greedy`), used when every row is plain greedy. `generator`: the source of randomness for
    rows without a generator of their own (None: torch's global one)."""

    def __init__(self, greedy: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.greedy = greedy
        self.generator = generator

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        if logits.shape[0] != len(rows):
            raise ValueError(f"logits has {logits.shape[0]} rows but {len(rows)} sampling rows were given")
        if all(_is_plain_greedy(r) for r in rows):
            # The common benchmark path: no penalties, one reduction and one host transfer, and no fp32 copy (widening
            # is exact, so the choice is the same; at 256 rows that copy is 50 MB, fresh pages every step). `max`
            # returns the first maximal index as argmax does, but is vectorized for bf16 where argmax is not (measured
            # over 49,152 logits: 0.03 vs 0.15 ms at 1 row, 3.5 vs 19 ms at 256); the kernel reads at memory speed.
            if self.greedy is not None and logits.device.type == "cpu" and logits.dtype in (torch.float32,
                                                                                             torch.bfloat16):
                return SamplerOutput(token_ids=self.greedy(logits.contiguous()).tolist(), logprobs=[None] * len(rows))
            return SamplerOutput(token_ids=logits.max(dim=-1).indices.tolist(), logprobs=[None] * len(rows))
        tokens = self._select(logits, rows)
        return SamplerOutput(token_ids=tokens.tolist(), logprobs=_logprobs(logits, tokens, rows))

    def probabilities(self, logits: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
        """fp32 [len(rows), vocab]: each random row's sampling distribution, every parameter applied (a verifier's
        target distribution p). Rows must be random (temperature > 0)."""
        adjusted = apply_penalties(logits, rows)
        apply_bias(adjusted, rows)
        apply_blocked(adjusted, rows)
        return _random_probs(adjusted, rows)

    def draw(self, probs: torch.Tensor, rows: Sequence[SamplingRow]) -> int:
        """One token from a single row's (possibly unnormalised) probabilities, with the row's generator."""
        return int(draw(probs, [r.generator for r in rows], self.generator)[0])

    def logprobs(self, logits: torch.Tensor, tokens: torch.Tensor,
                 rows: Sequence[SamplingRow]) -> list[TokenLogprobs | None]:
        return _logprobs(logits.float(), tokens, rows)

    def _select(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        adjusted = apply_penalties(logits, rows)
        apply_bias(adjusted, rows)
        apply_blocked(adjusted, rows)
        tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        greedy = [i for i, r in enumerate(rows) if r.params.greedy]
        random = [i for i, r in enumerate(rows) if not r.params.greedy]
        if greedy:
            index = torch.tensor(greedy, dtype=torch.long, device=logits.device)
            tokens[index] = adjusted[index].argmax(dim=-1)
        if len(random) == len(rows):  # no copy of the rows to pick them all
            return draw(_random_probs(adjusted, rows), [r.generator for r in rows], self.generator)
        if random:
            index = torch.tensor(random, dtype=torch.long, device=logits.device)
            random_rows = [rows[i] for i in random]
            tokens[index] = draw(_random_probs(adjusted[index], random_rows), [r.generator for r in random_rows],
                                 self.generator)
        return tokens
