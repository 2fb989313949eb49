"""OpenAI tools on a model that may not know them: the tools described in the prompt, `tool_choice` turned into a
grammar (`required`: a JSON array of calls; a named function: its arguments object), and the output parsed into
`tool_calls`, whole or as streamed deltas. `auto` leaves the output free and parses calls written the Hermes way
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>`, what Qwen2.5's template asks for) or as a bare object."""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tokenmill.server.errors import bad_request
from tokenmill.structured.params import StructuredOutputs

MAX_TOOLS = 128
_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_OPEN_TAG = "<tool_call>"


@dataclass(frozen=True)
class ToolChoice:
    """`mode`: "none", "auto", "required" or "named" (then `name` is the function); `tools`: name -> function."""

    mode: str
    tools: dict[str, dict[str, Any]]
    name: str | None = None
    parallel: bool = True  # several calls in one answer (`parallel_tool_calls`)

    def constraint(self) -> StructuredOutputs | None:
        if self.mode == "named":
            assert self.name is not None
            return StructuredOutputs(json=_parameters(self.tools[self.name]), field_name="tools")
        if self.mode == "required":
            calls, defs = [], {}
            for i, (name, function) in enumerate(self.tools.items()):
                arguments, own = _hoisted(_parameters(function), f"tool{i}_")
                defs |= own
                calls.append({"type": "object", "properties": {"name": {"const": name}, "arguments": arguments},
                              "required": ["name", "arguments"], "additionalProperties": False})
            schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
            schema |= {"maxItems": 1} if not self.parallel else {}
            return StructuredOutputs(json=schema | ({"$defs": defs} if defs else {}), field_name="tools")
        return None

    def system_prompt(self) -> str:
        """How the tools and the expected answer are described to a model whose template does not render tools."""
        listed = "\n".join(json.dumps({"type": "function", "function": f}) for f in self.tools.values())
        text = ("You may call these functions, each given with a JSON schema of its arguments:\n"
                f"<tools>\n{listed}\n</tools>\n")
        if self.mode == "named":
            return text + f"Call {self.name} now: answer with its arguments as one JSON object."
        if self.mode == "required":
            return text + 'Answer now with a JSON array of calls: [{"name": <function name>, "arguments": {...}}].'
        return text + ('To call a function, answer with {"name": <function name>, "arguments": {...}} inside '
                       "<tool_call></tool_call> tags, one pair of tags per call.")

    def parse(self, text: str) -> list[dict[str, Any]] | None:
        """The OpenAI `tool_calls` of a finished output, or None where it holds no well-formed call."""
        if self.mode == "named":  # the whole output is the arguments, whole or cut short by max_tokens
            assert self.name is not None
            return [_call(self.name, text)]
        if self.mode == "required":
            calls = _json_or_none(text)
            return _calls(calls, self.tools) if isinstance(calls, list) else None
        if self.mode != "auto":
            return None
        tagged = _TAGGED.findall(text)
        if tagged:
            return _calls([_json_or_none(t) for t in tagged], self.tools)
        whole = _json_or_none(text.strip())
        return _calls(whole if isinstance(whole, list) else [whole], self.tools)

    def split(self, text: str) -> tuple[str | None, list[dict[str, Any]] | None]:
        """A finished output as OpenAI's (`content`, `tool_calls`): with calls, the content is the text an `auto`
        answer wrote before its first tagged call (None where there is none)."""
        calls = self.parse(text)
        if calls is None:
            return text, None
        lead = text[:max(text.find(_OPEN_TAG), 0)].strip() if self.mode == "auto" else ""
        return lead or None, calls


def parse_tool_choice(tools: list[Any] | None, tool_choice: Any, parallel: bool = True) -> ToolChoice | None:
    """Checks `tools` and `tool_choice` as OpenAI does (a 400 naming the field); None when no tool may be called."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    if len(tools) > MAX_TOOLS:
        raise bad_request(f"at most {MAX_TOOLS} tools, got {len(tools)}", "tools")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise bad_request(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}} with a "
                              "name of 1 to 64 letters, digits, '_' or '-'", f"tools[{i}]")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise bad_request(f"tools[{i}].function.parameters must be a JSON schema object",
                              f"tools[{i}].function.parameters")
        functions[name] = function
    if tool_choice in (None, "auto"):
        return ToolChoice("auto", functions)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return ToolChoice("required", functions, parallel=parallel)
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or tool_choice.get("type") != "function":
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'function': "
                          "{'name': ...}}", "tool_choice")
    if name not in functions:
        raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
    return ToolChoice("named", functions, name)


class ToolCallStream:
    """Turns one choice's streamed text into chat deltas: a named call's arguments stream as they come; calls of
    `required` and `auto` are sent whole when the output ends. An `auto` answer that does not start like a call
    streams as content from its first telling characters, up to a tagged call it may write later (text that could
    be the start of a tag is held back until it is told apart)."""

    def __init__(self, choice: ToolChoice) -> None:
        self.choice = choice
        self.buffer = ""  # text not sent yet: a call being written, or what may still turn out to be one
        self.content = False  # streaming an auto answer's plain text
        self.started = False

    def feed(self, text: str) -> list[dict[str, Any]]:
        if self.choice.mode == "named":
            deltas = []
            if not self.started:
                self.started = True
                deltas.append({"tool_calls": [_call(self.choice.name or "", "", index=0)]})
            return deltas + ([{"tool_calls": [{"index": 0, "function": {"arguments": text}}]}] if text else [])
        self.buffer += text
        if not self.content:
            head = self.buffer.lstrip()
            if self.choice.mode == "required" or not head or head.startswith(("{", "[", _OPEN_TAG)) \
                    or _OPEN_TAG.startswith(head):
                return []
            self.content = True
        at = self.buffer.find(_OPEN_TAG)
        if at >= 0:  # a tagged call starts: held from here to the end
            self.content = False
        else:
            at = len(self.buffer) - _tag_prefix_length(self.buffer)
        sent, self.buffer = self.buffer[:at], self.buffer[at:]
        return [{"content": sent}] if sent else []

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        if self.choice.mode == "named":
            return ([] if self.started else self.feed("")), finish_reason
        if not self.buffer:
            return [], finish_reason
        calls = self.choice.parse(self.buffer) if finish_reason == "stop" and not self.content else None
        if calls is None:
            return [{"content": self.buffer}], finish_reason
        deltas = [{"tool_calls": [dict(call, index=i)]} for i, call in enumerate(calls)]
        return deltas, finish_reason_with_calls(self.choice, finish_reason)


def finish_reason_with_calls(choice: ToolChoice, finish_reason: str | None) -> str | None:
    """OpenAI answers "tool_calls" when the model chose to call (auto, required), "stop" for a forced function."""
    return "tool_calls" if finish_reason == "stop" and choice.mode != "named" else finish_reason


def _tag_prefix_length(text: str) -> int:
    """How many of `text`'s last characters could begin a `<tool_call>` tag."""
    return next((n for n in range(min(len(text), len(_OPEN_TAG) - 1), 0, -1) if text.endswith(_OPEN_TAG[:n])), 0)


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object"}


def _hoisted(schema: dict[str, Any], prefix: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """`schema` without its `$defs` / `definitions`, its local references renamed to `#/$defs/<prefix><name>`, and
    those definitions under their new names: nested in a bigger schema, its references still resolve."""
    defs = {**schema.get("definitions", {}), **schema.get("$defs", {})}
    if not defs:
        return schema, {}

    def rename(node: Any) -> Any:
        if isinstance(node, dict):
            out = {k: rename(v) for k, v in node.items() if k not in ("$defs", "definitions") or node is not schema}
            ref = out.get("$ref")
            if isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
                out["$ref"] = "#/$defs/" + prefix + ref.split("/", 2)[2]
            return out
        if isinstance(node, list):
            return [rename(v) for v in node]
        return node

    return rename(schema), {prefix + name: rename(value) for name, value in defs.items()}


def _call(name: str, arguments: str, index: int | None = None) -> dict[str, Any]:
    call: dict[str, Any] = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                            "function": {"name": name, "arguments": arguments}}
    return call if index is None else {"index": index, **call}


def _calls(items: list[Any], tools: dict[str, dict[str, Any]]) -> list[dict[str, Any]] | None:
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in tools:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        calls.append(_call(item["name"], arguments if isinstance(arguments, str) else json.dumps(arguments)))
    return calls or None


def _json_or_none(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None
