"""A worker killed mid-stream: its requests move to another worker and finish as if nothing happened,
and the worker is restarted and rejoins. In a disaggregated pool the same holds for a prefill or a
decode worker killed while requests are prefilling, moving their KV, or decoding."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import pytest

from tests.runtime.greedy_reference import served_whole
from tests.runtime.pool_waits import all_blocks_free

from tokenfactory.control.disagg import DisaggConfig
from tokenfactory.control.router import RoundRobinRouter
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.pool import WorkerPool

MAX_TOKENS = 120
PROMPTS = [[(31 * i + 7 * j) % 3000 + 10 for j in range(40 + i)] for i in range(6)]


async def stream_tokens(pool: WorkerPool, request_id: str, prompt: list[int], started: asyncio.Event | None = None):
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)
    tokens, finish, cached = [], None, []
    async for out in pool.generate(request_id, prompt, params):
        tokens.extend(out.new_token_ids)
        finish = out.finish_reason
        cached.append(out.num_cached_tokens)
        if started is not None and len(tokens) >= 3:
            started.set()
    return tokens, finish, max(cached) <= len(prompt)


def test_killed_worker_requests_continue_elsewhere_with_the_same_tokens(tiny_model_dir):
    config = EngineConfig.from_pretrained(tiny_model_dir, max_model_len=512,
                                          cache=CacheConfig(block_size=16, num_blocks=256))

    async def run():
        pool = WorkerPool.local(config, num_workers=2, router="round_robin", restart_interval_s=0.2)
        await pool.start()
        try:
            reference = await asyncio.gather(*(stream_tokens(pool, f"ref-{i}", p) for i, p in enumerate(PROMPTS)))
            started = [asyncio.Event() for _ in PROMPTS]
            tasks = [asyncio.create_task(stream_tokens(pool, f"run-{i}", p, started[i]))
                     for i, p in enumerate(PROMPTS)]
            await asyncio.gather(*(e.wait() for e in started))  # every stream is under way
            os.kill(pool.workers[1].info.pid, signal.SIGKILL)
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            assert pool.num_migrations >= 1  # round robin put half of them on worker 1
            assert results == reference  # same tokens, each exactly once, finish "length"
            assert all(finish == "length" and len(tokens) == MAX_TOKENS for tokens, finish, _ in results)
            survivor = pool.workers[0]
            for _ in range(100):
                if survivor.load.num_free_blocks == survivor.load.num_total_blocks:
                    break
                await asyncio.sleep(0.05)
            assert survivor.load.num_free_blocks == survivor.load.num_total_blocks
            # The supervisor restarts the dead worker, and it takes requests again.
            for _ in range(600):
                if pool.workers[1].is_alive:
                    break
                await asyncio.sleep(0.1)
            assert pool.workers[1].is_alive and pool.num_restarts == 1
            before = pool.routed_counts[1]
            await asyncio.gather(*(stream_tokens(pool, f"after-{i}", p) for i, p in enumerate(PROMPTS[:2])))
            assert pool.routed_counts[1] == before + 1
        finally:
            await pool.shutdown()

    asyncio.run(asyncio.wait_for(run(), 240))


# --- a disaggregated pool: worker 0 prefills, workers 1 and 2 decode ---------------------------------

SPLIT_PARAMS = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)
PREFILL, DECODE = 0, 1


def burst_prompts(seed: int) -> list[list[int]]:
    """Six prompts of 120-200 tokens, then two of 100 that arrive at the kill; each seed's own, so
    no worker caches them from another test (a cached prompt would be served whole, not split)."""
    burst = [[(1009 * seed + 13 * i + 5 * j) % 3000 + 10 for j in range(120 + 16 * i)] for i in range(6)]
    late = [[(1009 * seed + 17 * i + 3 * j + 500) % 3000 + 10 for j in range(100)] for i in range(2)]
    return burst + late


DECODE_KILL, PREFILL_KILL, AFTER_RESTART = burst_prompts(1), burst_prompts(2), burst_prompts(3)[0]


def split_config(model_dir: Path) -> EngineConfig:
    # 64 tokens per step: a prompt takes 2-4 steps, so a burst queues on the prefill worker.
    return EngineConfig.from_pretrained(model_dir, max_model_len=512,
                                        cache=CacheConfig(block_size=16, num_blocks=256),
                                        scheduler=SchedulerConfig(max_num_batched_tokens=64))


@pytest.fixture(scope="module")
def split_pool(loop, tiny_model_dir):
    pool = WorkerPool.local_disaggregated(split_config(tiny_model_dir), num_prefill=1, num_decode=2,
                                          restart_interval_s=0.2, disagg=DisaggConfig(min_prompt_tokens=32))
    loop.run(pool.start(), timeout_s=180)
    yield pool
    loop.run(pool.shutdown())


@pytest.fixture(scope="module")
def expected(tiny_model_dir) -> dict[tuple[int, ...], list[int]]:
    """Each prompt's greedy tokens, served whole by one engine."""
    prompts = DECODE_KILL + PREFILL_KILL + [AFTER_RESTART]
    return dict(zip(map(tuple, prompts), served_whole(split_config(tiny_model_dir), prompts, SPLIT_PARAMS),
                    strict=True))


async def burst_killing(pool: WorkerPool, prompts: list[list[int]], victim: int, kill_at: int) -> list[list[int]]:
    """Stream the first six prompts at once and SIGKILL worker `victim` the moment request `kill_at`
    has its first token (its KV is then on its way to its decode worker); the last two arrive then.
    Each request's tokens, after checking that every stream finished normally."""
    pool.router = RoundRobinRouter()  # request i decodes on worker 1 + i % 2, in arrival order
    late: list[asyncio.Task] = []

    async def consume(i: int) -> list[int]:
        tokens, finish = [], None
        async for out in pool.generate(f"{victim}-{kill_at}-{i}", prompts[i], SPLIT_PARAMS):
            if i == kill_at and not tokens:
                os.kill(pool.workers[victim].info.pid, signal.SIGKILL)
                late.extend(asyncio.create_task(consume(j)) for j in range(6, len(prompts)))
            tokens.extend(out.new_token_ids)
            finish = out.finish_reason
        assert finish == "length"
        return tokens

    results = await asyncio.gather(*(consume(i) for i in range(6)))
    return results + await asyncio.gather(*late)


async def one_request(pool: WorkerPool, request_id: str, prompt: list[int]) -> tuple[list[int], str]:
    outs = [out async for out in pool.generate(request_id, prompt, SPLIT_PARAMS)]
    return [t for out in outs for t in out.new_token_ids], outs[-1].finish_reason


async def rejoined(pool: WorkerPool, worker_id: int, restarts: int) -> bool:
    """Whether the supervisor restarted `worker_id` and every worker's blocks are free."""
    for _ in range(600):
        if pool.workers[worker_id].is_alive and pool.num_restarts == restarts:
            return await all_blocks_free(pool)
        await asyncio.sleep(0.1)
    return False


def test_killed_decode_worker_requests_continue_from_their_kv_or_tokens(split_pool, expected, loop):
    pool = split_pool
    migrations, restarts, splits = pool.num_migrations, pool.num_restarts, pool.num_split
    # Request 2 goes to worker 1 (DECODE): killed while request 0 decodes there and request 2's KV
    # moves to it; requests 3-5 are still prefilling, request 4 for worker 1 too.
    results = loop.run(burst_killing(pool, DECODE_KILL, victim=DECODE, kill_at=2), timeout_s=120)
    assert results == [expected[tuple(p)] for p in DECODE_KILL]  # no gap, no repeat, same greedy tokens
    assert pool.num_split - splits >= 6 and pool.num_migrations - migrations >= 2
    assert loop.run(rejoined(pool, DECODE, restarts + 1), timeout_s=120)  # nothing leaked on any worker


def test_killed_prefill_worker_requests_are_prefilled_elsewhere(split_pool, expected, loop):
    pool = split_pool
    migrations, restarts, splits = pool.num_migrations, pool.num_restarts, pool.num_split
    # Killed as request 1's first token comes back: request 0 decodes, request 1's KV is in the
    # pool's hands, requests 2-5 are prefilling on it; the late two find it dead.
    results = loop.run(burst_killing(pool, PREFILL_KILL, victim=PREFILL, kill_at=1), timeout_s=120)
    assert results == [expected[tuple(p)] for p in PREFILL_KILL]
    assert pool.num_split - splits >= 6 and pool.num_migrations - migrations >= 2
    assert loop.run(rejoined(pool, PREFILL, restarts + 1), timeout_s=120)
    # Back in the pool, the restarted prefill worker takes the next split.
    before, splits = pool.routed_counts[PREFILL], pool.num_split
    tokens, finish = loop.run(one_request(pool, "after-restart", AFTER_RESTART))
    assert (tokens, finish) == (expected[tuple(AFTER_RESTART)], "length")
    assert pool.routed_counts[PREFILL] == before + 1 and pool.num_split == splits + 1
