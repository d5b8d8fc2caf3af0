"""Workers as Ray actors on a local Ray: the same greedy tokens as an engine process over ZMQ, KV
events to the router, split requests' KV through the object store, and a killed actor's requests
finishing elsewhere."""

from __future__ import annotations

import asyncio
import os
import signal

import pytest

ray = pytest.importorskip("ray")

from tests.runtime.pool_waits import all_blocks_free  # noqa: E402

from tokenfactory.control.disagg import DisaggConfig  # noqa: E402
from tokenfactory.engine.config import CacheConfig, EngineConfig  # noqa: E402
from tokenfactory.engine.request import SamplingParams  # noqa: E402
from tokenfactory.runtime.client import AsyncEngineClient, RequestRejectedError  # noqa: E402
from tokenfactory.runtime.pool import WorkerPool  # noqa: E402
from tokenfactory.runtime.ray_worker import KV_LOST, RayEngineClient, RayKVHandle  # noqa: E402

GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
SHARED = [(7 * j) % 3000 + 10 for j in range(64)]  # 4 full blocks
PROMPTS = {"short": [5, 6, 7, 8, 9], "long": SHARED + [11, 12, 13], "sharing": SHARED + [21, 22, 23, 24, 25]}


@pytest.fixture(scope="module")
def config(tiny_model_dir) -> EngineConfig:
    return EngineConfig.from_pretrained(tiny_model_dir, max_model_len=256,
                                        cache=CacheConfig(block_size=16, num_blocks=64))


@pytest.fixture(scope="module")
def zmq_tokens(config, loop) -> dict[str, list[int]]:
    """What an engine process reached over ZMQ streams for each prompt."""
    async def run() -> dict[str, list[int]]:
        client = AsyncEngineClient(config)
        await client.start()
        try:
            return {name: await tokens_of(client.generate(name, prompt, GREEDY)) for name, prompt in PROMPTS.items()}
        finally:
            await client.shutdown()

    return loop.run(run(), timeout_s=180)


@pytest.fixture(scope="module")
def pool(config, loop, zmq_tokens):
    """One prefill and one decode Ray actor (the ZMQ reference runs first: two cores)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = WorkerPool.local_disaggregated(config, num_prefill=1, num_decode=1, make_worker=RayEngineClient,
                                          restart_interval_s=0.2, disagg=DisaggConfig(min_prompt_tokens=32))
    try:
        loop.run(pool.start(), timeout_s=180)
        yield pool
        loop.run(pool.shutdown())
    finally:
        ray.shutdown()


async def tokens_of(stream) -> list[int]:
    return [t async for out in stream for t in out.new_token_ids]


def test_ray_workers_stream_what_an_engine_process_streams(pool, zmq_tokens, loop):
    assert all(isinstance(w, RayEngineClient) for w in pool.workers) and pool.info.num_blocks == 64
    short = loop.run(tokens_of(pool.generate("short", PROMPTS["short"], GREEDY)))
    assert short == zmq_tokens["short"] and pool.num_split == 0  # served whole by the decode actor
    long = loop.run(tokens_of(pool.generate("long", PROMPTS["long"], GREEDY)))
    assert long == zmq_tokens["long"] and pool.num_split == 1  # prefilled on one actor, decoded on the other
    # KV events came back from both actors: the router's index knows the shared prefix on each.
    assert pool.index.num_blocks(0) >= 4 and pool.index.num_blocks(1) >= 4
    assert loop.run(all_blocks_free(pool))


def test_kv_moves_between_actors_through_the_object_store(pool, zmq_tokens, loop):
    prefill_worker, decode_worker = pool.workers

    async def run() -> tuple[object, list[int]]:
        first, handle = await prefill_worker.prefill("moved", PROMPTS["sharing"], GREEDY)
        rest = await tokens_of(decode_worker.generate_from_kv("moved", PROMPTS["sharing"], handle, GREEDY))
        return handle, first.new_token_ids + rest

    handle, tokens = loop.run(run())
    assert isinstance(handle, RayKVHandle) and isinstance(handle.ref, ray.ObjectRef)
    assert tokens == zmq_tokens["sharing"]
    assert loop.run(all_blocks_free(pool))


def test_leaving_a_stream_early_aborts_it_in_the_actor(pool, loop):
    decode_worker = pool.workers[1]

    async def run() -> int:
        steps = decode_worker.load.num_steps
        params = SamplingParams(max_tokens=200, ignore_eos=True)
        async for out in decode_worker.generate("leaver", PROMPTS["short"], params):
            if out.new_token_ids:
                break  # the stream's cleanup sends the abort
        assert await all_blocks_free(pool)
        return decode_worker.load.num_steps - steps

    assert loop.run(run()) < 100  # it did not run its 200 tokens


def test_kv_lost_with_its_prefill_actor_is_refused_by_name(config, pool, loop):
    """A transfer whose owner died before the decode actor fetched it: the import is refused with
    `KV_LOST` (the pool's cue to recompute), and the decode actor goes on serving."""
    async def run() -> None:
        prefiller, decoder = RayEngineClient(config, num_cpus=0), pool.workers[1]  # beside the pool's two
        await prefiller.start()
        _, handle = await prefiller.prefill("lost", PROMPTS["long"], GREEDY)
        os.kill(prefiller.pid, signal.SIGKILL)
        while True:  # until Ray has noticed that the object's owner is gone
            try:
                await asyncio.wait_for(handle.ref, 1.0)
            except ray.exceptions.OwnerDiedError:
                break
            except (TimeoutError, ray.exceptions.GetTimeoutError):
                pass
            await asyncio.sleep(0.1)
        await prefiller.shutdown()
        with pytest.raises(RequestRejectedError, match=KV_LOST):
            await tokens_of(decoder.generate_from_kv("lost", PROMPTS["long"], handle, GREEDY))
        assert await tokens_of(decoder.generate("after", PROMPTS["short"], GREEDY))

    loop.run(run(), timeout_s=120)
    assert loop.run(all_blocks_free(pool))


def test_serve_transport_ray_builds_ray_workers(pool, config):
    """`serve --transport ray` (or a factory config's `transport: ray`) gives each model Ray workers."""
    from pydantic import ValidationError

    from tokenfactory.cli import model_worker
    from tokenfactory.control.tiers import ModelSpec

    split = model_worker(ModelSpec(transport="ray", prefill_workers=1, decode_workers=2), config)
    assert isinstance(split, WorkerPool) and split.num_prefill == 1
    assert [type(w) for w in split.workers] == [RayEngineClient] * 3
    assert type(model_worker(ModelSpec(transport="ray"), config)) is RayEngineClient
    assert type(model_worker(ModelSpec(), config)) is AsyncEngineClient
    with pytest.raises(ValidationError, match="transport"):
        ModelSpec(transport="carrier-pigeon")


def test_a_killed_prefill_actor_leaves_no_request_unfinished(pool, zmq_tokens, loop):
    """Runs last: the prefill actor dies as a split request's first token comes back, its KV only in
    the object store (owned by that actor, so lost with it); the request finishes with the same
    tokens, and a new actor takes the dead one's place."""
    pool.disagg = DisaggConfig(min_prompt_tokens=32, max_cached_fraction=1.0)  # split even when cached

    async def run() -> list[int]:
        tokens: list[int] = []
        async for out in pool.generate("orphaned-kv", PROMPTS["long"], GREEDY):
            if not tokens:
                os.kill(pool.workers[0].info.pid, signal.SIGKILL)
                while pool.workers[0].is_alive:  # Ray knows the owner of the KV died before it is fetched
                    await asyncio.sleep(0.05)
            tokens.extend(out.new_token_ids)
        return tokens

    splits, migrations, restarts = pool.num_split, pool.num_migrations, pool.num_restarts
    assert loop.run(run(), timeout_s=60) == zmq_tokens["long"]
    # Recomputed on the decode actor if it found the KV lost with its owner; imported if it was quicker.
    assert pool.num_split == splits + 1 and pool.num_migrations - migrations in (0, 1)

    async def restarted() -> bool:
        while pool.num_restarts == restarts or not pool.workers[0].is_alive:
            await asyncio.sleep(0.1)
        return await all_blocks_free(pool)

    assert loop.run(restarted(), timeout_s=120)
