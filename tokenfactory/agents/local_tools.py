"""Tools an agent runs on this machine: a calculator, a search over a folder's files, and
sub-agents.

Each tool is a JSON schema (what the model sees in `tools`) plus a function of the parsed
arguments. Models send anything: a tiny random-weight model sends arguments that only the
grammar made well-formed, and a real model may call a tool that does not exist. So `ToolBox.call`
never raises: whatever goes wrong comes back as an `error: ...` string, which the agent returns to
the model as the tool's result, as a real tool runtime would.
"""

from __future__ import annotations

import ast
import asyncio
import json
import math
import operator
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MAX_EXPRESSION_CHARS = 200
MAX_EXPONENT = 1000
"""Bounds `a ** b` so that no expression can take the process's memory or time."""
MAX_MAGNITUDE = 1e300

MAX_FILE_BYTES = 1 << 20
"""Search skips larger files (logs, data dumps): a grep for an agent, not for a data lake."""
MAX_LINE_CHARS = 200

ToolFunction = Callable[[dict[str, Any]], Awaitable[str]]


class ToolError(ValueError):
    """A tool call the tool cannot do; the message goes back to the model."""


@dataclass(frozen=True, slots=True)
class Tool:
    name: str
    description: str
    parameters: dict[str, Any]
    """The arguments' JSON schema (strict: every property required, nothing else allowed)."""
    run: ToolFunction

    def schema(self) -> dict[str, Any]:
        """The tool as an OpenAI `tools` entry."""
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}


class ToolBox:
    """The tools an agent may call, by name."""

    def __init__(self, tools: list[Tool]) -> None:
        self.tools = {tool.name: tool for tool in tools}

    def schemas(self) -> list[dict[str, Any]]:
        return [tool.schema() for tool in self.tools.values()]

    async def call(self, name: str, arguments: str) -> str:
        """Run one call -> its result text, or `error: ...` (never raises for the model's mistakes)."""
        tool = self.tools.get(name)
        if tool is None:
            return f"error: no tool named {name!r}; the tools are {', '.join(self.tools)}"
        try:
            parsed = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as e:
            return f"error: the arguments are not JSON ({e.msg} at character {e.pos})"
        if not isinstance(parsed, dict):
            return "error: the arguments must be a JSON object"
        try:
            return await tool.run(parsed)
        except ToolError as e:
            return f"error: {e}"


def string_argument(arguments: dict[str, Any], key: str) -> str:
    value = arguments.get(key)
    if not isinstance(value, str):
        raise ToolError(f"argument {key!r} must be a string")
    return value


# ---------------------------------------------------------------- calculator

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def calculate(expression: str) -> int | float:
    """The value of an arithmetic expression: numbers, + - * / // % **, parentheses. Parsed with
    `ast` and walked here; nothing is ever evaluated as Python."""
    if len(expression) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(expression.strip(), mode="eval")
    except SyntaxError:
        raise ToolError(f"cannot parse {expression!r} as arithmetic") from None
    return _value(tree.body)


def _value(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if abs(node.value) > MAX_MAGNITUDE:
            raise ToolError("a number in the expression is too large")
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_value(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ToolError(f"exponents above {MAX_EXPONENT} are not allowed")
        try:
            result = _BINARY[type(node.op)](left, right)
        except ZeroDivisionError:
            raise ToolError("division by zero") from None
        except OverflowError:
            raise ToolError("the result is too large") from None
        if isinstance(result, complex):
            raise ToolError("the result is not a real number")
        if abs(result) > MAX_MAGNITUDE or (isinstance(result, float) and math.isnan(result)):
            raise ToolError("the result is too large")
        return result
    raise ToolError(f"only numbers and + - * / // % ** are allowed, not {type(node).__name__}")


def calculator_tool() -> Tool:
    async def run(arguments: dict[str, Any]) -> str:
        value = calculate(string_argument(arguments, "expression"))
        return repr(value) if isinstance(value, float) else str(value)

    return Tool(
        "calculator", "Evaluate an arithmetic expression (numbers, + - * / // % ** and parentheses).",
        {"type": "object",
         "properties": {"expression": {"type": "string", "pattern": r"^[0-9+\-*/%(). ]{1,40}$"}},
         "required": ["expression"], "additionalProperties": False},
        run,
    )


# ---------------------------------------------------------------- file search


def search_files(root: Path, text: str, max_results: int = 10) -> list[str]:
    """Lines of the files under `root` that contain `text` (case-insensitive), as
    `path:line: text` with paths relative to `root`, in path order, at most `max_results`."""
    needle = text.strip().lower()
    if not needle:
        raise ToolError("the text to search for is empty")
    hits: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        if len(hits) >= max_results:
            break
        if path.stat().st_size > MAX_FILE_BYTES:
            continue
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (UnicodeDecodeError, OSError):
            continue  # binary or unreadable: not text to search
        for number, line in enumerate(lines, 1):
            if needle in line.lower():
                hits.append(f"{path.relative_to(root).as_posix()}:{number}: {line.strip()[:MAX_LINE_CHARS]}")
                if len(hits) >= max_results:
                    break
    return hits


def file_search_tool(root: str | Path | None, max_results: int = 10) -> Tool:
    """Search the files under `root`; None: no folder was given, and a call says so (the tool
    stays listed, so every agent's prompt starts the same)."""
    folder = Path(root) if root is not None else None
    if folder is not None and not folder.is_dir():
        raise ValueError(f"{folder} is not a folder")

    async def run(arguments: dict[str, Any]) -> str:
        text = string_argument(arguments, "text")
        if folder is None:
            raise ToolError("no folder to search was given to this agent")
        hits = await asyncio.to_thread(search_files, folder, text, max_results)
        return "\n".join(hits) if hits else f"no line contains {text!r}"

    return Tool(
        "search_files", "Find the lines of the files in the working folder that contain a text "
        "(case-insensitive), as path:line: text.",
        {"type": "object", "properties": {"text": {"type": "string", "pattern": r"^[A-Za-z0-9 _.,:-]{1,24}$"}},
         "required": ["text"], "additionalProperties": False},
        run,
    )


# ---------------------------------------------------------------- sub-agents

MAX_SUBAGENTS = 3


def spawn_subagents_tool(run_subtask: Callable[[str], Awaitable[str]] | None,
                         max_subagents: int = MAX_SUBAGENTS) -> Tool:
    """Starts one sub-agent per sub-task (at most `max_subagents`), all at once, and returns their
    answers in order. `run_subtask` runs one sub-agent to its answer; None: this agent may not spawn
    (a sub-agent), and the call says so (the tool stays listed, so every agent's prompt starts the
    same)."""
    if max_subagents < 1:
        raise ValueError(f"max_subagents must be >= 1, got {max_subagents}")

    async def run(arguments: dict[str, Any]) -> str:
        if run_subtask is None:
            raise ToolError("sub-agents cannot spawn sub-agents of their own")
        tasks = arguments.get("tasks")
        if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) and t.strip() for t in tasks):
            raise ToolError("argument 'tasks' must be a list of non-empty strings")
        if len(tasks) > max_subagents:
            raise ToolError(f"at most {max_subagents} sub-agents at a time, got {len(tasks)}")
        answers = await asyncio.gather(*(run_subtask(task) for task in tasks))
        return json.dumps([{"task": task, "answer": answer} for task, answer in zip(tasks, answers)],
                          ensure_ascii=False)

    return Tool(
        "spawn_subagents", f"Hand up to {max_subagents} sub-tasks to sub-agents that work on them at the "
        "same time; returns each sub-task's answer.",
        {"type": "object",
         "properties": {"tasks": {"type": "array", "minItems": 1, "maxItems": max_subagents,
                                  "items": {"type": "string", "pattern": r"^[ -~]{1,48}$"}}},
         "required": ["tasks"], "additionalProperties": False},
        run,
    )
