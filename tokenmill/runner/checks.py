"""The invariants a step plan must hold before the fused C++ step (which indexes raw memory with them) runs it.

The scheduler builds valid plans; these checks make a bug there, or in anything that edits a plan later (a
verifier, a KV policy), an exception for that step instead of a write past the KV cache. They are O(tokens + block
table entries), a small fraction of any step.
"""

from __future__ import annotations

from tokenmill.scheduler.plan import StepPlan
from tokenmill.spec.tree import MAX_TREE_ROWS, check_tree


class InvalidPlanError(ValueError):
    """A step plan addresses memory outside the KV cache or the model's tables."""


def check_plan(plan: StepPlan, num_blocks: int, block_size: int, max_positions: int | None = None,
               vocab_size: int | None = None) -> None:
    n = plan.num_tokens
    if len(plan.positions) != n or len(plan.slot_mapping) != n:
        raise InvalidPlanError(f"{n} tokens but {len(plan.positions)} positions and {len(plan.slot_mapping)} slots")
    if n:
        _check_range("slot", plan.slot_mapping, num_blocks * block_size)
        _check_range("position", plan.positions, max_positions)
        _check_range("token id", plan.token_ids, vocab_size)
    for src, dst in plan.block_copies:
        _check_range("copied block", (src, dst), num_blocks)
    moves = plan.lane_copies
    if moves is not None and moves.numel() and (int(moves[:, 1:].min()) < 0
                                                or int(moves[:, 1:].max()) >= num_blocks * block_size):
        raise InvalidPlanError(f"a moved KV row's slot lies outside [0, {num_blocks * block_size})")
    for shift in plan.kv_shifts:
        if shift.blocks:
            _check_range("shifted block", shift.blocks, num_blocks)
    rows = 0
    for seq in plan.seqs:
        if seq.query_start != rows or seq.num_tokens < 1 or not 0 <= seq.num_samples <= seq.num_tokens:
            raise InvalidPlanError(f"{seq.request_id}: rows [{seq.query_start}, +{seq.num_tokens}) with "
                                   f"{seq.num_samples} samples do not follow row {rows}")
        if seq.num_samples and seq.num_samples != 1 + len(seq.draft_token_ids):
            raise InvalidPlanError(f"{seq.request_id}: {seq.num_samples} sample rows for "
                                   f"{len(seq.draft_token_ids)} draft tokens")
        if seq.draft_parents:
            try:
                check_tree(seq.draft_parents, len(seq.draft_token_ids))
            except ValueError as error:
                raise InvalidPlanError(f"{seq.request_id}: {error}") from None
            if seq.num_tokens != seq.num_samples or seq.num_tokens > MAX_TREE_ROWS:
                raise InvalidPlanError(f"{seq.request_id}: a token tree is verified alone in its rows, at most "
                                       f"{MAX_TREE_ROWS} of them, not {seq.num_tokens} rows with {seq.num_samples} "
                                       "sampled")
        end = seq.query_start + seq.num_tokens
        if seq.draft_token_ids and plan.token_ids[end - len(seq.draft_token_ids) : end] != seq.draft_token_ids:
            raise InvalidPlanError(f"{seq.request_id}: the draft tokens are not its last rows' tokens")
        scored = seq.prompt_logprobs
        if scored is not None and not 0 <= scored.offset <= scored.offset + len(scored.targets) <= seq.num_tokens:
            raise InvalidPlanError(f"{seq.request_id}: prompt logprob rows [{scored.offset}, "
                                   f"+{len(scored.targets)}) outside its {seq.num_tokens} rows")
        rows += seq.num_tokens
        if not seq.num_tokens <= seq.context_len <= len(seq.block_table) * block_size:
            raise InvalidPlanError(f"{seq.request_id}: context of {seq.context_len} entries for "
                                   f"{seq.num_tokens} new tokens and {len(seq.block_table)} blocks")
        if seq.block_table:
            _check_range(f"{seq.request_id}: block", seq.block_table, num_blocks)
        lanes = seq.lane_tables
        if lanes is not None and (lanes.dim() != 2 or lanes.shape[1] != len(seq.block_table) or lanes.numel() and (
                int(lanes.min()) < 0 or int(lanes.max()) >= num_blocks)):
            raise InvalidPlanError(f"{seq.request_id}: lane tables {tuple(lanes.shape)} do not match its "
                                   f"{len(seq.block_table)} blocks or name a block outside [0, {num_blocks})")
    if rows != n:
        raise InvalidPlanError(f"the sequences cover {rows} rows of {n}")


def _check_range(what: str, values: tuple[int, ...], limit: int | None) -> None:
    low, high = min(values), max(values)
    if low < 0 or (limit is not None and high >= limit):
        bad = low if low < 0 else high
        raise InvalidPlanError(f"{what} {bad} outside [0, {limit if limit is not None else 'inf'})")
