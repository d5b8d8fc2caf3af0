"""Agent swarms against any OpenAI-compatible endpoint.

An agent works one task in turns. Each turn is one chat completion with the tools listed (the same
tools, in the same order, every turn, so each prompt extends the last one): the model calls tools,
the agent runs them on this machine (`local_tools`) and appends the calls and their results to the
conversation. After `max_turns - 1` tool turns, or as soon as the model answers without a call, a
last turn asks for the structured result (`response_format` json_schema, tools still listed but not
callable). `AgentConfig.first_tool` names a tool a task's first turn must call (a `tool_choice`
naming it, so the grammar makes the model call it with arguments that fit its schema): with
`spawn_subagents` every task fans out at once. The spawn tool starts sub-agents concurrently, each
a shorter agent of its own session that starts from its parent's conversation (what the parent
knew when it spawned them) plus its sub-task, as forked helpers do: its prompt extends the
parent's, so a factory that routes by prefix can serve it from the parent's cache.

Every request names its agent's session (the `X-Session-Id` header), so a factory with session
affinity keeps the session where its growing context is cached. Each response's usage is kept:
prompt, cached and output tokens, latency, and, from a tokenfactory gateway, the cost and energy
its ledger recorded (`usage.cost_usd`, `usage.energy_j`; other endpoints leave them out).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tokenfactory.agents.local_tools import (
    MAX_SUBAGENTS,
    Tool,
    ToolBox,
    calculator_tool,
    file_search_tool,
    spawn_subagents_tool,
)

DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
SESSION_HEADER = "X-Session-Id"
MAX_TOOL_RESULT_CHARS = 2000
"""A tool result longer than this is cut, so one search cannot fill the context window."""
RETRY_STATUSES = (429, 503)
"""Refusals for now, not for good (rate limits, load or power shedding): retried after Retry-After."""
MAX_RETRY_WAIT_S = 10.0

SYSTEM_PROMPT = (
    "You are one agent of a swarm working for a token factory. Work your task in steps. In each step, "
    "call the tools you need: the calculator for arithmetic, search_files to find lines in the working "
    "folder, spawn_subagents to hand independent sub-tasks to helpers that work at the same time. "
    "Read each tool's result before the next step. When you know the answer, reply with it."
)
FINAL_INSTRUCTION = "Give your final answer now."
SUBTASK_INSTRUCTION = "You are a helper of the agent above. Work only this sub-task of its task: {task}"
TOOL_NAMES = ("calculator", "search_files", "spawn_subagents")
"""Every agent's tools, in the order listed (see `Swarm.tools`)."""

RESULT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "answer": {"type": "string", "pattern": r"^[ -~]{1,64}$"},
        "confidence": {"type": "integer", "minimum": 0, "maximum": 100},
    },
    "required": ["answer", "confidence"],
    "additionalProperties": False,
}
"""The structured result every agent ends with: its answer and a confidence in percent."""


class EndpointError(RuntimeError):
    """The endpoint refused a request or could not be reached."""


@dataclass(frozen=True)
class AgentConfig:
    model: str
    max_turns: int = 6
    """Chat requests per agent, the structured last one included."""
    subagent_turns: int = 2
    max_subagents: int = MAX_SUBAGENTS
    """Sub-agents one spawn call may start (the spawn tool's schema says so)."""
    max_tokens: int = 128
    """Output tokens per turn."""
    tool_choice: str = "required"
    """`required` (every tool turn calls a tool) or `auto` (the model may answer early)."""
    first_tool: str | None = None
    """A tool every task's first turn must call (None: `tool_choice` holds from the first turn);
    sub-agents follow `tool_choice` only."""
    parallel_tool_calls: bool = False
    temperature: float = 0.0
    service_tier: str | None = None
    """The tier to buy (None: the key's default)."""
    files: Path | None = None
    """The folder `search_files` searches (None: the tool answers that there is none)."""

    def __post_init__(self) -> None:
        if self.max_turns < 1 or self.subagent_turns < 1:
            raise ValueError("an agent needs at least one turn (its structured answer)")
        if self.max_subagents < 1:
            raise ValueError(f"max_subagents must be >= 1, got {self.max_subagents}")
        if self.tool_choice not in ("auto", "required"):
            raise ValueError(f"tool_choice must be auto or required, got {self.tool_choice!r}")
        if self.first_tool is not None and self.first_tool not in TOOL_NAMES:
            raise ValueError(f"first_tool must be one of {', '.join(TOOL_NAMES)}, got {self.first_tool!r}")


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """One chat completion as the agent saw it."""

    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    latency_s: float
    cost_usd: float | None
    energy_j: float | None


@dataclass(slots=True)
class AgentReport:
    task: str
    session_id: str
    is_subagent: bool = False
    requests: list[RequestRecord] = field(default_factory=list)
    tool_calls: int = 0
    result: dict[str, Any] | None = None
    error: str | None = None
    latency_s: float = 0.0
    subagents: list[AgentReport] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.requests)

    def all_requests(self) -> list[RequestRecord]:
        """This agent's requests and its sub-agents', recursively."""
        return self.requests + [r for sub in self.subagents for r in sub.all_requests()]

    def all_tool_calls(self) -> int:
        return self.tool_calls + sum(sub.all_tool_calls() for sub in self.subagents)


@dataclass(frozen=True, slots=True)
class Totals:
    """Sums over requests; cost and energy are None when no response carried them."""

    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float | None
    energy_j: float | None

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> Totals:
        costs = [r.cost_usd for r in records if r.cost_usd is not None]
        joules = [r.energy_j for r in records if r.energy_j is not None]
        return cls(len(records), sum(r.prompt_tokens for r in records), sum(r.cached_tokens for r in records),
                   sum(r.completion_tokens for r in records), sum(costs) if costs else None,
                   sum(joules) if joules else None)

    @property
    def cached_fraction(self) -> float:
        return self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0


@dataclass(slots=True)
class SwarmReport:
    agents: list[AgentReport]
    wall_s: float
    retries: int = 0
    """Requests sent again after a 429 or 503."""

    def totals(self) -> Totals:
        return Totals.of([r for agent in self.agents for r in agent.all_requests()])


class Endpoint:
    """Chat completions on an OpenAI-compatible endpoint, one session per call. A 429 or 503 is
    retried up to `max_retries` times after its Retry-After (as the OpenAI SDKs do)."""

    def __init__(self, client: httpx.AsyncClient, max_retries: int = 3) -> None:
        self.client = client
        self.max_retries = max_retries
        self.num_retries = 0

    async def chat(self, body: dict[str, Any], session_id: str) -> tuple[dict[str, Any], RequestRecord]:
        start = time.perf_counter()
        for attempt in range(self.max_retries + 1):
            try:
                response = await self.client.post("chat/completions", json=body,
                                                  headers={SESSION_HEADER: session_id})
            except httpx.HTTPError as e:
                raise EndpointError(f"cannot reach {self.client.base_url}: {e!r}") from None
            if response.status_code not in RETRY_STATUSES or attempt == self.max_retries:
                break
            self.num_retries += 1
            await asyncio.sleep(_retry_after_s(response, attempt))
        latency = time.perf_counter() - start
        if response.status_code != 200:
            raise EndpointError(f"HTTP {response.status_code}: {_error_message(response)}")
        try:
            reply = response.json()
            reply["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError):
            raise EndpointError(f"not a chat completion: {response.text[:300]}") from None
        usage = reply.get("usage") or {}
        details = usage.get("prompt_tokens_details") or {}
        record = RequestRecord(usage.get("prompt_tokens", 0), details.get("cached_tokens") or 0,
                               usage.get("completion_tokens", 0), latency, usage.get("cost_usd"),
                               usage.get("energy_j"))
        return reply, record


def _retry_after_s(response: httpx.Response, attempt: int) -> float:
    try:
        wait = float(response.headers.get("Retry-After", ""))
    except ValueError:
        wait = 0.5 * 2**attempt
    return min(max(wait, 0.0), MAX_RETRY_WAIT_S)


def _error_message(response: httpx.Response) -> str:
    try:
        return response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:300]


class Swarm:
    """Runs agents on tasks, all at once, against one endpoint; `on_request` hears of every
    completed request (for progress)."""

    def __init__(self, endpoint: Endpoint, config: AgentConfig,
                 on_request: Callable[[AgentReport, RequestRecord], None] | None = None) -> None:
        self.endpoint = endpoint
        self.config = config
        self.on_request = on_request

    async def run(self, tasks: Sequence[str]) -> SwarmReport:
        start = time.perf_counter()
        retries = self.endpoint.num_retries
        agents = await asyncio.gather(*(self.run_agent(task) for task in tasks))
        return SwarmReport(list(agents), time.perf_counter() - start, self.endpoint.num_retries - retries)

    async def run_agent(self, task: str, parent: AgentReport | None = None,
                        context: Sequence[dict[str, Any]] = ()) -> AgentReport:
        """One agent (a sub-agent of `parent`, if given, starting from the parent's `context`)
        from its task to its structured result."""
        report = AgentReport(task, f"agent-{uuid.uuid4().hex[:16]}", is_subagent=parent is not None)
        messages: list[dict[str, Any]] = [{"role": "system", "content": SYSTEM_PROMPT},
                                          {"role": "user", "content": task}]
        if parent is not None:
            parent.subagents.append(report)
            if context:
                messages = [*context, {"role": "user", "content": SUBTASK_INSTRUCTION.format(task=task)}]
        max_turns = self.config.max_turns if parent is None else self.config.subagent_turns
        toolbox = ToolBox(self.tools(report if parent is None else None, messages))
        start = time.perf_counter()
        try:
            for turn in range(max_turns - 1):
                first_tool = self.config.first_tool if turn == 0 and parent is None else None
                if not await self._tool_turn(report, toolbox, messages, first_tool):
                    break
            report.result = await self._final_turn(report, toolbox, messages)
        except EndpointError as e:
            report.error = str(e)
        report.latency_s = time.perf_counter() - start
        return report

    def tools(self, spawner: AgentReport | None, conversation: list[dict[str, Any]] | None = None) -> list[Tool]:
        """The same three tools (`TOOL_NAMES`) for every agent, so every prompt starts alike; only
        top-level agents' spawn tool works (`spawner` is the agent whose sub-agents it starts, and
        `conversation` its messages, which they start from)."""
        run_subtask = None if spawner is None else (
            lambda task: self._subagent_answer(task, spawner, _before_last_call(conversation or [])))
        return [calculator_tool(), file_search_tool(self.config.files),
                spawn_subagents_tool(run_subtask, self.config.max_subagents)]

    async def _subagent_answer(self, task: str, parent: AgentReport, context: list[dict[str, Any]]) -> str:
        sub = await self.run_agent(task, parent, context)
        if sub.result is not None:
            return str(sub.result.get("answer", ""))
        return f"error: the sub-agent failed ({sub.error})"

    async def _tool_turn(self, report: AgentReport, toolbox: ToolBox, messages: list[dict[str, Any]],
                         forced_tool: str | None = None) -> bool:
        """One turn of tool calls (of `forced_tool` if given) -> whether the model called any
        (False: it answered)."""
        tool_choice = (self.config.tool_choice if forced_tool is None
                       else {"type": "function", "function": {"name": forced_tool}})
        reply = await self._request(report, messages, toolbox, tool_choice=tool_choice)
        message = reply["choices"][0]["message"]
        calls = message.get("tool_calls") or []
        messages.append({"role": "assistant", "content": message.get("content") or "",
                         **({"tool_calls": calls} if calls else {})})
        if not calls:
            return False
        results = await asyncio.gather(*(toolbox.call(c["function"]["name"], c["function"]["arguments"])
                                         for c in calls))
        report.tool_calls += len(calls)
        messages.extend({"role": "tool", "tool_call_id": call["id"], "content": result[:MAX_TOOL_RESULT_CHARS]}
                        for call, result in zip(calls, results))
        return True

    async def _final_turn(self, report: AgentReport, toolbox: ToolBox, messages: list[dict[str, Any]]
                          ) -> dict[str, Any] | None:
        messages.append({"role": "user", "content": FINAL_INSTRUCTION})
        reply = await self._request(report, messages, toolbox, tool_choice="none", response_format={
            "type": "json_schema", "json_schema": {"name": "agent_result", "schema": RESULT_SCHEMA, "strict": True}})
        content = reply["choices"][0]["message"].get("content") or ""
        try:
            result = json.loads(content)
        except json.JSONDecodeError:
            report.error = f"the final answer is not JSON (finish_reason {reply['choices'][0].get('finish_reason')})"
            return None
        return result if isinstance(result, dict) else None

    async def _request(self, report: AgentReport, messages: list[dict[str, Any]], toolbox: ToolBox,
                       **fields: Any) -> dict[str, Any]:
        body = {"model": self.config.model, "messages": messages, "tools": toolbox.schemas(),
                "parallel_tool_calls": self.config.parallel_tool_calls, "max_tokens": self.config.max_tokens,
                "temperature": self.config.temperature, **fields}
        if self.config.service_tier is not None:
            body["service_tier"] = self.config.service_tier
        reply, record = await self.endpoint.chat(body, report.session_id)
        report.requests.append(record)
        if self.on_request is not None:
            self.on_request(report, record)
        return reply


def _before_last_call(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation before its last assistant message with tool calls (the spawning call,
    which a sub-agent neither made nor answers)."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] == "assistant" and messages[i].get("tool_calls"):
            return messages[:i]
    return list(messages)


async def first_model(client: httpx.AsyncClient) -> str:
    """The endpoint's first model (for a swarm started without --model)."""
    try:
        response = await client.get("models")
    except httpx.HTTPError as e:
        raise EndpointError(f"cannot reach {client.base_url}: {e!r}") from None
    if response.status_code != 200:
        raise EndpointError(f"HTTP {response.status_code}: {_error_message(response)}")
    models = response.json().get("data") or []
    if not models:
        raise EndpointError(f"{client.base_url} serves no models")
    return models[0]["id"]


def endpoint_client(base_url: str, api_key: str | None, timeout_s: float = 600.0, max_connections: int = 256
                    ) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return httpx.AsyncClient(base_url=base_url.rstrip("/") + "/", headers=headers, timeout=timeout_s,
                             limits=httpx.Limits(max_connections=max_connections))
