"""Tool calls in model text: parse them out (whole or streamed) and constrain decoding to them.

Two formats, chosen by the chat template: Hermes (Qwen, our tiny model)
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call; and Llama 3's
JSON form, where the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`, several separated by `;`). Text that looks like a call but does not parse stays
content, so nothing the model wrote is lost.
"""

from __future__ import annotations

import enum
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
LLAMA_PYTHON_TAG = "<|python_tag|>"
_HERMES_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)


class ToolFormat(enum.Enum):
    HERMES = "hermes"
    LLAMA_JSON = "llama_json"

    @classmethod
    def for_template(cls, template_source: str) -> ToolFormat:
        return cls.HERMES if HERMES_OPEN in template_source or not template_source else cls.LLAMA_JSON


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True, slots=True)
class ToolCall:
    name: str
    arguments: str
    """The arguments object as JSON text, as OpenAI sends it."""
    id: str = field(default_factory=new_call_id)


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """-> (the text outside well-formed calls, the calls in order)."""
    calls = _parse_llama_json(text)
    if calls:
        return "", calls
    content: list[str] = []
    end = 0
    for block in _HERMES_BLOCK.finditer(text):
        call = _call_from_json(block.group(1), "arguments")
        content.append(text[end : block.start()] if call else text[end : block.end()])
        end = block.end()
        if call:
            calls.append(call)
    content.append(text[end:])
    return "".join(content), calls


def _parse_llama_json(text: str) -> list[ToolCall]:
    body = text.strip().removeprefix(LLAMA_PYTHON_TAG).strip()
    decoder = json.JSONDecoder()
    calls, pos = [], 0
    while pos < len(body):
        try:
            obj, pos = decoder.raw_decode(body, pos)
        except json.JSONDecodeError:
            return []
        call = _call_from_object(obj, "parameters") or _call_from_object(obj, "arguments")
        if call is None:
            return []
        calls.append(call)
        while pos < len(body) and body[pos] in " \t\r\n;":
            pos += 1
    return calls


def _call_from_json(text: str, arguments_key: str) -> ToolCall | None:
    try:
        return _call_from_object(json.loads(text), arguments_key)
    except json.JSONDecodeError:
        return None


def _call_from_object(obj: Any, arguments_key: str) -> ToolCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key)
    if not isinstance(arguments, dict) or set(obj) != {"name", arguments_key}:
        return None
    return ToolCall(obj["name"], json.dumps(arguments, ensure_ascii=False))


class ToolCallStream:
    """Streams content as it arrives but holds back whatever may be a tool call; the calls come
    out parsed at the end. What `push` released is always a prefix of the final content."""

    def __init__(self) -> None:
        self._text = ""
        self._released = 0

    def push(self, text: str) -> str:
        """Add generated text -> the content that is safe to show now."""
        self._text += text
        safe = self._safe_length()
        released, self._released = self._text[self._released : safe], max(self._released, safe)
        return released

    def finish(self) -> tuple[str, list[ToolCall]]:
        """-> (the content not yet released, the calls)."""
        content, calls = parse_tool_calls(self._text)
        return content[self._released :], calls

    def _safe_length(self) -> int:
        text = self._text
        if self._released == 0 and _may_start_json_call(text):
            return 0
        start = text.find(HERMES_OPEN)
        if start >= 0:
            return start
        for keep in range(min(len(HERMES_OPEN) - 1, len(text)), 0, -1):
            if HERMES_OPEN.startswith(text[-keep:]):
                return len(text) - keep
        return len(text)


def _may_start_json_call(text: str) -> bool:
    head = text.lstrip()
    return head.startswith(("{", LLAMA_PYTHON_TAG)) or LLAMA_PYTHON_TAG.startswith(head)


def tool_call_lark(functions: list[tuple[str, dict[str, Any]]], tool_format: ToolFormat, parallel: bool,
                   tags_are_tokens: bool = False) -> str:
    """A Lark grammar (llguidance dialect) for one or more calls of `functions` (name, parameters
    schema) in the model's format; the arguments follow each function's schema. With
    `tags_are_tokens` (Qwen's vocabularies hold `<tool_call>` as one added token) the tags are
    those tokens, which llguidance matches by name, not by spelling."""
    key = "arguments" if tool_format is ToolFormat.HERMES else "parameters"
    schema = {"anyOf": [
        {"type": "object", "properties": {"name": {"const": name}, key: params},
         "required": ["name", key], "additionalProperties": False}
        for name, params in functions
    ], "x-guidance": {"whitespace_flexible": False}}  # compact JSON: no runs of whitespace
    call = f"%json{json.dumps(schema)}"
    if tool_format is ToolFormat.HERMES:
        open_tag, close_tag = (HERMES_OPEN, HERMES_CLOSE) if tags_are_tokens else (
            json.dumps(HERMES_OPEN), json.dumps(HERMES_CLOSE))
        call = f'{open_tag} "\\n" {call} "\\n" {close_tag}'
        separator = '"\\n"'
    else:
        separator = '"; "'
    repeat = f" ({separator} call)*" if parallel else ""
    return f"start: call{repeat}\ncall: {call}\n"
