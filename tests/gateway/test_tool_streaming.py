"""Streamed tool calls in OpenAI's chunk format, against the live server: the deltas put
together equal the full response to the same seeded request, and the SDK's stream helpers read them."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

WEATHER = {"type": "function", "function": {"name": "get_weather", "strict": True, "parameters": {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 8}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"], "additionalProperties": False,
}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "strict": True, "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"],
    "additionalProperties": False,
}}}
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
# With tool_choice auto nothing is forced, so the random model would not write a call; a response
# format shaped like Llama 3's JSON call makes it write one, which the auto parser must find.
JSON_FORM_CALL = {"type": "json_schema", "json_schema": {"name": "call", "strict": True, "schema": {
    "type": "object", "properties": {"name": {"const": "get_time"}, "parameters": SCHEMAS["get_time"]},
    "required": ["name", "parameters"], "additionalProperties": False}}}
CASES = {
    "required": {"tool_choice": "required", "parallel_tool_calls": False},
    "named": {"tool_choice": {"type": "function", "function": {"name": "get_time"}}},
    "auto": {"tool_choice": "auto", "response_format": JSON_FORM_CALL},
}


def body(gateway, seed: int, **kwargs) -> dict:
    return {"model": gateway.model, "messages": [{"role": "user", "content": "Oslo?"}],
            "tools": [WEATHER, CLOCK], "max_tokens": 60, "seed": seed, "temperature": 1.0, **kwargs}


def stream_chunks(gateway, request: dict) -> list[dict]:
    chunks = []
    with httpx.stream("POST", f"{gateway.url}/v1/chat/completions", json={**request, "stream": True},
                      headers={"Authorization": f"Bearer {gateway.api_key}"}, timeout=120) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line.removeprefix("data: ")))
    return chunks


def reassemble(chunks: list[dict]) -> tuple[str, list[tuple[str, str]], str | None]:
    """-> (content, [(name, arguments)], finish_reason), checking every tool-call delta's shape:
    a call's first delta carries index, id, type and name; the later ones index and arguments only."""
    content, calls, finish = "", {}, None
    for chunk in chunks:
        (choice,) = chunk["choices"]
        content += choice["delta"].get("content") or ""
        for delta in choice["delta"].get("tool_calls", []):
            if delta["index"] not in calls:
                assert delta["index"] == len(calls)
                assert delta["id"].startswith("call_") and delta["type"] == "function"
                calls[delta["index"]] = [delta["function"]["name"], delta["function"]["arguments"]]
            else:
                assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
                calls[delta["index"]][1] += delta["function"]["arguments"]
        finish = choice["finish_reason"] or finish
    return content, [tuple(c) for c in calls.values()], finish


def full_response(gateway, request: dict) -> tuple[str, list[tuple[str, str]], str | None]:
    response = httpx.post(f"{gateway.url}/v1/chat/completions", json=request,
                          headers={"Authorization": f"Bearer {gateway.api_key}"}, timeout=120)
    (choice,) = response.json()["choices"]
    calls = [(c["function"]["name"], c["function"]["arguments"]) for c in choice["message"].get("tool_calls", [])]
    return choice["message"]["content"] or "", calls, choice["finish_reason"]


@pytest.mark.parametrize("case", CASES)
def test_streamed_calls_equal_the_full_response(gateway, case):
    request = body(gateway, seed=5, **CASES[case])
    chunks = stream_chunks(gateway, request)
    streamed = reassemble(chunks)
    assert streamed == full_response(gateway, request)
    content, calls, finish = streamed
    assert finish == "tool_calls" and content == ""
    assert len(calls) == 1
    if case != "required":
        assert calls[0][0] == "get_time"
    jsonschema.validate(json.loads(calls[0][1]), SCHEMAS[calls[0][0]])
    pieces = sum("tool_calls" in c["choices"][0]["delta"] for c in chunks)
    assert pieces > 2  # the arguments arrived in pieces, not in one delta at the end


def test_parallel_calls_stream_with_their_own_indexes(gateway):
    seen_two = False
    for seed in range(4):
        request = body(gateway, seed=seed, tool_choice="required", parallel_tool_calls=True, temperature=0.0 if
                       seed == 0 else 1.0)
        streamed = reassemble(stream_chunks(gateway, request))
        assert streamed == full_response(gateway, request)
        _, calls, finish = streamed
        if finish == "tool_calls":
            for name, arguments in calls:
                jsonschema.validate(json.loads(arguments), SCHEMAS[name])
        seen_two |= len(calls) >= 2
    assert seen_two


def test_openai_stream_helpers_read_the_deltas(gateway):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=gateway.api_key, max_retries=0)
    request = body(gateway, seed=3, tool_choice="required", parallel_tool_calls=False)
    with client.chat.completions.stream(**request) as stream:
        events = list(stream)
        final = stream.get_final_completion()
    argument_pieces = [e for e in events if e.type == "tool_calls.function.arguments.delta"]
    (done,) = [e for e in events if e.type == "tool_calls.function.arguments.done"]
    assert len(argument_pieces) > 1
    jsonschema.validate(done.parsed_arguments, SCHEMAS[done.name])
    (call,) = final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason == "tool_calls"
    assert (call.function.name, call.function.parsed_arguments) == (done.name, done.parsed_arguments)
