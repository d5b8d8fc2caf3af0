from __future__ import annotations

import json

from tokenfactory.agents.tool_calls import ToolCallStream, parse_tool_calls


def test_hermes_two_calls_and_malformed_json_left_as_text():
    text = ('Let me check. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b", "arguments": {}}</tool_call><tool_call>{oops}</tool_call>')
    content, calls = parse_tool_calls(text)
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert content == "Let me check. \n<tool_call>{oops}</tool_call>"
    assert len({c.id for c in calls}) == 2


def test_llama_json_form_and_plain_json_that_is_no_call():
    _, calls = parse_tool_calls('<|python_tag|>{"name": "f", "parameters": {"q": "x"}}; {"name": "g", "parameters": {}}')
    assert [c.name for c in calls] == ["f", "g"]
    assert parse_tool_calls('{"answer": 42}') == ('{"answer": 42}', [])


def test_stream_holds_back_a_possible_call_and_releases_plain_text():
    stream = ToolCallStream()
    assert stream.push("Hello <tool") == "Hello "
    assert stream.push("_call>\n{\"name\": \"f\", \"arguments\": {}}\n</tool_call>") == ""
    rest, calls = stream.finish()
    assert rest == "" and [c.name for c in calls] == ["f"]
    plain = ToolCallStream()
    assert plain.push("a < b") == "a < b"
    assert plain.finish() == ("", [])
