"""The agents' local tools: exact arithmetic without eval, grep-like search, sub-agents, and an
error string (never an exception) for whatever a model sends."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tokenfactory.agents.local_tools import (
    MAX_SUBAGENTS,
    ToolBox,
    ToolError,
    calculate,
    calculator_tool,
    file_search_tool,
    search_files,
    spawn_subagents_tool,
)
from tokenfactory.engine.grammar import json_schema_grammar


def call(box: ToolBox, name: str, arguments: str) -> str:
    return asyncio.run(box.call(name, arguments))


@pytest.mark.parametrize("expression, value", [
    ("1 + 2 * 3", 7), ("(1 + 2) * 3", 9), ("7 / 2", 3.5), ("7 // 2", 3), ("-7 % 3", 2), ("2 ** 10", 1024),
    ("-(3 - 5)", 2), ("1.5e3 + 1", 1501.0), ("1234 * 5678 - 91", 7006561),
])
def test_calculator_computes_arithmetic(expression, value):
    assert calculate(expression) == value


@pytest.mark.parametrize("expression, message", [
    ("__import__('os').system('true')", "only numbers"),
    ("open('/etc/passwd')", "only numbers"),
    ("x + 1", "only numbers"),
    ("True + 1", "only numbers"),
    ("1 +", "cannot parse"),
    ("1 / 0", "division by zero"),
    ("9 ** 9 ** 9", "exponents above"),
    ("10.0 ** 400", "too large"),
    ("(-8) ** 0.5", "not a real number"),
    ("1" * 400, "longer than"),
])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, message):
    with pytest.raises(ToolError, match=message):
        calculate(expression)


def test_search_finds_lines_with_numbers_in_path_order(tmp_path: Path):
    (tmp_path / "b.txt").write_text("nothing\nAn Error here\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_text("error one\nfine\nerror two\n")
    (tmp_path / "blob.bin").write_bytes(b"\xff\xfe error \x00")
    assert search_files(tmp_path, "ERROR") == ["b.txt:2: An Error here", "sub/a.txt:1: error one",
                                               "sub/a.txt:3: error two"]
    assert search_files(tmp_path, "error", max_results=2) == ["b.txt:2: An Error here", "sub/a.txt:1: error one"]
    assert search_files(tmp_path, "absent") == []
    with pytest.raises(ToolError, match="empty"):
        search_files(tmp_path, "  ")


def test_toolbox_turns_every_bad_call_into_an_error_string(tmp_path: Path):
    box = ToolBox([calculator_tool(), file_search_tool(tmp_path), spawn_subagents_tool(None)])
    assert call(box, "calculator", '{"expression": "6 * 7"}') == "42"
    assert call(box, "nope", "{}").startswith("error: no tool named 'nope'")
    assert call(box, "calculator", "{not json").startswith("error: the arguments are not JSON")
    assert call(box, "calculator", "[1, 2]") == "error: the arguments must be a JSON object"
    assert call(box, "calculator", '{"expression": 5}') == "error: argument 'expression' must be a string"
    assert call(box, "calculator", '{"expression": " 1 1 1"}').startswith("error: cannot parse")
    assert call(box, "search_files", '{"text": "zzz"}') == "no line contains 'zzz'"
    assert call(box, "spawn_subagents", '{"tasks": ["a"]}') == "error: sub-agents cannot spawn sub-agents of their own"
    assert call(ToolBox([file_search_tool(None)]), "search_files", '{"text": "x"}').startswith(
        "error: no folder to search")


def test_spawn_runs_subtasks_concurrently_and_returns_answers_in_order():
    running, peak = 0, 0

    async def run_subtask(task: str) -> str:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.01)
        running -= 1
        return task.upper()

    box = ToolBox([spawn_subagents_tool(run_subtask)])
    result = json.loads(call(box, "spawn_subagents", '{"tasks": ["one", "two", "three"]}'))
    assert result == [{"task": t, "answer": t.upper()} for t in ("one", "two", "three")]
    assert peak == 3
    too_many = json.dumps({"tasks": ["t"] * (MAX_SUBAGENTS + 1)})
    assert call(box, "spawn_subagents", too_many).startswith(f"error: at most {MAX_SUBAGENTS} sub-agents")
    assert call(box, "spawn_subagents", '{"tasks": []}').startswith("error: argument 'tasks'")


def test_tool_schemas_compile_into_grammars(tmp_path: Path):
    for tool in (calculator_tool(), file_search_tool(tmp_path), spawn_subagents_tool(None)):
        assert json_schema_grammar(tool.parameters)
        assert tool.schema()["function"]["name"] == tool.name
