"""What a request's output must match: one of a JSON schema, any JSON object, a regex, a choice, a Lark grammar."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tokenmill.errors import InvalidRequestError

# Bounds on what a client may send: the grammar is compiled on a server thread, and its text is a cache key.
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 256


@dataclass(frozen=True)
class StructuredOutputs:
    """Exactly one constraint. `json`: a JSON schema (dict or its text); `json_object`: any JSON object; `regex`: the
    whole output matches it; `choice`: the output is one of the strings; `grammar`: a Lark grammar (llguidance's
    dialect). `field_name` is the request field it came from, named in errors (a server maps its own fields)."""

    json: dict[str, Any] | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None
    field_name: str = field(default="structured_outputs", compare=False)

    def __post_init__(self) -> None:
        if self.choice is not None:
            if not isinstance(self.choice, list | tuple):
                raise InvalidRequestError(self.field_name, "choice must be a list of strings")
            object.__setattr__(self, "choice", tuple(self.choice))
        set_ = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        set_ += ["json_object"] if self.json_object else []
        if len(set_) != 1:
            raise InvalidRequestError(self.field_name, f"exactly one of json, json_object, regex, choice, grammar "
                                      f"must be given, got {set_ or 'none'}")
        if self.json is not None and not isinstance(self.json, dict | str):
            raise InvalidRequestError(self.field_name, "json must be a schema object or its JSON text")
        for name in ("regex", "grammar"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, str) and value):
                raise InvalidRequestError(self.field_name, f"{name} must be a non-empty string")
        if self.choice is not None and not (0 < len(self.choice) <= MAX_CHOICES
                                            and all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError(self.field_name, f"choice must be 1 to {MAX_CHOICES} non-empty strings")
        if len(self.key()[1]) > MAX_SPEC_CHARS:
            raise InvalidRequestError(self.field_name, f"the constraint is longer than {MAX_SPEC_CHARS} characters")

    def key(self) -> tuple[str, str]:
        """(kind, canonical text): equal constraints share one compiled grammar."""
        if self.json is not None:
            # Key order stays: it is the order properties are generated in.
            text = self.json if isinstance(self.json, str) else json.dumps(self.json)
            return "json", text
        if self.json_object:
            return "json", '{"type": "object"}'
        if self.regex is not None:
            return "regex", self.regex
        if self.choice is not None:
            return "choice", json.dumps(list(self.choice))
        assert self.grammar is not None
        return "lark", self.grammar
