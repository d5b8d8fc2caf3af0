"""SIGKILL the gateway under load, restart it on the same database: every request whose client received
its final chunk is in the ledger exactly once, and the keys' quotas are what they were."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.gateway.live_server import free_port, wait_until_up
from tokenfactory.meter.keys import KeyStore
from tokenfactory.meter.ledger import read_entries

FACTORY_YAML = """
tiers:
  default: {prices: {default: {input: 1.0, output: 4.0}}}
  free: {priority: -10, token_quota: 1, quota_period_s: 86400}
"""
CONCURRENCY = 24
FINISHED_BEFORE_KILL = 40


@dataclass
class Stream:
    """What one streaming client saw."""

    id: str | None = None
    usage: dict | None = None
    done: bool = False  # received [DONE] after the usage chunk: its final chunk

    @property
    def finished(self) -> bool:
        return self.done and self.usage is not None


class Server:
    """`tokenfactory serve` in its own process group (the gateway, its engine and helpers)."""

    def __init__(self, model_dir: Path, db: Path, config: Path, log: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log.open("w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tokenfactory.cli", "serve", "--model", str(model_dir), "--served-model-name",
             "tiny", "--port", str(self.port), "--db", str(db), "--factory-config", str(config),
             "--num-blocks", "512", "--max-model-len", "256", "--max-num-seqs", "64"],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            wait_until_up(self.proc, self.url, timeout_s=120)
        except BaseException:
            self.kill()
            raise

    def kill(self) -> None:
        """SIGKILL every process of the server at once: no shutdown code runs anywhere."""
        with contextlib.suppress(ProcessLookupError):  # the group may be gone already
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.log.close()


async def stream_one(client: httpx.AsyncClient, url: str, key: str, i: int, seen: Stream) -> None:
    body = {"model": "tiny", "prompt": f"request {i}: the factory makes tokens", "max_tokens": 4 + i % 13,
            "stream": True, "stream_options": {"include_usage": True}}
    async with client.stream("POST", f"{url}/v1/completions", json=body,
                             headers={"authorization": f"Bearer {key}"}) as resp:
        assert resp.status_code == 200, await resp.aread()
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                seen.done = True
                continue
            chunk = json.loads(line[len("data: "):])
            seen.id = chunk["id"]
            if chunk.get("usage"):
                seen.usage = chunk["usage"]


async def load_until_killed(server: Server, key: str) -> list[Stream]:
    """CONCURRENCY clients stream one request after another; SIGKILL the server once
    FINISHED_BEFORE_KILL streams have finished, while the others are mid-stream."""
    streams: list[Stream] = []
    killed = asyncio.Event()

    async def client_loop(client: httpx.AsyncClient, worker: int) -> None:
        i = worker
        while not killed.is_set():
            seen = Stream()
            streams.append(seen)
            try:
                await stream_one(client, server.url, key, i, seen)
            except httpx.HTTPError:
                return  # the server died under this stream
            i += CONCURRENCY
            if sum(s.finished for s in streams) >= FINISHED_BEFORE_KILL and not killed.is_set():
                killed.set()
                server.kill()

    limits = httpx.Limits(max_connections=CONCURRENCY)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        await asyncio.gather(*(client_loop(client, w) for w in range(CONCURRENCY)))
    return streams


def complete(url: str, key: str, tier: str) -> httpx.Response:
    body = {"model": "tiny", "prompt": "hello factory", "max_tokens": 4, "service_tier": tier}
    return httpx.post(f"{url}/v1/completions", json=body, headers={"authorization": f"Bearer {key}"}, timeout=60)


@pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX process groups")
def test_sigkill_under_load_loses_no_finished_request_and_keeps_quotas(tiny_model_dir, tmp_path):
    db, config = tmp_path / "factory.db", tmp_path / "factory.yaml"
    config.write_text(FACTORY_YAML)
    _, key = KeyStore(db).create("acme", ["default", "free"], "default")

    server = Server(tiny_model_dir, db, config, tmp_path / "serve-1.log")
    try:
        assert complete(server.url, key, "free").status_code == 200  # spends the free tier's quota
        assert complete(server.url, key, "free").status_code == 429
        streams = asyncio.run(load_until_killed(server, key))
    finally:
        server.kill()

    finished = [s for s in streams if s.finished]
    cut = [s for s in streams if not s.finished]
    assert len(finished) >= FINISHED_BEFORE_KILL and cut, "the kill must land while streams are running"
    after_kill = {e.request_id: e for e in read_entries(db)}
    for s in finished:
        entry = after_kill.get(s.id)
        assert entry is not None, f"{s.id} received its final chunk but is not in the ledger"
        assert entry.outcome == "completed"
        assert (entry.prompt_tokens, entry.completion_tokens) == (s.usage["prompt_tokens"],
                                                                   s.usage["completion_tokens"])

    server = Server(tiny_model_dir, db, config, tmp_path / "serve-2.log")
    try:
        refused = complete(server.url, key, "free")
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "token_quota"
        after_restart = [complete(server.url, key, "default").json()["id"] for _ in range(3)]
    finally:
        server.kill()
    rows = read_entries(db)
    assert len(rows) == len({r.request_id for r in rows}) == len(after_kill) + 3  # nothing replayed twice
    assert {r.request_id: r for r in rows if r.request_id in after_kill} == after_kill
    assert set(after_restart) <= {r.request_id for r in rows}
