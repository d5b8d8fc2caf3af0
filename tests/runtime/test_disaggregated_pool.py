"""Disaggregated serving through a live pool: one prefill and one decode engine process; a split
request streams the same tokens as the same request served whole."""

from __future__ import annotations

import asyncio
import random

from tests.runtime.greedy_reference import served_whole
from tests.runtime.pool_waits import all_blocks_free

from tokenfactory.control.disagg import DisaggConfig
from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.pool import WorkerPool

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def ids(seed: int, length: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(10, 3000) for _ in range(length)]


async def stream(pool: WorkerPool, request_id: str, prompt: list[int], params: SamplingParams = GREEDY):
    outs = [out async for out in pool.generate(request_id, prompt, params)]
    assert all(out.finish_reason is None for out in outs[:-1])  # one ordinary stream
    tokens = [t for out in outs for t in out.new_token_ids]
    return tokens, outs[-1].finish_reason, max(out.num_cached_tokens for out in outs)


def test_split_requests_stream_the_tokens_of_whole_ones(tiny_model_dir):
    config = EngineConfig.from_pretrained(tiny_model_dir, max_model_len=512,
                                          cache=CacheConfig(block_size=16, num_blocks=128))
    shared = ids(0, 48)
    first, second, short = shared + ids(1, 21), shared + ids(2, 30), ids(3, 10)
    mostly_cached = shared + ids(4, 10)
    expected = served_whole(config, [first, second, short, mostly_cached], GREEDY)

    async def run():
        pool = WorkerPool.local_disaggregated(config, num_prefill=1, num_decode=1,
                                              disagg=DisaggConfig(min_prompt_tokens=32, max_cached_fraction=0.7))
        await pool.start()
        try:
            a = await stream(pool, "a", first)
            b = await stream(pool, "b", second)  # its first 48 tokens hit the prefill worker's cache
            assert (a[0], a[1]) == (expected[0], "length") and (b[0], b[1]) == (expected[1], "length")
            assert b[2] == 48  # the caller sees the prefill side's prefix hit
            assert pool.num_split == 2 and pool.routed_counts[0] == 2
            c = await stream(pool, "c", short)  # too short to split: served whole on the decode worker
            assert c[0] == expected[2] and pool.num_split == 2 and pool.routed_counts[0] == 2
            # The decode worker learned the shared prefix from the imports: 48 of 58 tokens cached.
            m = await stream(pool, "m", mostly_cached)
            assert m[0] == expected[3] and pool.num_split == 2
            one = await stream(pool, "d", first, SamplingParams(max_tokens=1, temperature=0.0))
            assert one[:2] == (expected[0][:1], "length")
            assert await all_blocks_free(pool)  # no blocks left behind on either side
        finally:
            await pool.shutdown()

    asyncio.run(asyncio.wait_for(run(), 120))


def test_each_pool_keeps_its_own_round_robin_turn(tiny_model_dir):
    """Alternating prefill and decode routing must rotate through both pools, not pin one pair."""
    config = EngineConfig.from_pretrained(tiny_model_dir, max_model_len=512,
                                          cache=CacheConfig(block_size=16, num_blocks=128))
    prompts = [ids(i, 40) for i in range(4)]

    async def run():
        pool = WorkerPool.local_disaggregated(config, num_prefill=2, num_decode=2, router="round_robin",
                                              disagg=DisaggConfig(min_prompt_tokens=16))
        await pool.start()
        try:
            await asyncio.gather(*(stream(pool, f"r{i}", p) for i, p in enumerate(prompts)))
            assert pool.num_split == 4
            return dict(pool.routed_counts)
        finally:
            await pool.shutdown()

    assert asyncio.run(asyncio.wait_for(run(), 120)) == {0: 2, 1: 2, 2: 2, 3: 2}
