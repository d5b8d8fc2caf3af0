"""Routing policies as pure functions: worker states and an index in, a worker id out."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from tokenfactory.control.kv_index import ApproximateIndex, KVIndex
from tokenfactory.control.router import (
    ROUTERS,
    KVAwareRouter,
    LeastLoadedRouter,
    NoWorkerError,
    RandomRouter,
    RoundRobinRouter,
    RouteRequest,
    WorkerState,
    make_router,
)
from tokenfactory.engine.kv_cache import KVEvent, prompt_block_hashes

BLOCK = 16
PREFIX = list(range(1000, 1000 + 8 * BLOCK))  # 8 shared blocks


def request_with_prefix(suffix: int, session_id: str | None = None, now: float = 0.0) -> RouteRequest:
    tokens = PREFIX + [suffix] * BLOCK + [suffix]
    return RouteRequest(prompt_block_hashes(tokens, BLOCK), len(tokens), session_id=session_id, now=now)


def idle_workers(n: int, **overrides) -> list[WorkerState]:
    return [WorkerState(i, num_free_blocks=100, block_size=BLOCK, **overrides) for i in range(n)]


def index_with_prefix_on(worker_id: int) -> KVIndex:
    index = KVIndex()
    index.apply(worker_id, [KVEvent("stored", prompt_block_hashes(PREFIX, BLOCK))])
    return index


def test_kv_router_sends_a_request_to_the_worker_holding_its_prefix():
    router = KVAwareRouter()
    index = index_with_prefix_on(2)
    assert router.route(request_with_prefix(1), idle_workers(3), index) == 2
    assert router.metrics.decisions == 1 and router.metrics.mode == "events"
    assert router.metrics.mean_predicted_overlap_tokens == 8 * BLOCK


def test_kv_router_leaves_the_prefix_holder_when_its_load_outweighs_the_saving():
    router = KVAwareRouter()
    index = index_with_prefix_on(0)
    workers = idle_workers(2)
    workers[0].num_running = 5  # 5 decodes weigh less than the 8 cached blocks save: stay
    assert router.route(request_with_prefix(1), workers, index) == 0
    workers[0].num_running, workers[0].num_waiting, workers[0].queued_prefill_tokens = 6, 3, 40 * BLOCK
    assert router.route(request_with_prefix(2), workers, index) == 1


def test_kv_router_holds_a_conversation_on_its_cache_until_the_queue_there_outweighs_twice_the_saving():
    # 8 cached blocks save 8 blocks of this request's wait and, at work_weight 1, 8 of the fleet's work.
    def route_with_queue(queued_blocks: int) -> int:
        workers = idle_workers(2)
        workers[0].queued_prefill_tokens = queued_blocks * BLOCK
        return KVAwareRouter(work_weight=1.0).route(request_with_prefix(1), workers, index_with_prefix_on(0))

    assert route_with_queue(15) == 0
    assert route_with_queue(17) == 1
    workers = idle_workers(2)
    workers[0].queued_prefill_tokens = 9 * BLOCK  # counting only its own wait, it leaves earlier
    assert KVAwareRouter(work_weight=0.0).route(request_with_prefix(1), workers, index_with_prefix_on(0)) == 1


def test_metrics_count_the_cached_prefix_given_up_for_load():
    router = KVAwareRouter()
    workers = idle_workers(2)
    workers[0].queued_prefill_tokens = 1000 * BLOCK
    assert router.route(request_with_prefix(1), workers, index_with_prefix_on(0)) == 1
    assert router.metrics.forgone_overlap_tokens == 8 * BLOCK
    assert router.route(request_with_prefix(2), idle_workers(2), index_with_prefix_on(1)) == 1
    assert router.metrics.forgone_overlap_tokens == 8 * BLOCK  # it took the cached prefix: nothing forgone


def test_kv_router_spreads_new_conversations_over_equally_idle_workers():
    router = KVAwareRouter()
    index = KVIndex()
    prompts = [list(range(1000 * i, 1000 * i + 145)) for i in range(12)]  # nothing shared
    picks = [router.route(RouteRequest(prompt_block_hashes(p, BLOCK), len(p)), idle_workers(4), index) for p in prompts]
    # Equal in all else, the work each worker was given so far decides, not the lowest id.
    assert sorted(Counter(picks).values()) == [3, 3, 3, 3]
    assert set(router.routed_prefill_tokens.values()) == {3 * 145}


def test_kv_router_balance_moves_a_cached_prefix_off_a_worker_given_far_more_work():
    def route(balance_weight: float) -> int:
        router = KVAwareRouter(balance_weight=balance_weight)
        router.routed_prefill_tokens.update({0: 100_000, 1: 0})
        return router.route(request_with_prefix(1), idle_workers(2), index_with_prefix_on(0))

    # Staying saves 2 x 8 blocks; 100k tokens of excess weigh 100k x weight / 16 blocks.
    assert route(0.0) == 0
    assert route(0.002) == 0  # 12.5 blocks
    assert route(0.02) == 1  # 125 blocks


def test_kv_router_counts_routed_prefill_net_of_predicted_hits_and_a_newcomer_starts_level():
    router = KVAwareRouter(session_affinity=True)
    workers = idle_workers(2)
    assert router.route(request_with_prefix(1, session_id="s"), workers, index_with_prefix_on(1)) == 1
    assert router.routed_prefill_tokens == {0: 0, 1: 145 - 8 * BLOCK}
    workers[1].queued_prefill_tokens = 10**6  # affinity ignores the queue; its pick is counted too
    assert router.route(request_with_prefix(2, session_id="s"), workers, KVIndex()) == 1
    assert router.routed_prefill_tokens[1] == 17 + 145
    router.routed_prefill_tokens[0] = 500
    workers.append(WorkerState(2, num_free_blocks=100, block_size=BLOCK))
    workers[1].queued_prefill_tokens = 0
    assert router.route(request_with_prefix(3), workers, KVIndex()) == 1
    # The newcomer joined level with the least given (162), not at 0 where it would take everything.
    assert router.routed_prefill_tokens == {0: 500, 1: 162 + 145, 2: 162}


def test_kv_router_without_any_prefix_picks_the_least_loaded_then_the_lowest_id():
    router = KVAwareRouter()
    workers = idle_workers(3)
    assert router.route(request_with_prefix(1), workers, KVIndex()) == 0
    workers[0].num_running = 1
    assert router.route(request_with_prefix(1), workers, KVIndex()) == 1
    assert router.metrics.mean_predicted_overlap_tokens == 0


def test_dead_workers_are_never_chosen():
    index = index_with_prefix_on(0)
    workers = idle_workers(2)
    workers[0].alive = False
    for name in ROUTERS:
        assert make_router(name).route(request_with_prefix(1), workers, index) == 1
    workers[1].alive = False
    with pytest.raises(NoWorkerError):
        KVAwareRouter().route(request_with_prefix(1), workers, index)


def test_softmax_sampling_is_seeded_and_favours_the_cheaper_worker():
    def picks(seed: int) -> list[int]:
        router = KVAwareRouter(temperature=8.0, work_weight=1.0, balance_weight=0.0, rng=random.Random(seed))
        # A fresh index per decision: each one faces the same 8-block gap.
        return [router.route(request_with_prefix(i), idle_workers(2), index_with_prefix_on(1)) for i in range(200)]

    assert picks(7) == picks(7)
    counts = Counter(picks(7))
    assert counts[1] > 150 and counts[0] > 0  # cost gap 2 x 8 blocks, temperature 8: about 88% / 12%
    with pytest.raises(ValueError):
        KVAwareRouter(temperature=-1)


def test_round_robin_cycles_over_the_alive_workers_whatever_they_hold():
    router = RoundRobinRouter()
    index = index_with_prefix_on(0)
    workers = idle_workers(3)
    assert [router.route(request_with_prefix(i), workers, index) for i in range(4)] == [0, 1, 2, 0]
    workers[1].alive = False
    assert [router.route(request_with_prefix(i), workers, index) for i in range(3)] == [2, 0, 2]


def test_random_router_is_repeatable_with_a_seed_and_uses_every_worker():
    def picks(seed: int) -> list[int]:
        router = RandomRouter(rng=random.Random(seed))
        return [router.route(request_with_prefix(i), idle_workers(3)) for i in range(60)]

    assert picks(3) == picks(3) and set(picks(3)) == {0, 1, 2}


def test_least_loaded_counts_requests_then_free_blocks():
    workers = idle_workers(3)
    workers[0].num_running, workers[1].num_waiting = 2, 1
    workers[2].num_running = 1
    workers[2].num_free_blocks = 50
    assert LeastLoadedRouter().route(request_with_prefix(1), workers) == 1  # 1 request, 100 free blocks
    assert LeastLoadedRouter().metrics.mode == "none"


def test_least_loaded_takes_equally_loaded_workers_in_turn():
    router = LeastLoadedRouter()
    # Requests one at a time, each done before the next: every worker is idle at every decision.
    assert [router.route(request_with_prefix(i), idle_workers(3)) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]
    workers = idle_workers(4)
    workers[2].num_running = 1  # the turn skips a busier worker and goes on after the one chosen
    assert [router.route(request_with_prefix(i), workers) for i in range(4)] == [1, 3, 0, 1]
    # The same state and history give the same choice.
    twin = LeastLoadedRouter()
    assert [twin.route(request_with_prefix(i), idle_workers(3)) for i in range(7)] == [0, 1, 2, 0, 1, 2, 0]


def test_session_affinity_holds_while_the_worker_is_alive_and_not_overloaded():
    router = RoundRobinRouter(session_affinity=True, max_waiting=4)
    workers = idle_workers(3)
    first = router.route(request_with_prefix(1, session_id="s"), workers)
    assert [router.route(request_with_prefix(i, session_id="s"), workers) for i in range(3)] == [first] * 3
    assert router.metrics.affinity_hits == 3
    workers[first].num_waiting = 4  # overloaded: the session moves, and stays on its new worker
    moved = router.route(request_with_prefix(5, session_id="s"), workers)
    assert moved != first
    workers[first].num_waiting = 0
    assert router.route(request_with_prefix(6, session_id="s"), workers) == moved
    workers[moved].alive = False
    assert router.route(request_with_prefix(7, session_id="s"), workers) not in (moved,)
    assert router.route(request_with_prefix(8, session_id="other"), workers) in {0, 1, 2} - {moved}


def test_session_affinity_gives_way_when_the_worker_lacks_free_blocks():
    router = KVAwareRouter(session_affinity=True)
    workers = idle_workers(2)
    assert router.route(request_with_prefix(1, session_id="s"), workers, KVIndex()) == 0
    workers[0].num_free_blocks = 2  # the prompt needs 10 blocks
    assert router.route(request_with_prefix(2, session_id="s"), workers, KVIndex()) == 1


def test_kv_router_over_the_approximate_index_follows_its_own_decisions_until_they_expire():
    router = KVAwareRouter()
    index = ApproximateIndex(ttl_s=30.0)
    workers = idle_workers(2)
    workers[0].num_running = 1  # the first request goes to worker 1
    assert router.route(request_with_prefix(1, now=0.0), workers, index) == 1
    workers[1].num_running = 3  # still cheaper than recomputing 8 prefix blocks on worker 0
    assert router.route(request_with_prefix(2, now=10.0), workers, index) == 1
    assert router.metrics.mode == "approximate"
    assert router.route(request_with_prefix(3, now=41.0), workers, index) == 0  # forgotten


def test_registry_names_every_policy():
    assert set(ROUTERS) == {"kv", "round_robin", "random", "least_loaded"}
    assert isinstance(make_router("kv", decode_weight=2.0), KVAwareRouter)
    with pytest.raises(ValueError, match="unknown router"):
        make_router("telepathy")


def test_session_table_forgets_the_least_recently_routed_session_first():
    router = RoundRobinRouter(session_affinity=True, max_sessions=2)
    workers = idle_workers(3)
    first = router.route(request_with_prefix(1, session_id="a"), workers)
    router.route(request_with_prefix(2, session_id="b"), workers)
    assert router.route(request_with_prefix(3, session_id="a"), workers) == first  # "a" is now the newest
    router.route(request_with_prefix(4, session_id="c"), workers)  # forgets "b", keeps "a"
    assert set(router._sessions) == {"a", "c"}
