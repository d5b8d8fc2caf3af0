"""Agent swarms against a live gateway over two workers: sessions reach the router, agents finish
with a structured result, and every request's usage carries the ledger's cost and energy."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx
import jsonschema
import pytest
import uvicorn

from tests.gateway.live_server import free_port
from tokenfactory.agents.local_tools import ToolBox
from tokenfactory.agents.swarm import (
    RESULT_SCHEMA,
    TOOL_NAMES,
    AgentConfig,
    AgentReport,
    Endpoint,
    Swarm,
    endpoint_client,
)
from tokenfactory.cli import main
from tokenfactory.control.router import RoundRobinRouter
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.gateway.app import build_app
from tokenfactory.runtime.pool import WorkerPool

MODEL = "tiny"


@pytest.fixture(scope="module")
def factory(tiny_model_dir: Path):
    """Two workers behind round robin with session affinity: without a session, requests alternate."""
    config = EngineConfig.from_pretrained(
        tiny_model_dir, served_model_name=MODEL, max_model_len=2048,
        cache=CacheConfig(block_size=16, num_blocks=512), scheduler=SchedulerConfig(max_num_batched_tokens=2048))
    pool = WorkerPool.local(config, 2, router=RoundRobinRouter(session_affinity=True))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(config, worker=pool), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 180
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the gateway did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}", pool
    server.should_exit = True
    thread.join(30)


def routed_to(pool: WorkerPool, url: str, headers: dict[str, str] | None = None, **fields) -> int:
    before = pool.routed_counts.copy()
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 2, **fields}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers or {}, timeout=60)
    assert response.status_code == 200, response.text
    (worker,) = (pool.routed_counts - before).keys()
    return worker


def test_a_session_stays_on_its_worker_by_header_or_metadata(factory):
    url, pool = factory
    plain = [routed_to(pool, url) for _ in range(2)]
    assert plain[0] != plain[1]  # round robin alternates requests without a session
    by_header = [routed_to(pool, url, {"X-Session-Id": "agent-a"}) for _ in range(3)]
    by_metadata = [routed_to(pool, url, metadata={"session_id": "agent-b"}) for _ in range(3)]
    assert len(set(by_header)) == 1 and len(set(by_metadata)) == 1
    # The header names the session even when the body names another.
    assert routed_to(pool, url, {"X-Session-Id": "agent-a"}, metadata={"session_id": "agent-b"}) == by_header[0]


def test_an_overlong_session_id_is_a_400(factory):
    url, _ = factory
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    response = httpx.post(f"{url}/v1/chat/completions", json=body, headers={"X-Session-Id": "s" * 300}, timeout=30)
    assert response.status_code == 400
    assert "session id" in response.json()["error"]["message"]


def test_a_swarm_works_its_tasks_to_structured_results(factory, tmp_path: Path):
    url, pool = factory
    (tmp_path / "notes.txt").write_text("error: disk full\nall good\n")
    config = AgentConfig(model=MODEL, max_turns=3, max_tokens=64, files=tmp_path)

    async def run():
        async with endpoint_client(f"{url}/v1", None) as client:
            return await Swarm(Endpoint(client), config).run(["What is 6 * 7?", "Count the errors in the notes."])

    report = asyncio.run(run())
    assert len(report.agents) == 2
    for agent in report.agents:
        assert agent.error is None
        assert agent.turns == 3 and agent.tool_calls == 2  # two forced tool turns, then the answer
        jsonschema.validate(agent.result, RESULT_SCHEMA)
        for before, after in zip(agent.requests, agent.requests[1:]):
            assert after.prompt_tokens > before.prompt_tokens  # the context grows every turn,
            assert after.cached_tokens >= before.prompt_tokens - 32  # and its worker holds the turn before
        for sub in agent.subagents:
            assert sub.is_subagent and sub.turns == 2 and (sub.result is not None or sub.error is not None)
        assert all(r.cost_usd is not None and r.cost_usd > 0 for r in agent.all_requests())
        assert all(r.energy_j is not None and r.energy_j > 0 for r in agent.all_requests())
    totals = report.totals()
    assert totals.requests == sum(a.turns + sum(s.turns for s in a.subagents) for a in report.agents)
    assert 0 < totals.cached_tokens < totals.prompt_tokens


def test_spawned_subagents_work_concurrently_in_sessions_of_their_own(factory):
    url, _ = factory
    config = AgentConfig(model=MODEL, max_turns=3, subagent_turns=2, max_tokens=64)
    parent = AgentReport("split the work", "parent-session")

    async def run():
        async with endpoint_client(f"{url}/v1", None) as client:
            swarm = Swarm(Endpoint(client), config)
            box = ToolBox(swarm.tools(parent))
            return await box.call("spawn_subagents", json.dumps({"tasks": ["add 1 and 2", "multiply 3 by 4"]}))

    answers = json.loads(asyncio.run(run()))
    assert [a["task"] for a in answers] == ["add 1 and 2", "multiply 3 by 4"]
    assert len(parent.subagents) == 2
    assert len({sub.session_id for sub in parent.subagents} | {parent.session_id}) == 3
    for sub, answer in zip(sorted(parent.subagents, key=lambda s: s.task), answers):
        assert sub.is_subagent and sub.turns == 2 and sub.tool_calls == 1 and sub.error is None
        assert answer["answer"] == sub.result["answer"]


def test_a_named_first_tool_makes_every_task_fan_out_into_forked_subagents(factory):
    url, _ = factory
    config = AgentConfig(model=MODEL, max_turns=2, subagent_turns=2, max_tokens=64, first_tool="spawn_subagents")

    async def run():
        async with endpoint_client(f"{url}/v1", None) as client:
            return await Swarm(Endpoint(client), config).run(["Add up the crates.", "Weigh the bales."])

    report = asyncio.run(run())
    for agent in report.agents:
        # The grammar made the call parse and fit the tool's schema, so its sub-agents ran.
        assert agent.error is None and agent.tool_calls == 1 and 1 <= len(agent.subagents) <= 3
        for sub in agent.subagents:
            assert sub.is_subagent and sub.turns == 2 and sub.error is None and sub.subagents == []
            # A sub-agent starts from its parent's conversation plus its sub-task.
            assert sub.requests[0].prompt_tokens > agent.requests[0].prompt_tokens
    assert report.totals().requests == sum(1 + 2 * len(a.subagents) + 1 for a in report.agents)


def test_the_first_tool_must_be_one_of_the_agents_tools():
    assert [tool.name for tool in Swarm(None, AgentConfig(model=MODEL)).tools(None)] == list(TOOL_NAMES)
    with pytest.raises(ValueError, match="first_tool must be one of calculator, search_files, spawn_subagents"):
        AgentConfig(model=MODEL, first_tool="shell")
    spawn = Swarm(None, AgentConfig(model=MODEL, max_subagents=2)).tools(None)[-1]
    assert spawn.parameters["properties"]["tasks"]["maxItems"] == 2 and "up to 2 sub-tasks" in spawn.description


def test_an_endpoint_error_ends_the_agent_not_the_swarm(factory):
    url, _ = factory
    config = AgentConfig(model="no-such-model", max_turns=2)

    async def run():
        async with endpoint_client(f"{url}/v1", None) as client:
            return await Swarm(Endpoint(client), config).run(["anything"])

    (agent,) = asyncio.run(run()).agents
    assert agent.result is None and agent.error.startswith("HTTP 404")


def test_the_agents_command_prints_a_report_per_task(factory, tmp_path: Path, capsys):
    url, _ = factory
    (tmp_path / "log.txt").write_text("error one\n")
    argv = ["agents", "--base-url", f"{url}/v1", "--agents", "2", "--turns", "2", "--max-tokens", "64",
            "--files", str(tmp_path), "--task", "What is 2 + 2?"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"2 agents on {MODEL}" in out
    assert out.count("What is 2 + 2?") == 2  # one row per task
    summary = out[out.index("all tasks:"):]
    assert "from the prefix cache" in summary and "cost $" in summary and " J" in summary


def test_a_503_is_retried_after_its_retry_after():
    """A factory that sheds a request once (503 + Retry-After) and then serves it."""
    calls = []

    async def app(scope, receive, send):
        calls.append(scope["path"])
        if len(calls) == 1:
            status, headers, body = 503, [(b"retry-after", b"0")], b'{"error": {"message": "shed"}}'
        else:
            reply = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
                     "usage": {"prompt_tokens": 5}}
            status, headers, body = 200, [], json.dumps(reply).encode()
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), *headers]})
        await send({"type": "http.response.body", "body": body})

    async def run():
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://factory/v1/") as c:
            endpoint = Endpoint(c, max_retries=1)
            reply, record = await endpoint.chat({}, "s")
            return endpoint, record

    endpoint, record = asyncio.run(run())
    assert calls == ["/v1/chat/completions"] * 2
    assert endpoint.num_retries == 1 and record.prompt_tokens == 5
