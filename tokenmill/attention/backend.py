"""The attention backend interface: how a model step reads and writes the paged KV cache."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch

from tokenmill.scheduler.plan import StepPlan


class AttentionBackend(ABC):
    """Runs the model over one step's flat token batch, attending over the paged KV cache.

    Contract (every implementation):
    - `build_metadata(plan)` is called once per step and turns the plan's layout (per sequence: query rows, context
      length, block table; the flat slot mapping) into whatever tensors the backend needs. It reads only the plan.
    - `forward(input_ids, positions, metadata)` returns the final-normed hidden states of every row of the plan,
      [num_tokens, hidden], in plan order. Each row's K/V is stored at its slot in every layer. A query of a
      sequence sees that sequence's KV entries up to and including its own (causal by entry index), read through its
      block table; nothing of other sequences. Positions only drive the rotary embedding.
    - Greedy tokens from its hidden states match the eager backend's: exactly in fp32 up to summation order, within
      a stated tolerance in lower precision (tests/test_fused_step.py).
    - It holds the model and the KV tensors it was built with; it owns no request state.
    - `attention_mass(metadata)`, after `forward` of a plan with `collect_attention`: [S, lanes, E] fp32, the
      attention probability entry e of the plan's sequence s received in the step, summed over the query heads of a
      lane and the step's rows (H2O's scores, kv/h2o.py): lanes are the layers' KV heads (lane = layer * kv_heads +
      head) when the plan has lane tables, otherwise one lane summed over all of them. Entry e is the e-th of the
      lane's table. E covers every sequence's context. A backend that cannot tell returns None, and the engine does
      not pair it with H2O.
    """

    @abstractmethod
    def build_metadata(self, plan: StepPlan) -> Any: ...

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: Any) -> torch.Tensor: ...

    def attention_mass(self, metadata: Any) -> torch.Tensor | None:
        return None
