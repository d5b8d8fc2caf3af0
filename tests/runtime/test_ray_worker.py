"""Workers as Ray actors on a local Ray: the same greedy tokens as an engine process over ZMQ, KV
events to the router, split requests' KV through the object store, a killed actor's requests
finishing elsewhere, and no object left in Ray once a load drains."""

from __future__ import annotations

import asyncio
import os
import signal
import time

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
    """Runs late: the prefill actor dies as a split request's first token comes back, its KV only in
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


def test_a_drained_load_leaves_no_object_in_ray(pool, loop):
    """Runs last: whole and split requests at once, the decode actor killed while some of their KV
    is on its way to it (those requests migrate). Once the load drains and the actor is restarted,
    no object is left, none from the earlier tests' splits and killed actors either: each actor's
    reference table is empty, and the driver holds only its clients' outstanding long polls."""
    pool.disagg = DisaggConfig(min_prompt_tokens=32, max_cached_fraction=1.0)  # every long prompt splits
    prompts = [[300 + i] * 8 + SHARED if i % 3 else [300 + i] * 5 for i in range(12)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    restarts, splits = pool.num_restarts, pool.num_split

    async def run() -> list[list[int]]:
        outputs_seen = 0

        async def one(i: int) -> list[int]:
            nonlocal outputs_seen
            tokens: list[int] = []
            async for out in pool.generate(f"drain-{i}", prompts[i], params):
                tokens.extend(out.new_token_ids)
                outputs_seen += 1
                if outputs_seen == 4:  # the first splits' KV imported or under way, the rest still to come
                    os.kill(pool.workers[1].info.pid, signal.SIGKILL)
            return tokens

        return await asyncio.gather(*(one(i) for i in range(len(prompts))))

    assert [len(t) for t in loop.run(run(), timeout_s=120)] == [12] * len(prompts)
    assert pool.num_split > splits

    async def restarted() -> bool:
        while pool.num_restarts == restarts or not all(w.is_alive for w in pool.workers):
            await asyncio.sleep(0.1)
        return await all_blocks_free(pool)

    assert loop.run(restarted(), timeout_s=120)
    actors = [w._actor for w in pool.workers]
    deadline = time.monotonic() + 20  # a release reaches an object's owner a moment after the last holder lets go
    while (left := objects_left(actors)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left


def objects_left(actors: list) -> list[str]:
    """Objects still referenced anywhere: in any of `actors`, or held by this process beyond one
    outstanding call (the long poll) per actor. A leaked object stays in its owner's table, and a
    reference to an object whose owner died (its object lost with it) stays in its holder's.

    Ray's public state API (`ray.util.state.list_objects`, or `ray memory`) cannot answer here: it
    asks the dashboard's API server and needs grpcio, both of `ray[default]`, not of the plain `ray`
    this project installs. Each process's own core-worker reference table is the lowest-level
    count that needs nothing more: an object lives exactly while its owner's table holds it."""
    def table(_actor=None) -> dict[str, bool]:  # pickled by value into each actor
        from ray.core.generated.common_pb2 import Address

        core = ray._private.worker.global_worker.core_worker
        me = core.get_worker_id().binary()
        owned = {}
        for key in core.get_all_reference_counts():
            owner = Address.FromString(core.get_owner_address(ray.ObjectRef(bytes.fromhex(key.decode()))))
            owned[key.decode()] = owner.worker_id == me
        return owned

    left = [f"actor {i}: {key}" for i, actor in enumerate(actors)
            for key in ray.get(actor.__ray_call__.remote(table), timeout=30)]
    here = table()
    borrowed = [f"driver borrows {key}" for key, mine in here.items() if not mine]
    owned = [key for key, mine in here.items() if mine]
    return left + borrowed + ([f"driver owns {len(owned)} objects: {owned}"] if len(owned) > len(actors) else [])
