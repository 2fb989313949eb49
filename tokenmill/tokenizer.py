"""Text <-> token ids for GGUF models, built from the vocabulary the GGUF file carries.

A GGUF has no `tokenizer.json`: it stores tokens, merges, token types and a pre-tokenizer *name*
(`tokenizer.ggml.pre`). We rebuild an equivalent HF `tokenizers` pipeline from those, choosing the split
rules the way llama.cpp does for that name, so prompts tokenize the way the model was trained.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from tokenmill.model.gguf_file import ModelLoadError

__all__ = ["CHATML_TEMPLATE", "Tokenizer"]

# llama.cpp token types (`tokenizer.ggml.token_type`).
TOKEN_TYPE_CONTROL = 3
TOKEN_TYPE_USER_DEFINED = 4

# Qwen2's split rule, as llama.cpp and the Qwen2 tokenizer define it.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Pre-tokenizer names llama.cpp groups together because they split text identically.
_SMOLLM_STYLE = frozenset({"smollm", "starcoder", "refact", "codeshell"})
_QWEN2_STYLE = frozenset({"qwen2", "stablelm2", "deepseek-r1-qwen"})
_GPT2_STYLE = frozenset({"gpt2", "default", "mpt", "olmo"})

# Token texts that end a turn or a document in common chat vocabularies; generation should stop on them
# even when the file names a different eos.
_STOP_TOKEN_TEXTS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<|eom_id|>", "<end_of_turn>")
_STOP_TOKEN_ID_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map: byte-level vocabularies spell every token in it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _alphabet_bytes() -> dict[str, int]:
    return {ch: b for b, ch in _byte_alphabet().items()}


@lru_cache(maxsize=1)
def _byte_alphabet_chars() -> frozenset[str]:
    return frozenset(_byte_alphabet().values())


def _is_byte_level_spelled(token: str) -> bool:
    return _byte_alphabet_chars().issuperset(token)


def _byte_level_spelling(token: str) -> str:
    """A token written with raw text (some converters store added tokens that way) in the byte alphabet."""
    if _is_byte_level_spelled(token):
        return token
    alphabet = _byte_alphabet()
    return "".join(alphabet[b] for b in token.encode("utf-8"))


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SMOLLM_STYLE:
        # Digits are isolated one by one *before* the GPT-2 split, so a whitespace run in front of a number
        # stays one piece (llama.cpp and SmolLM's own tokenizer.json both do this).
        return pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ])
    if pre in _QWEN2_STYLE:
        return pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    if pre in _GPT2_STYLE:
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    supported = sorted(_SMOLLM_STYLE | _QWEN2_STYLE | _GPT2_STYLE)
    raise ModelLoadError(f"unsupported tokenizer pre-tokenizer 'tokenizer.ggml.pre' = {pre!r}; supported: {supported}")


def _parse_merges(merges: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ModelLoadError(f"malformed BPE merge {merge!r} in tokenizer.ggml.merges")
        pairs.append((parts[0], parts[1]))
    return pairs


def _build_backend(tokens: Sequence[str], merges: Sequence[str], token_types: Sequence[int], pre: str) -> HFTokenizer:
    vocab: dict[str, int] = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(_byte_level_spelling(token), index)
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=_parse_merges(merges), fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = _pre_tokenizer(pre)
    backend.decoder = decoders.ByteLevel()
    # Control tokens spelled outside the byte alphabet are llama.cpp mislabels; adding them would grow the
    # vocabulary past the model's embedding size, so they stay plain vocabulary entries.
    control = _added_tokens(tokens, token_types, TOKEN_TYPE_CONTROL, special=True)
    backend.add_special_tokens(control)
    # User-defined tokens (e.g. `<think>`) are matched whole in text, like llama.cpp, but are real output text.
    backend.add_tokens(_added_tokens(tokens, token_types, TOKEN_TYPE_USER_DEFINED, special=False))
    return backend


def _added_tokens(tokens: Sequence[str], token_types: Sequence[int], kind: int, special: bool) -> list[AddedToken]:
    return [
        AddedToken(token, special=special, normalized=False)
        for token, token_kind in zip(tokens, token_types, strict=True)
        if token_kind == kind and _is_byte_level_spelled(token)
    ]


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes, which would corrupt prompts containing <, > or &.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _compile_template(source: str) -> jinja2.Template:
    # Same environment shape as transformers so Hub templates render identically (whitespace included).
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as exc:
        raise ModelLoadError(f"tokenizer.chat_template is not a valid Jinja template: {exc}") from exc


def _validate_messages(messages: object) -> list[dict[str, Any]]:
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {'role': str, 'content': str} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        for key in ("role", "content"):
            if not isinstance(message.get(key), str):
                raise ValueError(f"messages[{i}] needs a string '{key}', got {message.get(key)!r}")
    return messages


class Tokenizer:
    """Byte-level BPE tokenizer for a GGUF model, plus its chat template and stop tokens."""

    def __init__(
        self,
        backend: HFTokenizer,
        tokens: Sequence[str],
        token_types: Sequence[int],
        *,
        bos_token_id: int | None,
        eos_token_id: int | None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        extra_stop_ids: Iterable[int] = (),
    ) -> None:
        self._backend = backend
        self._tokens = list(tokens)
        self._special_ids = frozenset(i for i, k in enumerate(token_types) if k == TOKEN_TYPE_CONTROL)
        self._bos_token_id = bos_token_id
        self._eos_token_id = eos_token_id
        self._add_bos_token = add_bos_token and bos_token_id is not None
        self.chat_template = chat_template or CHATML_TEMPLATE
        self._template = _compile_template(self.chat_template)
        self._stop_token_ids = frozenset(self._find_stop_ids(extra_stop_ids))

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The file's tokenizer; metadata of the wrong shape (a GGUF is untrusted input) raises ModelLoadError."""
        model = metadata.get("tokenizer.ggml.model")
        if model != "gpt2":
            raise ModelLoadError(
                f"unsupported tokenizer model 'tokenizer.ggml.model' = {model!r}; "
                "only byte-level BPE ('gpt2') is supported"
            )
        tokens: list[str] = _typed_list(metadata, "tokenizer.ggml.tokens", str)
        if not tokens:
            raise ModelLoadError("GGUF metadata has no tokenizer.ggml.tokens")
        token_types = _typed_list(metadata, "tokenizer.ggml.token_type", int) or [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ModelLoadError(f"tokenizer.ggml.token_type has {len(token_types)} entries for {len(tokens)} tokens")
        merges = _typed_list(metadata, "tokenizer.ggml.merges", str)
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise ModelLoadError("tokenizer.chat_template must be a string")
        pre = str(metadata.get("tokenizer.ggml.pre") or "default")
        try:
            backend = _build_backend(tokens, merges, token_types, pre)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # the Rust tokenizer panics (a BaseException) on some malformed vocabularies
            raise ModelLoadError(f"the GGUF tokenizer cannot be built: {type(exc).__name__}: {exc}") from None
        return cls(
            backend, tokens, token_types,
            bos_token_id=_optional_id(metadata, "tokenizer.ggml.bos_token_id", len(tokens)),
            eos_token_id=_optional_id(metadata, "tokenizer.ggml.eos_token_id", len(tokens)),
            add_bos_token=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
            extra_stop_ids=_stop_ids_from_metadata(metadata, len(tokens)),
        )

    def _find_stop_ids(self, extra: Iterable[int]) -> set[int]:
        ids = set(extra)
        if self._eos_token_id is not None:
            ids.add(self._eos_token_id)
        by_text = {t: i for i, t in enumerate(self._tokens) if i in self._special_ids}
        ids.update(by_text[t] for t in _STOP_TOKEN_TEXTS if t in by_text)
        return ids

    # --- encoding / decoding -------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids for `text`; special tokens written in the text become their single ids."""
        ids = self._backend.encode(text, add_special_tokens=False).ids
        if self._add_bos_token:
            return [self._bos_token_id, *ids]  # type: ignore[list-item]
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_json(self) -> str:
        """The HF `tokenizers` JSON of the rebuilt tokenizer (what grammar libraries read a vocabulary from)."""
        return self._backend.to_str()

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def token_bytes(self, token_id: int) -> bytes | None:
        """The exact bytes a byte-level token stands for (None if it is not spelled in the byte alphabet)."""
        spelled = self.id_to_token(token_id)
        byte_of = _alphabet_bytes()
        if not all(ch in byte_of for ch in spelled):
            return None
        return bytes(byte_of[ch] for ch in spelled)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_token_id(self) -> int | None:
        return self._bos_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self._eos_token_id

    @property
    def stop_token_ids(self) -> frozenset[int]:
        return self._stop_token_ids

    @property
    def add_bos_token(self) -> bool:
        return self._add_bos_token

    # --- chat ---------------------------------------------------------------------------------------------

    @property
    def renders_tools(self) -> bool:
        """Whether the chat template writes the `tools` it is given into the prompt (Qwen2.5's does)."""
        return "tools" in self.chat_template

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render a conversation into the prompt text the model was fine-tuned on."""
        messages = _validate_messages(messages)
        try:
            return self._template.render(
                messages=messages,
                tools=tools,
                add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self._bos_token_id),
                eos_token=self._token_text(self._eos_token_id),
            )
        except jinja2.exceptions.TemplateError as exc:
            # Templates reject bad conversations (e.g. roles not alternating) via raise_exception.
            raise ValueError(f"chat template rejected the messages: {exc}") from exc

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokens[token_id]


def _stop_ids_from_metadata(metadata: Mapping[str, Any], vocab_size: int) -> list[int]:
    ids = (_optional_id(metadata, key, vocab_size) for key in _STOP_TOKEN_ID_KEYS)
    return [i for i in ids if i is not None]


def _typed_list(metadata: Mapping[str, Any], key: str, kind: type) -> list[Any]:
    value = metadata.get(key)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ModelLoadError(f"{key} must be a list of {kind.__name__}")
    return value


def _optional_id(metadata: Mapping[str, Any], key: str, vocab_size: int) -> int | None:
    value = metadata.get(key)
    if value is None:
        return None
    if not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ModelLoadError(f"{key} = {value!r} is not a token id (vocabulary has {vocab_size} tokens)")
    return value
