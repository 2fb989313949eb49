"""The schema rewrite that bounds how long numbers are written: exact outputs, and what it leaves alone."""

from __future__ import annotations

from tokenmill.structured.number_bounds import ANY_NAME, FRACTION_STEP, MAX_ABS, bound_numbers

ANY = {"$ref": f"#/$defs/{ANY_NAME}"}
BOUNDED = {"minimum": -MAX_ABS, "maximum": MAX_ABS}


def test_free_numbers_get_digit_bounds_and_integers_range_bounds() -> None:
    schema = {"type": "object", "properties": {"x": {"type": "number"}, "n": {"type": "integer"},
                                               "t": {"type": ["number", "null"]}},
              "additionalProperties": False}
    assert bound_numbers(schema) == {
        "type": "object", "additionalProperties": False,
        "properties": {"x": {"type": "number", **BOUNDED, "multipleOf": FRACTION_STEP},
                       "n": {"type": "integer", **BOUNDED},
                       "t": {"type": ["number", "null"], **BOUNDED, "multipleOf": FRACTION_STEP}}}


def test_a_schemas_own_bounds_are_kept() -> None:
    assert bound_numbers({"type": "number", "minimum": 0, "exclusiveMaximum": 1e30, "multipleOf": 0.5}) == \
        {"type": "number", "minimum": 0, "exclusiveMaximum": 1e30, "multipleOf": 0.5}
    # A lower bound above the default upper one gets no upper bound; a narrow range keeps its fine numbers.
    assert bound_numbers({"type": "integer", "minimum": 10**20}) == {"type": "integer", "minimum": 10**20}
    assert bound_numbers({"type": "number", "minimum": 0, "maximum": 1e-12}) == \
        {"type": "number", "minimum": 0, "maximum": 1e-12}
    assert bound_numbers({"type": "number", "maximum": 5}) == \
        {"type": "number", "maximum": 5, "minimum": -MAX_ABS, "multipleOf": FRACTION_STEP}


def test_fixed_values_negations_and_conditions_are_untouched() -> None:
    for schema in ({"type": "number", "enum": [1e20, 0.123456789012345]}, {"type": "number", "const": 1e20},
                   {"type": "string", "not": {"type": "number"}},
                   {"type": "string", "if": {"type": "number"}, "then": {"maxLength": 3}}):
        assert bound_numbers(schema) == schema
    assert bound_numbers(True) is True and bound_numbers("text") == "text"


def test_free_values_become_the_bounded_any_value() -> None:
    out = bound_numbers({"type": "object"})
    assert out["additionalProperties"] == ANY and set(out["$defs"]) == {ANY_NAME}
    out = bound_numbers({"type": "array", "items": {"description": "anything"},
                         "$defs": {"p": {"type": "object", "properties": {"q": True, "r": {}}}}})
    assert out["items"] == {"description": "anything", **ANY}
    assert out["$defs"]["p"] == {"type": "object", "properties": {"q": ANY, "r": ANY}, "additionalProperties": ANY}
    assert set(out["$defs"]) == {"p", ANY_NAME}
    assert bound_numbers(out) is out  # already bounded


def test_every_subschema_position_is_walked() -> None:
    number = {"type": "number"}
    bounded = {"type": "number", **BOUNDED, "multipleOf": FRACTION_STEP}
    schema = {"anyOf": [number], "allOf": [number], "oneOf": [number], "prefixItems": [number], "items": False,
              "patternProperties": {"^a": number}, "then": number, "else": number,
              "dependentSchemas": {"k": number}, "definitions": {"d": number}}
    out = bound_numbers(schema)
    for key in ("anyOf", "allOf", "oneOf", "prefixItems"):
        assert out[key] == [bounded]
    assert out["then"] == out["else"] == bounded and out["items"] is False
    assert out["patternProperties"] == {"^a": bounded} and out["dependentSchemas"] == {"k": bounded}
    assert out["definitions"] == {"d": bounded} and "$defs" not in out
