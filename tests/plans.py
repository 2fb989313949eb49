"""Step plans for tests that drive an attention backend directly, without a scheduler."""

from __future__ import annotations

from tokenmill.scheduler.plan import ScheduledSeq, StepPlan


def slots_of(table: list[int], start: int, end: int, block_size: int) -> list[int]:
    return [table[p // block_size] * block_size + p % block_size for p in range(start, end)]


def make_plan(cached: list[int], new: list[list[int]], tables: list[list[int]], block_size: int) -> StepPlan:
    """Sequence i has `cached[i]` entries already and computes `new[i]` now, through block table `tables[i]`."""
    seqs, token_ids, positions, slots = [], [], [], []
    for i, (num_cached, tokens, table) in enumerate(zip(cached, new, tables, strict=True)):
        seqs.append(ScheduledSeq(f"seq-{i}", len(token_ids), len(tokens), num_cached + len(tokens), tuple(table)))
        token_ids.extend(tokens)
        positions.extend(range(num_cached, num_cached + len(tokens)))
        slots.extend(slots_of(table, num_cached, num_cached + len(tokens), block_size))
    return StepPlan(tuple(seqs), tuple(token_ids), tuple(positions), tuple(slots))
