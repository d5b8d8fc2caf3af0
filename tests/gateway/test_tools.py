"""Tool calls and structured output through the live server with the OpenAI SDK: the tiny
random-weight model's output follows the schema only because decoding is constrained."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False,
}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False,
}}}
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3}},
     "required": ["name", "tags"], "additionalProperties": False},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                      "kind": {"enum": ["x", "y", "z"]}}, "required": ["n", "kind"],
     "additionalProperties": False},
]
MESSAGES = [{"role": "user", "content": "What is the weather in Oslo?"}]


@pytest.fixture(scope="module")
def client(gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key, max_retries=0)


def chat(client, gateway, **kwargs):
    kwargs.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=gateway.model, messages=MESSAGES, **kwargs)


@pytest.mark.parametrize("schema", SCHEMAS)
@pytest.mark.parametrize("seed", [0, 1])
def test_json_schema_output_validates(client, gateway, schema, seed):
    fmt = {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": True}}
    choice = chat(client, gateway, response_format=fmt, seed=seed, temperature=1.0).choices[0]
    assert choice.finish_reason == "stop"
    jsonschema.validate(json.loads(choice.message.content), schema)


def test_json_object_output_is_an_object(client, gateway):
    # Any object may be unbounded (a random model happily writes an endless string): a reply that
    # stopped on its own parses; one cut off by max_tokens is still a JSON object's prefix.
    for seed in range(3):
        choice = chat(client, gateway, response_format={"type": "json_object"}, seed=seed).choices[0]
        assert choice.message.content.startswith("{")
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)


def _check_calls(calls, tools):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    assert calls
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_yields_valid_calls(client, gateway, seed):
    tools = [WEATHER, CLOCK]
    choice = chat(client, gateway, tools=tools, tool_choice="required", seed=seed, parallel_tool_calls=seed == 2,
                  max_tokens=80).choices[0]
    assert choice.finish_reason == "tool_calls"
    _check_calls(choice.message.tool_calls, tools)
    if seed != 2:
        assert len(choice.message.tool_calls) == 1


def test_named_tool_choice_calls_that_function(client, gateway):
    named = {"type": "function", "function": {"name": "get_time"}}
    choice = chat(client, gateway, tools=[WEATHER, CLOCK], tool_choice=named, parallel_tool_calls=False, max_tokens=80).choices[0]
    assert [c.function.name for c in choice.message.tool_calls] == ["get_time"]
    _check_calls(choice.message.tool_calls, [CLOCK])


def test_tool_results_go_back_through_the_template(client, gateway):
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    reply = client.chat.completions.create(model=gateway.model, messages=history, tools=[WEATHER], max_tokens=8)
    assert reply.choices[0].finish_reason in ("stop", "length", "tool_calls")
    assert reply.usage.prompt_tokens > 40  # tools, the call and its result are all in the prompt


@pytest.mark.parametrize("kwargs, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format", "nonsense"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "fly"}}}, "tool_choice", "fly"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"messages": [*MESSAGES, {"role": "tool", "tool_call_id": "call_9", "content": "x"}]}, "messages", "call_9"),
])
def test_bad_tool_requests_get_a_400_naming_the_problem(client, gateway, kwargs, param, words):
    body = {"model": gateway.model, "messages": MESSAGES, "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**body)
    assert err.value.body["param"] == param
    assert words in err.value.body["message"]
