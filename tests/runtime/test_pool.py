"""A pool of two real engine processes behind one Worker: KV-aware routing live."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import httpx
import pytest

from tests.gateway.live_server import free_port, wait_until_up
from tests.runtime.pool_waits import all_blocks_free

from tokenfactory.control.router import KVAwareRouter, RoundRobinRouter
from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.pool import WorkerPool

BLOCK = 16
SHARED_PREFIX = [(7 * i) % 3000 + 10 for i in range(6 * BLOCK)]  # 6 full blocks


@pytest.fixture(scope="module")
def pool(loop, tiny_model_dir):
    config = EngineConfig.from_pretrained(tiny_model_dir, max_model_len=256,
                                          cache=CacheConfig(block_size=BLOCK, num_blocks=64))
    pool = WorkerPool.local(config, num_workers=2)
    loop.run(pool.start(), timeout_s=180)
    yield pool
    loop.run(pool.shutdown())


def prompt(i: int) -> list[int]:
    return SHARED_PREFIX + [100 + i] * 5


async def complete(pool: WorkerPool, request_id: str, tokens: list[int]) -> list:
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    return [out async for out in pool.generate(request_id, tokens, params)]


async def routed_one_by_one(pool: WorkerPool, tag: str, count: int) -> tuple[list[int], list[int]]:
    """Send `count` prefix-sharing requests in turn; return the worker and cached tokens of each."""
    workers, cached = [], []
    for i in range(count):
        before = pool.routed_counts.copy()
        outputs = await complete(pool, f"{tag}-{i}", prompt(i))
        assert outputs[-1].finish_reason == "length" and sum(len(o.new_token_ids) for o in outputs) == 4
        (worker_id,) = (pool.routed_counts - before).keys()
        workers.append(worker_id)
        cached.append(outputs[-1].num_cached_tokens)
    return workers, cached


def test_kv_router_keeps_a_shared_prefix_on_the_worker_that_holds_it(pool, loop):
    pool.router = KVAwareRouter()
    # Put the prefix on worker 1 behind the router's back: only its KV events can tell the router.
    loop.run(complete(pool.workers[1], "seed", prompt(99)))
    workers, cached = loop.run(routed_one_by_one(pool, "kv", 4))
    assert workers == [1, 1, 1, 1]  # an idle tie would have gone to worker 0
    assert all(c >= len(SHARED_PREFIX) for c in cached)
    assert pool.router.metrics.mode == "events"
    assert pool.router.metrics.mean_predicted_overlap_tokens == len(SHARED_PREFIX)
    assert loop.run(all_blocks_free(pool))


def test_round_robin_alternates_whatever_the_workers_hold(pool, loop):
    pool.router = RoundRobinRouter()
    workers, cached = loop.run(routed_one_by_one(pool, "rr", 4))
    assert workers in ([0, 1, 0, 1], [1, 0, 1, 0])
    assert loop.run(all_blocks_free(pool))


def test_concurrent_requests_all_complete_and_the_load_adds_up(pool, loop):
    pool.router = KVAwareRouter()

    async def burst() -> list[list]:
        return await asyncio.gather(*(complete(pool, f"burst-{i}", prompt(i)) for i in range(8)))

    results = loop.run(burst())
    assert all(r[-1].finished and sum(len(o.new_token_ids) for o in r) == 4 for r in results)
    assert loop.run(all_blocks_free(pool))
    assert pool.load.num_total_blocks == 128 and pool.load.num_free_blocks == 128
    assert [h.num_routed for h in pool.worker_health()] == [pool.routed_counts[0], pool.routed_counts[1]]


def test_a_dead_worker_leaves_the_routing_set(pool, loop):
    """Runs last in the module: it kills worker 1."""
    pool.router = RoundRobinRouter()
    os.kill(pool.workers[1].info.pid, signal.SIGKILL)

    async def wait_dead() -> None:
        while pool.workers[1].is_alive:
            await asyncio.sleep(0.05)

    loop.run(wait_dead(), timeout_s=10)
    workers, _ = loop.run(routed_one_by_one(pool, "after-death", 3))
    assert workers == [0, 0, 0]
    assert pool.is_alive and pool.dead_reason is None
    health = pool.worker_health()
    assert not health[1].alive and health[1].dead_reason and health[1].num_cached_blocks == 0
    assert pool.load.num_total_blocks == 64  # only the live worker counts


def test_serve_with_two_workers_serves_through_the_pool_and_reports_each_worker(tiny_model_dir):
    """`tokenfactory serve --workers 2`: one gateway, two engine processes, /health shows each."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfactory.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port),
         "--served-model-name", "tiny", "--num-blocks", "64", "--max-model-len", "256", "--workers", "2",
         "--router", "kv"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(proc, url, timeout_s=120)
        system = "You are a careful assistant who answers in one short sentence. " * 4
        cached = []
        for question in ("hello", "why", "how"):
            body = {"model": "tiny", "prompt": system + question, "max_tokens": 2}
            usage = httpx.post(f"{url}/v1/completions", json=body, timeout=30).json()["usage"]
            cached.append(usage["prompt_tokens_details"]["cached_tokens"])
        health = httpx.get(f"{url}/health", timeout=10).json()
        assert health["status"] == "ok" and len(health["workers"]) == 2
        assert sorted(w["num_routed"] for w in health["workers"]) == [0, 3]
        assert health["engine"]["num_total_blocks"] == 128
        assert health["router"]["mode"] == "events" and health["router"]["decisions"] == 3
        assert cached[0] == 0 and cached[1] > 0 and cached[2] > 0
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
