"""Offline Python API: `LLM(model).generate(prompts, params)` and `LLM.chat(messages)`."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from tokenmill.config import EngineConfig
from tokenmill.engine import LLMEngine
from tokenmill.output.types import CompletionOutput, GenerationResult, RequestOutput
from tokenmill.sampling_params import SamplingParams, fan_out
from tokenmill.tokenizer import Tokenizer

Prompt = str | list[int]
Message = dict[str, Any]


class LLM:
    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self) -> Tokenizer:
        return self.engine.tokenizer

    def reset_prefix_cache(self) -> bool:
        return self.engine.reset_prefix_cache()

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[GenerationResult]:
        """Generate for every prompt (continuously batched); results come back in prompt order."""
        if isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if sampling_params is None or isinstance(sampling_params, SamplingParams):
            params_list = [sampling_params or SamplingParams()] * len(prompts)
        else:
            params_list = list(sampling_params)
            if len(params_list) != len(prompts):
                raise ValueError(f"{len(params_list)} sampling params for {len(prompts)} prompts")
        groups: list[list[str]] = []
        try:
            for prompt, params in zip(prompts, params_list, strict=True):
                base = f"gen-{next(self._ids)}"
                sibling_ids: list[str] = []
                groups.append(sibling_ids)
                for i, sample_params in enumerate(fan_out(params)):
                    # Deltas, put together in _run: O(1) per token instead of a copy of the output at every step.
                    delta = dataclasses.replace(sample_params, output_kind="delta")
                    sibling_ids.append(self.engine.add_request(prompt, delta, f"{base}-{i}",
                                                               fork_of=sibling_ids[0] if sibling_ids else None))
        except Exception:
            for ids in groups:
                for request_id in ids:
                    self.engine.abort(request_id)
            raise
        finals = self._run(sum(len(g) for g in groups), use_tqdm)
        return [self._result(ids, finals) for ids in groups]

    def _run(self, total: int, use_tqdm: bool) -> dict[str, RequestOutput]:
        results: dict[str, RequestOutput] = {}
        with tqdm(total=total, desc="generating", unit="req", disable=not use_tqdm, dynamic_ncols=True) as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.request_id in results:
                        results[out.request_id].merge_delta(out)
                    else:
                        results[out.request_id] = out
                    if out.finished:
                        bar.update(1)
        return results

    @staticmethod
    def _result(request_ids: list[str], finals: dict[str, RequestOutput]) -> GenerationResult:
        first = finals[request_ids[0]]
        outputs = [CompletionOutput(i, o.text, o.token_ids, o.finish_reason, o.logprobs, o.stop_reason)
                   for i, o in enumerate(finals[r] for r in request_ids)]
        return GenerationResult(request_ids[0].rsplit("-", 1)[0], first.prompt, first.prompt_token_ids, outputs,
                                first.prompt_logprobs)

    def chat(self, messages: list[Message] | list[list[Message]],
             sampling_params: SamplingParams | None = None, use_tqdm: bool = False) -> list[GenerationResult]:
        """Render each conversation with the model's chat template and generate the assistant's reply."""
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [self.tokenizer.apply_chat_template(conv, add_generation_prompt=True)  # type: ignore[arg-type]
                   for conv in conversations]
        return self.generate(prompts, sampling_params, use_tqdm=use_tqdm)
