"""Structured output and tool calls through the OpenAI server with the official SDK, on the default model:
`chat.completions.parse` with pydantic models, JSON schemas over sampled choices, vLLM's regex and choice
extensions, tool calls streamed and not, and 400s that name the bad field. Tool-call parsing of free (`auto`)
output is tested on hand-written text."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field
from test_server import ServerThread

from tokenmill.config import EngineConfig
from tokenmill.server.app import create_app
from tokenmill.server.async_engine import AsyncEngine
from tokenmill.server.tools import ToolCallStream, parse_tool_choice

SCHEMAS = json.loads((Path(__file__).resolve().parents[1] / "benchmarks/data/json_schemas.json").read_text())
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                                       "required": ["zone"], "additionalProperties": False}}}
MODEL = "smollm2-135m-instruct"
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: float


class Review(BaseModel):
    stars: int = Field(ge=1, le=5)
    summary: str = Field(max_length=60)
    recommended: bool


@pytest.fixture(scope="module")
def client(model_path) -> Iterator[openai.OpenAI]:
    config = EngineConfig(model=str(model_path), dtype="float32", device="cpu", num_kv_blocks=256, max_num_seqs=32)
    engine = AsyncEngine.from_config(config)
    with ServerThread(create_app(engine)) as server:
        yield openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=300)
    engine.shutdown()


def test_sdk_parse_with_pydantic_models(client) -> None:
    for model, ask in ((City, "Describe Paris."), (Review, "Review the film Alien.")):
        completion = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": ask}],
                                                   response_format=model, temperature=0.8, seed=3, max_tokens=200)
        parsed = completion.choices[0].message.parsed
        assert isinstance(parsed, model), completion.choices[0].message.content


def test_sampled_choices_match_their_json_schemas(client) -> None:
    for name in ("order", "event", "shape", "flags"):
        reply = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": f"Give an example {name} as JSON."}], n=4,
            temperature=1.0, seed=7, max_tokens=300,
            response_format={"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name]}})
        for choice in reply.choices:
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    reply = client.chat.completions.create(model=MODEL, messages=ASK, max_tokens=200, temperature=0.5, seed=1,
                                           response_format={"type": "json_object"})
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def test_regex_and_choice_extensions(client) -> None:
    reply = client.completions.create(model=MODEL, prompt="The date today is", max_tokens=20, temperature=0.9,
                                      extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", reply.choices[0].text)
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Is water wet?"}],
                                           max_tokens=10, extra_body={"guided_choice": ["yes", "no"]})
    assert reply.choices[0].message.content in ("yes", "no")
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Pick a colour"}],
                                           max_tokens=10, n=3, temperature=1.0,
                                           extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}})
    assert {c.message.content for c in reply.choices} <= {"red", "green", "blue"}


def check_weather_call(call) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])


def test_named_and_required_tool_calls(client) -> None:
    named = {"type": "function", "function": {"name": "get_weather"}}
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice=named,
                                           max_tokens=100, temperature=0)
    message = reply.choices[0].message
    assert message.content is None and len(message.tool_calls) == 1 and reply.choices[0].finish_reason == "stop"
    check_weather_call(message.tool_calls[0])
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], tool_choice="required",
                                           max_tokens=150, temperature=0)
    assert reply.choices[0].finish_reason == "tool_calls"
    calls = reply.choices[0].message.tool_calls
    assert calls and all(c.function.name in ("get_weather", "get_time") for c in calls)
    for call in calls:
        spec = WEATHER if call.function.name == "get_weather" else TIME
        jsonschema.validate(json.loads(call.function.arguments), spec["function"]["parameters"])


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_streamed_tool_calls_through_the_sdk(client, tool_choice) -> None:
    with client.chat.completions.stream(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
                                        max_tokens=100, temperature=0) as stream:
        final = stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls and len(calls) >= 1
    check_weather_call(calls[0])
    # the same call as without streaming
    reply = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
                                           max_tokens=100, temperature=0)
    assert reply.choices[0].message.tool_calls[0].function.arguments == calls[0].function.arguments


class Place(BaseModel):
    city: str = Field(max_length=20)
    country: str = Field(max_length=20)


class Trip(BaseModel):
    origin: Place
    destination: Place


def test_required_call_of_a_tool_with_nested_models(client) -> None:
    """pydantic_function_tool puts nested models in $defs: nested under the calls' array, they must still resolve."""
    tool = openai.pydantic_function_tool(Trip)
    assert "$defs" in tool["function"]["parameters"]
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Plan a trip."}],
                                           tools=[tool, WEATHER], tool_choice="required", parallel_tool_calls=False,
                                           max_tokens=150, temperature=0)
    calls = reply.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 1
    if calls[0].function.name == "Trip":
        Trip.model_validate_json(calls[0].function.arguments)
    else:
        check_weather_call(calls[0])


def test_a_tool_conversation_renders(client) -> None:
    messages = [*ASK, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": 21}'}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], max_tokens=30,
                                           temperature=0)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")


@pytest.mark.parametrize(("body", "param"), [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type"),
    ({"guided_regex": "(a|b"}, "guided_regex"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_regex"),
    ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0]"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": None}}, "tool_choice"),
    ({"structured_outputs": {"choice": 5}}, "structured_outputs"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "description": "x" * 70_000}}}}, "response_format"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "1", "type": "function"}]}]},
     "messages[1].tool_calls[0]"),
])
def test_bad_constraints_are_400s_naming_the_field(client, body, param) -> None:
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=body.pop("messages", ASK), max_tokens=5,
                                       extra_body=body)
    assert error.value.body["param"] == param, error.value.body


def test_structured_output_metrics(client) -> None:
    text = httpx.get(str(client.base_url).removesuffix("/v1/") + "/metrics").text
    values = {line.split("{")[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("tokenmill:") and "{" in line}
    assert values["tokenmill:structured_output_requests_total"] > 0
    assert values["tokenmill:grammar_compilations_total"] > 0
    assert "tokenmill:grammar_cache_hits_total" in values


def test_auto_tool_calls_are_parsed_from_free_text() -> None:
    auto = parse_tool_choice([WEATHER, TIME], "auto")
    assert auto is not None and auto.constraint() is None
    text = ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}\n</tool_call>\n'
            '<tool_call>{"name": "get_time", "arguments": {"zone": "CET"}}</tool_call>')
    calls = auto.parse(text)
    assert [c["function"]["name"] for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Oslo", "unit": "celsius"}
    assert auto.parse('{"name": "get_time", "arguments": {"zone": "UTC"}}')[0]["function"]["name"] == "get_time"
    assert auto.parse("It is sunny.") is None
    assert auto.parse('<tool_call>{"name": "unknown", "arguments": {}}</tool_call>') is None
    # streamed: plain text flows as content at once; a call is held back and sent whole at the end
    plain = ToolCallStream(auto)
    assert plain.feed("It is") == [{"content": "It is"}] and plain.feed(" sunny") == [{"content": " sunny"}]
    assert plain.finish("stop") == ([], "stop")
    call = ToolCallStream(auto)
    assert call.feed("<tool_") == [] and call.feed(text[6:]) == []
    deltas, reason = call.finish("stop")
    assert reason == "tool_calls" and [d["tool_calls"][0]["index"] for d in deltas] == [0, 1]
    # text before a tagged call is the message's content, streamed or not; a '<' that is no tag goes out later
    mixed = "Let me check 1 < 2.\n" + text
    content, split_calls = auto.split(mixed)
    assert content == "Let me check 1 < 2." and [c["function"]["name"] for c in split_calls] == \
        ["get_weather", "get_time"]
    assert auto.split("It is sunny.") == ("It is sunny.", None) and auto.split(text)[0] is None
    stream = ToolCallStream(auto)
    pieces = [mixed[i:i + 3] for i in range(0, len(mixed), 3)]
    sent = [delta for piece in pieces for delta in stream.feed(piece)]
    assert "".join(d["content"] for d in sent) == "Let me check 1 < 2.\n"
    deltas, reason = stream.finish("stop")
    assert reason == "tool_calls" and [d["tool_calls"][0]["function"]["name"] for d in deltas] == \
        ["get_weather", "get_time"]
    cut = ToolCallStream(auto)
    assert cut.feed("Say <tool") == [{"content": "Say "}] and cut.finish("length") == ([{"content": "<tool"}],
                                                                                       "length")
