"""Tool calls in model text: parse them out as the text streams in, and constrain decoding to them.

Two formats, chosen by the chat template: Hermes (Qwen, our tiny model)
`<tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call>`, one block per call; and Llama 3's
JSON form, where the whole reply is `{"name": ..., "parameters": {...}}` (optionally after
`<|python_tag|>`, several separated by `;`).

`ToolCallParser` reads the text piece by piece and says, as early as it can, what is content and
what is a call: a call starts once its name and the opening brace of its arguments are seen, and
its arguments then stream as written. Text that looks like a call but does not begin like one
stays content, so nothing the model wrote is lost. Whitespace next to a call is dropped.
Whole-text parsing is the same parser fed all at once, so a stream and a full response agree.
"""

from __future__ import annotations

import enum
import json
import uuid
from dataclasses import dataclass, field
from typing import Any

HERMES_OPEN = "<tool_call>"
HERMES_CLOSE = "</tool_call>"
LLAMA_PYTHON_TAG = "<|python_tag|>"
_WHITESPACE = " \t\r\n"


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
    """The arguments object as JSON text, as the model wrote it (OpenAI sends it the same way)."""
    id: str = field(default_factory=new_call_id)


@dataclass(frozen=True, slots=True)
class CallDelta:
    """A piece of the call at `index` (0, 1, ... within one reply): its first piece carries the
    id and the name, every piece may carry more of the arguments text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


Event = str | CallDelta
"""What the parser releases: content text, or a piece of a call."""


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """-> (the content: the text outside calls, the calls in order)."""
    parser = ToolCallParser()
    content, calls = collect(parser.push(text) + parser.finish())
    return content, calls


def collect(events: list[Event]) -> tuple[str, list[ToolCall]]:
    """Fold parser events into (content, calls)."""
    content: list[str] = []
    parts: dict[int, list[str]] = {}
    heads: dict[int, CallDelta] = {}
    for event in events:
        if isinstance(event, str):
            content.append(event)
            continue
        heads.setdefault(event.index, event)
        parts.setdefault(event.index, []).append(event.arguments)
    calls = [ToolCall(heads[i].name or "", "".join(parts[i]), heads[i].id or new_call_id()) for i in sorted(heads)]
    return "".join(content), calls


class _State(enum.Enum):
    TEXT = "text"  # content, watching for the start of a call
    HEAD = "head"  # after `<tool_call>` (or at a JSON reply's start): is this a call's beginning?
    BLOCK = "block"  # a `<tool_call>` block that did not begin like a call: wait for its end
    ARGUMENTS = "arguments"  # inside a call's arguments object, streaming it
    TAIL = "tail"  # after a call's arguments: skip to the block's end (or the next JSON call)


_MORE = "more"  # a partial match: the text so far may still become a match


class ToolCallParser:
    """Incremental parser of one reply. `push(text)` -> events safe to release now; `finish()` ->
    the rest. The events do not depend on how the text was cut into pieces."""

    def __init__(self) -> None:
        self._buf = ""  # text received but not yet decided
        self._state = _State.TEXT
        self._json_form = False  # the current call is Llama's JSON form (no tags around it)
        self._at_start = True  # nothing but whitespace seen yet: a JSON-form reply may begin
        self._space = ""  # whitespace after the last content, held until we know a call does not follow
        self._num_calls = 0
        self._depth = 0  # arguments scanner: nesting depth, inside a string, after a backslash
        self._in_string = False
        self._escaped = False

    @property
    def num_calls(self) -> int:
        return self._num_calls

    def push(self, text: str) -> list[Event]:
        self._buf += text
        events: list[Event] = []
        while self._step(events, final=False):
            pass
        return _merged(events)

    def finish(self) -> list[Event]:
        events: list[Event] = []
        while self._step(events, final=True):
            pass
        if self._state in (_State.HEAD, _State.BLOCK, _State.TEXT):
            self._content(events, self._buf)  # an unfinished block that never began a call is text
        elif self._state is _State.ARGUMENTS and self._buf:
            events.append(CallDelta(self._num_calls - 1, self._buf))  # cut off: the arguments so far
        if self._num_calls == 0 and self._space:
            events.append(self._space)
        self._buf, self._space = "", ""
        return _merged(events)

    # ---------------------------------------------------------------- one decision per step

    def _step(self, events: list[Event], final: bool) -> bool:
        """Decide what the head of the buffer is; False when that needs more text."""
        state, buf = self._state, self._buf
        if state is _State.TEXT:
            return self._step_text(events, final)
        if state is _State.HEAD:
            offset = 0 if self._json_form else len(HERMES_OPEN)
            head = _match_call_head(buf, offset, self._json_form)
            if head == _MORE:
                return False
            if head is None:
                # A reply that merely starts like JSON is text (which may still hold tagged calls);
                # a tagged block that does not begin like a call may still hold one in another order.
                self._state = _State.TEXT if self._json_form else _State.BLOCK
                self._json_form = False
                return True
            name, end = head
            self._space = ""
            events.append(CallDelta(self._num_calls, "", new_call_id(), name))
            self._num_calls += 1
            self._state, self._buf = _State.ARGUMENTS, buf[end:]
            self._depth, self._in_string, self._escaped = 0, False, False
            return True
        if state is _State.BLOCK:
            end = buf.find(HERMES_CLOSE)
            if end < 0:
                return False
            end += len(HERMES_CLOSE)
            call = _whole_call(buf[len(HERMES_OPEN) : end - len(HERMES_CLOSE)])
            if call is None:
                self._content(events, buf[:end])
            else:
                self._space = ""
                events.append(CallDelta(self._num_calls, call.arguments, call.id, call.name))
                self._num_calls += 1
            self._state, self._buf = _State.TEXT, buf[end:]
            return True
        if state is _State.ARGUMENTS:
            end = self._scan_arguments(buf)
            if end is None:
                if buf:
                    events.append(CallDelta(self._num_calls - 1, buf))
                self._buf = ""
                return False
            events.append(CallDelta(self._num_calls - 1, buf[:end]))
            self._state, self._buf = _State.TAIL, buf[end:]
            return True
        return self._step_tail(events, final)

    def _step_text(self, events: list[Event], final: bool) -> bool:
        buf = self._buf
        if self._at_start:
            head = buf.lstrip(_WHITESPACE)
            if not head:
                self._space, self._buf = self._space + buf, ""
                return False
            self._at_start = False
            if head.startswith("{") or LLAMA_PYTHON_TAG.startswith(head[: len(LLAMA_PYTHON_TAG)]):
                self._space += buf[: len(buf) - len(head)]
                self._state, self._json_form, self._buf = _State.HEAD, True, head
                return True
        start = buf.find(HERMES_OPEN)
        if start >= 0:
            self._content(events, buf[:start])
            self._state, self._buf = _State.HEAD, buf[start:]
            return True
        keep = 0 if final else _partial_suffix(buf, HERMES_OPEN)
        self._content(events, buf[: len(buf) - keep])
        self._buf = buf[len(buf) - keep :]
        return False

    def _step_tail(self, events: list[Event], final: bool) -> bool:
        buf = self._buf
        if not self._json_form:
            end = buf.find(HERMES_CLOSE)
            if end < 0:
                if final:
                    self._buf = ""  # the rest of a call whose block never closed
                return False
            self._state, self._buf = _State.TEXT, buf[end + len(HERMES_CLOSE) :]
            return True
        # Llama's JSON form: `}` closes the call; `;` may start another; anything else is content.
        rest = buf.lstrip(_WHITESPACE)
        if rest.startswith("}"):
            rest = rest[1:].lstrip(_WHITESPACE)
        if rest.startswith(";"):
            rest = rest[1:].lstrip(_WHITESPACE)
            if not rest and not final:
                return False
            self._state, self._buf = _State.HEAD, rest
            if not rest:
                self._state = _State.TEXT
            return True
        if not rest and not final:
            return False
        self._state, self._json_form, self._buf = _State.TEXT, False, rest
        return True

    def _scan_arguments(self, text: str) -> int | None:
        """Track the JSON nesting of the arguments; -> where the object ends, or None (not yet)."""
        depth, in_string, escaped = self._depth, self._in_string, self._escaped
        for i, c in enumerate(text):
            if in_string:
                if escaped:
                    escaped = False
                elif c == "\\":
                    escaped = True
                elif c == '"':
                    in_string = False
            elif c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 0:
                    return i + 1
        self._depth, self._in_string, self._escaped = depth, in_string, escaped
        return None

    def _content(self, events: list[Event], text: str) -> None:
        """Release text as content, holding its trailing whitespace back until more content comes."""
        if not text:
            return
        body = text.rstrip(_WHITESPACE)
        if not body:
            self._space += text
            return
        events.append(self._space + body)
        self._space = text[len(body) :]


def _merged(events: list[Event]) -> list[Event]:
    """Join neighbouring content pieces, and neighbouring pieces of one call."""
    out: list[Event] = []
    for event in events:
        last = out[-1] if out else None
        if isinstance(event, str) and isinstance(last, str):
            out[-1] = last + event
        elif isinstance(event, CallDelta) and isinstance(last, CallDelta) and last.index == event.index:
            out[-1] = CallDelta(last.index, last.arguments + event.arguments, last.id, last.name)
        elif event != "":
            out.append(event)
    return out


def _partial_suffix(text: str, word: str) -> int:
    """The length of the longest end of `text` that `word` starts with (a word maybe cut off)."""
    for keep in range(min(len(word) - 1, len(text)), 0, -1):
        if word.startswith(text[-keep:]):
            return keep
    return 0


def _match_call_head(text: str, pos: int, json_form: bool) -> tuple[str, int] | str | None:
    """Match `{"name": "<name>", "arguments": {` (Llama: "parameters" too, after an optional
    python tag) at `pos` -> (name, where the arguments object starts), _MORE, or None."""
    if json_form and text.startswith(LLAMA_PYTHON_TAG[: len(text)]) and len(text) < len(LLAMA_PYTHON_TAG):
        return _MORE
    if json_form and text.startswith(LLAMA_PYTHON_TAG):
        pos = len(LLAMA_PYTHON_TAG)
    keys = ('"arguments"', '"parameters"') if json_form else ('"arguments"',)
    name = ""
    for part in ("{", '"name"', ":", "NAME", ",", keys, ":", "{"):
        while pos < len(text) and text[pos] in _WHITESPACE:
            pos += 1
        if pos == len(text):
            return _MORE
        if part == "NAME":
            name_end = _string_end(text, pos)
            if name_end is None:
                return _MORE if text[pos] == '"' else None
            try:
                name = json.loads(text[pos:name_end])
            except json.JSONDecodeError:
                return None
            pos = name_end
            continue
        options = part if isinstance(part, tuple) else (part,)
        matched = next((o for o in options if text.startswith(o, pos)), None)
        if matched is None:
            if any(o.startswith(text[pos:]) for o in options):
                return _MORE
            return None
        pos += len(matched)
    return name, pos - 1  # the arguments' opening brace belongs to the arguments


def _string_end(text: str, pos: int) -> int | None:
    """Where the JSON string starting at `pos` ends (after its closing quote), or None."""
    if text[pos] != '"':
        return None
    escaped = False
    for i in range(pos + 1, len(text)):
        if escaped:
            escaped = False
        elif text[i] == "\\":
            escaped = True
        elif text[i] == '"':
            return i + 1
    return None


def _whole_call(body: str) -> ToolCall | None:
    """A complete block whose call did not begin in the usual order (say, arguments first)."""
    try:
        obj = json.loads(body)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or set(obj) != {"name", "arguments"} or not isinstance(obj["name"], str):
        return None
    if not isinstance(obj["arguments"], dict):
        return None
    return ToolCall(obj["name"], json.dumps(obj["arguments"], ensure_ascii=False))


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
