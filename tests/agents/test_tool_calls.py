from __future__ import annotations

import json
import random

import pytest

from tokenfactory.agents.tool_calls import CallDelta, ToolCallParser, collect, parse_tool_calls

REPLIES = [
    'Let me check. <tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
    '<tool_call>{"name": "b", "arguments": {}}</tool_call><tool_call>{oops}</tool_call>',
    '<|python_tag|>{"name": "f", "parameters": {"q": "x"}}; {"name": "g", "parameters": {}}',
    '{"answer": 42}',
    'Hi <tool_call>\n{"name":"f","arguments":{"s":"a}\\"{","t":[1,{"u":null}]}}\n</tool_call>\nDone.',
    '<tool_call>{"arguments": {"a": 1}, "name": "z"}</tool_call>',
    '  a < b, and <tool',
    '<tool_call>\n{"name": "f", "arguments": {"a": [1, 2',
]


def test_hermes_two_calls_and_malformed_json_left_as_text():
    content, calls = parse_tool_calls(REPLIES[0])
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert content == "Let me check.<tool_call>{oops}</tool_call>"  # whitespace next to calls dropped
    assert len({c.id for c in calls}) == 2


def test_llama_json_form_and_plain_json_that_is_no_call():
    content, calls = parse_tool_calls(REPLIES[1])
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", '{"q": "x"}'), ("g", "{}")]
    assert parse_tool_calls(REPLIES[2]) == (REPLIES[2], [])


def test_arguments_are_the_models_own_text_even_with_braces_in_strings():
    content, calls = parse_tool_calls(REPLIES[3])
    assert content == "Hi\nDone."
    assert calls[0].arguments == '{"s":"a}\\"{","t":[1,{"u":null}]}'


def test_a_call_written_arguments_first_still_counts_once_its_block_closes():
    assert [(c.name, json.loads(c.arguments)) for c in parse_tool_calls(REPLIES[4])[1]] == [("z", {"a": 1})]


def test_a_cut_off_call_keeps_its_arguments_so_far_and_text_without_calls_is_kept_whole():
    assert [(c.name, c.arguments) for c in parse_tool_calls(REPLIES[6])[1]] == [("f", '{"a": [1, 2')]
    assert parse_tool_calls(REPLIES[5]) == (REPLIES[5], [])


@pytest.mark.parametrize("reply", REPLIES)
def test_any_cut_into_pieces_gives_the_same_content_and_calls(reply):
    content, calls = parse_tool_calls(reply)
    rng = random.Random(0)
    for _ in range(50):
        parser, events, pos = ToolCallParser(), [], 0
        while pos < len(reply):
            step = rng.randint(1, 6)
            events += parser.push(reply[pos : pos + step])
            pos += step
        events += parser.finish()
        streamed_content, streamed_calls = collect(events)
        assert streamed_content == content
        assert [(c.name, c.arguments) for c in streamed_calls] == [(c.name, c.arguments) for c in calls]


def test_stream_releases_the_name_early_then_arguments_as_written_and_never_the_tags():
    parser = ToolCallParser()
    pieces = ["Hi ", "<tool", '_call>\n{"name": "get', '_w", "argu', 'ments": {"ci', 'ty": "Oslo"', "}}\n</tool_call>"]
    out = [parser.push(p) for p in pieces] + [parser.finish()]
    assert out[:4] == [["Hi"], [], [], []]
    head = out[4][0]
    assert isinstance(head, CallDelta) and (head.index, head.name, head.arguments) == (0, "get_w", '{"ci')
    assert head.id.startswith("call_")
    assert out[5:] == [[CallDelta(0, 'ty": "Oslo"')], [CallDelta(0, "}")], []]
    plain = ToolCallParser()
    assert plain.push("a < b ") == ["a < b"]  # trailing whitespace waits: a call may follow it
    assert plain.finish() == [" "]
