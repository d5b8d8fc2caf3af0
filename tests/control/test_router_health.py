"""A model pool's router counters as /health shows them, beside the pool's workers."""

from __future__ import annotations

from tokenfactory.control.router import RouteRequest, WorkerState
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.kv_cache import KVEvent, prompt_block_hashes
from tokenfactory.gateway.app import model_health
from tokenfactory.runtime.client import AsyncEngineClient
from tokenfactory.runtime.pool import ServedModel, WorkerPool

BLOCK = 16
PREFIX = list(range(1000, 1000 + 8 * BLOCK))


def test_health_shows_the_cached_prefix_the_router_gave_up_and_its_affinity_hits(tiny_model_dir):
    config = EngineConfig.from_pretrained(tiny_model_dir)
    # Workers never started: the router's decisions are all this test needs of the pool.
    pool = WorkerPool([AsyncEngineClient(config), AsyncEngineClient(config)], BLOCK, router="kv")
    pool.router.session_affinity = True
    pool.index.apply(0, [KVEvent("stored", prompt_block_hashes(PREFIX, BLOCK))])
    workers = [WorkerState(i, num_free_blocks=100, block_size=BLOCK) for i in range(2)]
    workers[0].queued_prefill_tokens = 1000 * BLOCK  # the prefix holder is swamped: its 8 blocks are given up
    prompt = PREFIX + [7] * 3
    request = RouteRequest(prompt_block_hashes(prompt, BLOCK), len(prompt), session_id="s")
    assert pool.router.route(request, workers, pool.index) == 1
    # The session's last worker, now predicted to hold the prefix too: nothing more given up.
    assert pool.router.route(request, workers, pool.index) == 1

    router = model_health(ServedModel(config, pool))["router"]
    assert router["forgone_overlap_tokens"] == 8 * BLOCK
    assert router["affinity_hits"] == 1 and router["decisions"] == 2 and router["mode"] == "events"
