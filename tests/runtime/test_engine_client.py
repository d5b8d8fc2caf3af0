"""The worker interface over a real engine process: stream, abort, reject, load, death."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import pytest

from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.engine.kv_cache import prompt_block_hashes
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.client import AsyncEngineClient, EngineDeadError, RequestRejectedError

CONTEXT_LEN = 256


def engine_config(model_dir: Path) -> EngineConfig:
    return EngineConfig.from_pretrained(model_dir, max_model_len=CONTEXT_LEN,
                                        cache=CacheConfig(block_size=16, num_blocks=64))


@pytest.fixture(scope="module")
def client(loop, tiny_model_dir):
    client = AsyncEngineClient(engine_config(tiny_model_dir))
    loop.run(client.start(), timeout_s=120)
    yield client
    loop.run(client.shutdown())


async def collect(client, request_id: str, prompt: list[int], params: SamplingParams) -> list:
    return [out async for out in client.generate(request_id, prompt, params)]


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kwargs)


async def wait_for_load(client, predicate, timeout_s: float = 10.0):
    deadline = time.monotonic() + timeout_s
    while not predicate(client.load):
        assert time.monotonic() < deadline, client.load
        await asyncio.sleep(0.02)
    return client.load


def test_ready_reports_the_engine_shape(client):
    assert client.info.num_blocks == 64 and client.info.block_size == 16
    assert client.info.context_len == CONTEXT_LEN
    assert client.is_alive and client.info.pid == client.pid


def test_generate_streams_every_token_then_finishes(client, loop):
    outs = loop.run(collect(client, "a", [1, 2, 3, 4], greedy(10)))
    assert sum(len(o.new_token_ids) for o in outs) == 10
    assert outs[-1].finish_reason == "length" and all(not o.finished for o in outs[:-1])
    again = loop.run(collect(client, "b", [1, 2, 3, 4], greedy(10)))
    assert [t for o in again for t in o.new_token_ids] == [t for o in outs for t in o.new_token_ids]


def test_concurrent_requests_are_routed_to_their_own_streams(client, loop):
    async def run() -> list[list]:
        return await asyncio.gather(*(collect(client, f"c{i}", [5 + i, 6, 7], greedy(4 + i)) for i in range(8)))

    results = loop.run(run())
    for i, outs in enumerate(results):
        assert {o.request_id for o in outs} == {f"c{i}"}
        assert sum(len(o.new_token_ids) for o in outs) == 4 + i


def test_leaving_early_aborts_and_frees_blocks(client, loop):
    async def run():
        async for out in client.generate("leaver", list(range(1, 40)), greedy(200)):
            if out.new_token_ids:
                break  # the generator's cleanup sends the abort
        return await wait_for_load(client, lambda load: load.num_running == 0 and load.num_waiting == 0)

    steps_before = client.load.num_steps
    load = loop.run(run())
    assert load.num_free_blocks == load.num_total_blocks == 64
    assert load.num_steps - steps_before < 100  # it did not run its 200 tokens


def test_engine_rejects_a_request_past_the_context_window(client, loop):
    with pytest.raises(RequestRejectedError, match="context window"):
        loop.run(collect(client, "too-long", [1] * 200, greedy(100)))
    assert client.is_alive


def test_dead_engine_fails_in_flight_requests(tiny_model_dir):
    async def run():
        client = AsyncEngineClient(engine_config(tiny_model_dir))
        await client.start()
        outputs = client.generate("doomed", [1, 2, 3], greedy(CONTEXT_LEN - 3))
        await outputs.__anext__()
        os.kill(client.pid, signal.SIGKILL)
        started = time.monotonic()
        with pytest.raises(EngineDeadError, match="died"):
            async for _ in outputs:
                pass
        assert time.monotonic() - started < 5
        assert not client.is_alive
        with pytest.raises(EngineDeadError):
            await collect(client, "after", [1, 2], greedy(2))
        await client.shutdown()

    asyncio.run(asyncio.wait_for(run(), 120))


def test_engine_that_fails_says_why(tiny_model_dir, tmp_path):
    # A checkpoint folder with a config but no weights: the engine process fails while loading.
    (tmp_path / "config.json").write_text((tiny_model_dir / "config.json").read_text())

    async def run():
        client = AsyncEngineClient(engine_config(tmp_path))
        with pytest.raises(EngineDeadError, match="failed to start(.|\n)*safetensors"):
            await client.start()
        assert not client.is_alive

    asyncio.run(asyncio.wait_for(run(), 120))


def test_token_ids_outside_the_vocabulary_are_refused_not_fatal(client, loop):
    with pytest.raises(RequestRejectedError, match="token ids"):
        loop.run(collect(client, "bad", [10**7], greedy(2)))
    assert client.is_alive
    assert len(loop.run(collect(client, "fine", [1, 2, 3], greedy(2)))) >= 1


def test_kv_events_reach_subscribers(client, loop):
    events = []
    client.subscribe_kv_events(events.extend)
    prompt = list(range(100, 140))  # 2 full blocks of 16 (engine_config's block size)
    loop.run(collect(client, "events", prompt, greedy(2)))
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert prompt_block_hashes(prompt, 16)[:2] == stored[:2]

def test_prompt_hashes_sent_with_a_request_are_used_not_recomputed(client, loop):
    """A pool hashes each prompt to route it and sends the hashes along: the engine takes them as its
    own (its KV events name the blocks by them) instead of hashing the prompt again."""
    events = []
    client.subscribe_kv_events(events.extend)
    prompt = list(range(300, 340))  # 2 full blocks of 16, the last token in a third
    given = [11, 22]  # not what hashing gives: only the sent hashes can produce these
    assert prompt_block_hashes(prompt, 16) != given
    outs = loop.run(collect_with_hashes(client, "hashed", prompt, greedy(2), given))
    assert sum(len(o.new_token_ids) for o in outs) == 2
    stored = [h for e in events if e.kind == "stored" for h in e.block_hashes]
    assert stored[:2] == given


async def collect_with_hashes(client, request_id: str, prompt: list[int], params: SamplingParams,
                              prompt_hashes: list[int]) -> list:
    return [out async for out in client.generate(request_id, prompt, params, prompt_hashes=prompt_hashes)]
