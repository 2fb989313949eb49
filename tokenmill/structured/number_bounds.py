"""Bounds on how long a JSON number may be written under a schema.

A JSON-schema number has no length limit, and a sampled model can keep writing digits (`0.2211371504093881...`)
until `max_tokens` cuts the output short of valid JSON. llama.cpp's schema grammars bound numbers for that reason;
here the schema handed to the grammar engine gets the same kind of bound as ordinary keywords: at most 16 integer
digits (`minimum`/`maximum` of +-1e16), at most 10 fraction digits and no exponent (`multipleOf` 1e-10, the finest
step llguidance accepts), on every number the schema does not bound itself. The bounded schema allows a subset of
what the original allows, so every output still validates against the client's schema; a schema that sets its own
`minimum`, `maximum` or `multipleOf` keeps them (the way to ask for longer numbers). Values the schema leaves
free (`{}`, `true`, an object's unlisted properties, an array's unlisted items) become a bounded "any JSON value"."""

from __future__ import annotations

from typing import Any

MAX_ABS = 10**16
FRACTION_STEP = 1e-10
ANY_NAME = "tokenmill_json_value"
_ANY_REF = {"$ref": f"#/$defs/{ANY_NAME}"}
_NUMBER = {"type": "number", "minimum": -MAX_ABS, "maximum": MAX_ABS, "multipleOf": FRACTION_STEP}
_BOUNDED_ANY = {"anyOf": [{"type": ["null", "boolean", "string"]}, _NUMBER,
                          {"type": "array", "items": _ANY_REF},
                          {"type": "object", "additionalProperties": _ANY_REF}]}

# Where subschemas sit whose instances must match them (so narrowing them narrows the whole). `not`, `if`,
# `contains` and `propertyNames` are left alone: narrowing those can let through what the original refused.
_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_LISTS = ("anyOf", "allOf", "oneOf", "prefixItems")
_SINGLE = ("additionalProperties", "items", "then", "else")
# Keywords that constrain an instance: a subschema with none of them allows any value.
_CONSTRAINING = frozenset(("type", "enum", "const", "$ref", "anyOf", "oneOf", "allOf", "not", "if", "properties",
                           "patternProperties", "additionalProperties", "required", "items", "prefixItems",
                           "contains", "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf",
                           "minLength", "maxLength", "pattern", "format", "minItems", "maxItems", "uniqueItems",
                           "minProperties", "maxProperties", "propertyNames", "dependentRequired",
                           "dependentSchemas", "$dynamicRef"))


def bound_numbers(schema: Any) -> Any:
    """`schema` (a dict; anything else is returned as is) with its free numbers and free values bounded, and the
    bounded "any value" added under `$defs` when it is used."""
    if not isinstance(schema, dict) or ANY_NAME in schema.get("$defs", {}):
        return schema
    used = [False]
    out = _walk(schema, used)
    if used[0]:
        out["$defs"] = {**out.get("$defs", {}), ANY_NAME: _BOUNDED_ANY}
    return out


def _walk(node: Any, used: list[bool]) -> Any:
    if node is True or node == {}:
        used[0] = True
        return dict(_ANY_REF)
    if not isinstance(node, dict):
        return node
    if not _CONSTRAINING.intersection(node):
        used[0] = True
        return {**node, **_ANY_REF}
    out = _bound_number(node)
    for key in _MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _walk(sub, used) for name, sub in out[key].items()}
    for key in _LISTS:
        if isinstance(out.get(key), list):
            out[key] = [_walk(sub, used) for sub in out[key]]
    for key in _SINGLE:
        if isinstance(out.get(key), list):  # `items` as a tuple (drafts before 2020-12)
            out[key] = [_walk(sub, used) for sub in out[key]]
        elif key in out:
            out[key] = _walk(out[key], used)
    types = _types(out)
    if "object" in types and "additionalProperties" not in out:
        out["additionalProperties"] = _walk(True, used)
    if "array" in types and "items" not in out:
        out["items"] = _walk(True, used)
    return out


def _types(node: dict[str, Any]) -> list[str]:
    kind = node.get("type")
    return [kind] if isinstance(kind, str) else [t for t in kind if isinstance(t, str)] if isinstance(kind, list) \
        else []


def _bound_number(node: dict[str, Any]) -> dict[str, Any]:
    """`node` with the number bounds it lacks, when it is a number or integer schema; a fixed value (`enum`,
    `const`) or bounds that are not numbers leave it as it is."""
    types = _types(node)
    if not {"number", "integer"} & set(types) or "enum" in node or "const" in node:
        return dict(node)
    bounds = [node.get(k) for k in ("minimum", "exclusiveMinimum", "maximum", "exclusiveMaximum")]
    if not all(b is None or isinstance(b, int | float) and not isinstance(b, bool) for b in bounds):
        return dict(node)
    low = max((b for b in bounds[:2] if b is not None), default=None)
    high = min((b for b in bounds[2:] if b is not None), default=None)
    out = dict(node)
    if high is None and (low is None or low < MAX_ABS):
        out["maximum"] = high = MAX_ABS
    if low is None and (high is None or high > -MAX_ABS):
        out["minimum"] = low = -MAX_ABS
    # Only where a multiple of the step lies strictly inside the range: a narrow one keeps its finer numbers.
    wide = low is None or high is None or high - low > 2 * FRACTION_STEP
    if "number" in types and "multipleOf" not in node and wide:
        out["multipleOf"] = FRACTION_STEP
    return out
