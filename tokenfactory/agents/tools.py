"""The tool side of a chat request: check `tools`, `tool_choice` and the tool messages, decide
which calls decoding must produce, and render tools for templates that know nothing of them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tokenfactory.agents.tool_calls import HERMES_CLOSE, HERMES_OPEN


class ToolRequestError(ValueError):
    """A request whose tools, tool_choice or messages do not fit together."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request asks of tool calling."""

    parse_calls: bool
    """Look for calls in the output (tools given and tool_choice is not `none`)."""
    forced: list[tuple[str, dict[str, Any]]]
    """(name, parameters schema) of the functions decoding must call; empty: free text allowed."""


def plan_tools(tools: list[dict[str, Any]] | None, tool_choice: str | dict[str, Any] | None) -> ToolPlan:
    functions = _functions(tools or [])
    if tool_choice is None:
        tool_choice = "auto" if functions else "none"
    if isinstance(tool_choice, dict):
        name = (tool_choice.get("function") or {}).get("name")
        if tool_choice.get("type") != "function" or not isinstance(name, str):
            raise ToolRequestError('a named tool_choice is {"type": "function", "function": {"name": ...}}',
                                   "tool_choice")
        if name not in functions:
            raise ToolRequestError(f"tool_choice names function '{name}', which is not in tools", "tool_choice")
        return ToolPlan(True, [(name, functions[name])])
    if tool_choice not in ("none", "auto", "required"):
        raise ToolRequestError(f"tool_choice must be none, auto, required or a named function, got "
                               f"'{tool_choice}'", "tool_choice")
    if tool_choice != "none" and not functions:
        raise ToolRequestError(f"tool_choice '{tool_choice}' needs tools", "tool_choice")
    forced = list(functions.items()) if tool_choice == "required" else []
    return ToolPlan(tool_choice != "none", forced)


def _functions(tools: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type") != "function" or not isinstance(function, dict) or not function.get("name"):
            raise ToolRequestError(f'tools[{i}] must be {{"type": "function", "function": {{"name": ...}}}}',
                                   "tools")
        parameters = function.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(parameters, dict):
            raise ToolRequestError(f"tools[{i}].function.parameters must be a JSON schema object", "tools")
        functions[function["name"]] = parameters
    return functions


def check_tool_messages(messages: list[dict[str, Any]]) -> None:
    """Every `tool` message answers a call an earlier assistant message made, by id."""
    call_ids: set[str] = set()
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            call_ids.update(call.get("id") for call in message.get("tool_calls") or [] if isinstance(call, dict))
        elif message["role"] == "tool":
            call_id = message.get("tool_call_id")
            if call_id is None or call_id not in call_ids:
                raise ToolRequestError(f"messages[{i}] has role 'tool' but its tool_call_id {call_id!r} matches "
                                       "no tool call of an earlier assistant message", "messages")


def render_without_template_support(messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None
                                    ) -> list[dict[str, Any]]:
    """For chat templates that ignore tools: describe the tools in the system message, and turn
    tool calls and tool results into plain assistant and user text, all in the Hermes format, so
    the model still sees the whole exchange."""
    rendered = []
    for message in messages:
        message = dict(message)
        calls = message.pop("tool_calls", None) or []
        if calls:
            blocks = [f"{HERMES_OPEN}\n{_call_json(call)}\n{HERMES_CLOSE}" for call in calls]
            message["content"] = "\n".join(filter(None, [message.get("content"), *blocks]))
        if message["role"] == "tool":
            message = {"role": "user", "content": f"<tool_response>\n{message.get('content', '')}\n</tool_response>"}
        rendered.append(message)
    if tools:
        listing = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
        intro = (f"You may call functions. Their signatures:\n<tools>\n{listing}\n</tools>\nTo call one, write "
                 f'{HERMES_OPEN}\n{{"name": <function-name>, "arguments": <arguments-json-object>}}\n{HERMES_CLOSE}')
        if rendered and rendered[0]["role"] == "system":
            rendered[0] = {**rendered[0], "content": f"{rendered[0].get('content', '')}\n\n{intro}"}
        else:
            rendered.insert(0, {"role": "system", "content": intro})
    return rendered


def _call_json(call: dict[str, Any]) -> str:
    function = call.get("function", call)
    arguments = function.get("arguments", "{}")
    if not isinstance(arguments, str):
        arguments = json.dumps(arguments, ensure_ascii=False)
    return f'{{"name": {json.dumps(function.get("name"))}, "arguments": {arguments}}}'
