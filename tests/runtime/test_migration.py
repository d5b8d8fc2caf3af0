"""A worker killed mid-stream: its requests move to another worker and finish as if nothing happened,
and the worker is restarted and rejoins."""

from __future__ import annotations

import asyncio
import os
import signal

from tokenfactory.engine.config import CacheConfig, EngineConfig
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
