"""Benchmark workloads, seeded: synthetic, ShareGPT-format, JSONL prompt files, shared-prefix and multi-turn.

Every workload is a list of sessions. A plain request is a one-turn session; a multi-turn conversation is a session
whose turn k+1 is rendered (with the model's chat template) from the earlier user turns and the replies the backend
actually generated, so it is sent only once turn k has finished.

Prompts are text (every backend, in-process or HTTP, gets the same strings); lengths are counted with the model's
own tokenizer. Synthetic text is a random sequence of whole-word tokens (" Language", " aligning", ...) chosen so
that it tokenizes back to exactly those tokens: a synthetic prompt of N tokens is N tokens on every backend that
uses the same GGUF vocabulary.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenmill.tokenizer import Tokenizer

LengthRange = tuple[int, int]
WORKLOADS = ("synthetic", "sharegpt", "jsonl", "shared-prefix", "multi-turn")
SHAREGPT_PROMPT_RANGE = (4, 1024)  # the common ShareGPT filter (../shared/benchmarking.md)
SHAREGPT_MIN_OUTPUT = 4
SHAREGPT_MAX_TOTAL = 2048
PROMPT_FIELDS = ("prompt", "text", "question", "instruction", "input", "human", "turns")


@dataclass
class BenchRequest:
    prompt: str
    prompt_len: int  # tokens, by the model's tokenizer (servers report their own count, which the metrics use)
    output_len: int  # max_tokens; with ignore_eos, exactly the tokens generated


@dataclass
class Session:
    """One request, or a conversation: `turns` hold the user messages and their output lengths."""

    turns: list[BenchRequest]
    render: Callable[[list[str], list[str]], BenchRequest] | None = None  # (user messages, replies) → request

    @property
    def num_turns(self) -> int:
        return len(self.turns)

    def request(self, turn: int, replies: list[str]) -> BenchRequest:
        """The request for `turn`, given the generated replies to the turns before it."""
        if self.render is None:
            return self.turns[turn]
        rendered = self.render([t.prompt for t in self.turns[:turn + 1]], replies[:turn])
        rendered.output_len = self.turns[turn].output_len
        return rendered


@dataclass
class Workload:
    name: str
    sessions: list[Session]
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def num_requests(self) -> int:
        return sum(s.num_turns for s in self.sessions)

    def summary(self) -> dict[str, Any]:
        """Lengths of the requests known in advance (for multi-turn: first turns' prompts, all outputs)."""
        prompts = [s.request(0, []).prompt_len for s in self.sessions]
        outputs = [t.output_len for s in self.sessions for t in s.turns]
        return {"workload": self.name, "num_sessions": len(self.sessions), "num_requests": self.num_requests,
                "input_tokens" if self.name != "multi-turn" else "first_turn_input_tokens": _stats(prompts),
                "output_tokens": _stats(outputs), "params": self.params}


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"total": 0, "mean": 0.0, "min": 0, "max": 0}
    return {"total": int(sum(values)), "mean": float(np.mean(values)), "min": int(min(values)),
            "max": int(max(values))}


# ---- lengths and text -------------------------------------------------------------------------------------------


def parse_range(text: str) -> LengthRange:
    """"N" (fixed) or "LOW,HIGH" (uniform, inclusive); both ≥ 1."""
    low, _, high = str(text).partition(",")
    lo, hi = int(low), int(high or low)
    if not 1 <= lo <= hi:
        raise ValueError(f"expected N or LOW,HIGH with 1 <= LOW <= HIGH, got {text!r}")
    return lo, hi


def draw_lengths(rng: np.random.Generator, length: LengthRange, n: int) -> list[int]:
    return [int(x) for x in rng.integers(length[0], length[1] + 1, size=n)]


def _content_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    ids = tokenizer.encode(text)
    return ids[1:] if tokenizer.add_bos_token and ids and ids[0] == tokenizer.bos_token_id else ids


def count_tokens(tokenizer: Tokenizer, text: str) -> int:
    """Prompt tokens as the engine counts them (BOS included when the model adds one)."""
    return len(tokenizer.encode(text))


class TextSampler:
    """Random text of an exact token count from whole-word vocabulary entries that round-trip through the tokenizer."""

    _WORD = re.compile(r"^ [A-Za-z]{2,}$")

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.words = [i for i in range(tokenizer.vocab_size) if not tokenizer.is_special(i)
                      and self._WORD.match(text := tokenizer.decode([i])) and _content_ids(tokenizer, text) == [i]]
        if len(self.words) < 100:
            raise ValueError(f"the vocabulary has only {len(self.words)} whole-word tokens; cannot sample text")

    def text(self, rng: np.random.Generator, num_tokens: int, bos: bool = True) -> str:
        """Text of `num_tokens` tokens; with `bos`, counting the BOS the tokenizer adds (if it adds one)."""
        n = max(1, num_tokens - (1 if bos and self.tokenizer.add_bos_token else 0))
        return self.tokenizer.decode([self.words[i] for i in rng.integers(0, len(self.words), size=n)])


# ---- the workloads ------------------------------------------------------------------------------------------------


def synthetic(tokenizer: Tokenizer, num_requests: int, input_len: LengthRange, output_len: LengthRange,
              seed: int = 0, sampler: TextSampler | None = None) -> Workload:
    """Random-text prompts; input and output lengths fixed or uniform in [low, high] (use with ignore_eos)."""
    rng = np.random.default_rng(seed)
    sampler = sampler or TextSampler(tokenizer)
    sessions = []
    for _ in range(num_requests):  # request by request: the first k requests do not depend on num_requests
        n_in, n_out = draw_lengths(rng, input_len, 1)[0], draw_lengths(rng, output_len, 1)[0]
        text = sampler.text(rng, n_in)
        sessions.append(Session([BenchRequest(text, count_tokens(tokenizer, text), n_out)]))
    return Workload("synthetic", sessions, {"num_requests": num_requests, "input_len": list(input_len),
                                            "output_len": list(output_len), "seed": seed})


def _read_records(path: Path) -> list[Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" or text.lstrip().startswith("["):
        data = json.loads(text)
        return data if isinstance(data, list) else [data]
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _first_exchange(record: dict[str, Any]) -> tuple[str, str] | None:
    """(first human turn, the reply to it) of a flat {human, gpt} record or a ShareGPT {conversations: [...]}."""
    if isinstance(record.get("human"), str) and isinstance(record.get("gpt"), str):
        return record["human"], record["gpt"]
    turns = record.get("conversations") or record.get("conversation") or []
    for i, turn in enumerate(turns[:-1]):
        if turn.get("from") in ("human", "user") and turns[i + 1].get("from") in ("gpt", "assistant", "chatgpt"):
            return str(turn.get("value", "")), str(turns[i + 1].get("value", ""))
    return None


def sharegpt(tokenizer: Tokenizer, path: str | Path, num_requests: int, seed: int = 0,
             output_len: int | None = None, max_model_len: int | None = None) -> Workload:
    """ShareGPT-format chats: first human turn as the prompt, the reference reply's token count as the output length.

    Records are shuffled with `seed` and taken in that order while they pass the common filter: prompt of 4 to 1024
    tokens, reply of at least 4, prompt + reply ≤ 2048 (and ≤ `max_model_len`). `output_len` fixes every output.
    """
    records = _read_records(Path(path))
    order = np.random.default_rng(seed).permutation(len(records))
    limit = min(SHAREGPT_MAX_TOTAL, max_model_len or SHAREGPT_MAX_TOTAL)
    sessions, seen = [], 0
    for index in order:
        if len(sessions) >= num_requests:
            break
        exchange = _first_exchange(records[index]) if isinstance(records[index], dict) else None
        if exchange is None:
            continue
        seen += 1
        prompt, reply = exchange
        n_in = count_tokens(tokenizer, prompt)
        n_out = output_len or len(_content_ids(tokenizer, reply))
        if not SHAREGPT_PROMPT_RANGE[0] <= n_in <= SHAREGPT_PROMPT_RANGE[1] or n_out < SHAREGPT_MIN_OUTPUT \
                or n_in + n_out > limit:
            continue
        sessions.append(Session([BenchRequest(prompt, n_in, n_out)]))
    if len(sessions) < num_requests:
        raise ValueError(f"{path}: only {len(sessions)} of {len(records)} records pass the ShareGPT filter "
                         f"(wanted {num_requests})")
    return Workload("sharegpt", sessions, {"path": str(path), "num_requests": num_requests, "seed": seed,
                                           "output_len": output_len, "records_examined": seen})


def _prompt_of(record: Any, field_name: str | None) -> str | None:
    if isinstance(record, str):
        return record
    if not isinstance(record, dict):
        return None
    for name in [field_name] if field_name else PROMPT_FIELDS:
        value = record.get(name)
        if isinstance(value, list) and value and isinstance(value[0], str):
            value = value[0]  # MT-bench / Spec-Bench `turns`: the first user turn
        if isinstance(value, str) and value:
            return value
    return None


def jsonl_prompts(tokenizer: Tokenizer, path: str | Path, num_requests: int, output_len: LengthRange,
                  seed: int = 0, prompt_field: str | None = None, max_model_len: int | None = None) -> Workload:
    """Prompts from a JSONL (or JSON list) file, in file order, cycling if there are fewer than requested.

    The prompt is `prompt_field`, else the first of prompt/text/question/instruction/input/human/turns[0].
    Output lengths are fixed or uniform in `output_len`. Prompts too long for `max_model_len` are skipped.
    """
    prompts = [p for p in (_prompt_of(r, prompt_field) for r in _read_records(Path(path))) if p]
    lengths = [count_tokens(tokenizer, p) for p in prompts]
    rng = np.random.default_rng(seed)
    outs = draw_lengths(rng, output_len, num_requests)
    usable = [(p, n) for p, n in zip(prompts, lengths, strict=True)
              if max_model_len is None or n + output_len[1] <= max_model_len]
    if not usable:
        raise ValueError(f"{path}: no usable prompts (field {prompt_field or 'auto'})")
    sessions = [Session([BenchRequest(*usable[i % len(usable)], outs[i])]) for i in range(num_requests)]
    return Workload("jsonl", sessions, {"path": str(path), "num_requests": num_requests, "prompt_field": prompt_field,
                                        "output_len": list(output_len), "seed": seed, "distinct_prompts": len(usable)})


def shared_prefix(tokenizer: Tokenizer, num_requests: int, prefix_len: int, input_len: LengthRange,
                  output_len: LengthRange, num_prefixes: int = 1, seed: int = 0,
                  sampler: TextSampler | None = None) -> Workload:
    """Requests sharing one of `num_prefixes` long prefixes (a system prompt), each followed by its own suffix of
    `input_len` tokens; request i uses prefix i mod num_prefixes."""
    rng = np.random.default_rng(seed)
    sampler = sampler or TextSampler(tokenizer)
    prefixes = [sampler.text(rng, prefix_len) for _ in range(num_prefixes)]
    sessions = []
    for i in range(num_requests):
        n_in, n_out = draw_lengths(rng, input_len, 1)[0], draw_lengths(rng, output_len, 1)[0]
        text = prefixes[i % num_prefixes] + sampler.text(rng, n_in, bos=False)
        sessions.append(Session([BenchRequest(text, count_tokens(tokenizer, text), n_out)]))
    return Workload("shared-prefix", sessions, {"num_requests": num_requests, "prefix_len": prefix_len,
                                                "num_prefixes": num_prefixes, "input_len": list(input_len),
                                                "output_len": list(output_len), "seed": seed})


def chat_renderer(tokenizer: Tokenizer, system: str | None = None) -> Callable[[list[str], list[str]], BenchRequest]:
    """Renders user turns and the replies so far with the model's chat template (generation prompt appended)."""

    def render(users: list[str], replies: list[str]) -> BenchRequest:
        messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
        for i, user in enumerate(users):
            messages.append({"role": "user", "content": user})
            if i < len(replies):
                messages.append({"role": "assistant", "content": replies[i]})
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return BenchRequest(prompt, count_tokens(tokenizer, prompt), 0)

    return render


def multi_turn(tokenizer: Tokenizer, num_conversations: int, turns: int, input_len: LengthRange,
               output_len: LengthRange, seed: int = 0, path: str | Path | None = None,
               sampler: TextSampler | None = None) -> Workload:
    """Conversations of `turns` user turns; turn k+1's prompt holds turn k's prompt and the generated reply.

    User turns are synthetic text of `input_len` tokens, or the `turns` lists of a JSONL file such as MT-bench
    (first `turns` of each; conversations taken in file order, cycling).
    """
    rng = np.random.default_rng(seed)
    render = chat_renderer(tokenizer)
    if path is not None:
        convs = [r["turns"][:turns] for r in _read_records(Path(path))
                 if isinstance(r, dict) and isinstance(r.get("turns"), list) and r["turns"]]
        if not convs:
            raise ValueError(f"{path}: no records with a `turns` list")
        users = [convs[i % len(convs)] for i in range(num_conversations)]
    else:
        sampler = sampler or TextSampler(tokenizer)
        users = [[sampler.text(rng, n, bos=False) for n in draw_lengths(rng, input_len, turns)]
                 for _ in range(num_conversations)]
    sessions = []
    for messages in users:
        outs = draw_lengths(rng, output_len, len(messages))
        sessions.append(Session([BenchRequest(m, count_tokens(tokenizer, m), n) for m, n in zip(
            messages, outs, strict=True)], render))
    return Workload("multi-turn", sessions, {"num_conversations": num_conversations, "turns": turns,
                                             "input_len": list(input_len), "output_len": list(output_len),
                                             "path": str(path) if path else None, "seed": seed})
