"""The router's view of the workers' caches: exact from KV events, approximate from its own decisions."""

from __future__ import annotations

import pytest

from tokenfactory.control.kv_index import ApproximateIndex, KVIndex
from tokenfactory.engine.kv_cache import KVCacheManager, KVEvent, prompt_block_hashes
from tokenfactory.engine.request import Request, SamplingParams

BLOCK = 4


def chain(tokens: list[int]) -> list[int]:
    return prompt_block_hashes(tokens, BLOCK)


SHARED = list(range(100, 116))          # 4 blocks
PROMPT_A = SHARED + list(range(1, 9))   # 6 blocks, first 4 shared
PROMPT_B = SHARED + list(range(9, 17))  # 6 blocks, first 4 shared


def stored(hashes: list[int]) -> KVEvent:
    return KVEvent("stored", hashes)


def test_overlap_counts_the_leading_blocks_each_worker_holds():
    index = KVIndex()
    index.apply(0, [stored(chain(PROMPT_A))])
    index.apply(1, [stored(chain(SHARED))])
    assert index.overlap(chain(PROMPT_A)) == {0: 6, 1: 4}
    assert index.overlap(chain(PROMPT_B)) == {0: 4, 1: 4}
    assert index.overlap(chain(list(range(500, 524)))) == {}
    assert index.overlap([]) == {}


def test_overlap_stops_at_each_workers_first_miss():
    index = KVIndex()
    hashes = chain(PROMPT_A)
    index.apply(0, [stored(hashes)])
    index.apply(1, [stored([hashes[0], hashes[2], hashes[3]])])  # block 1 is missing on worker 1
    assert index.overlap(hashes) == {0: 6, 1: 1}


def test_removed_blocks_cut_the_chain_and_cleared_forgets_the_worker():
    index = KVIndex()
    hashes = chain(PROMPT_A)
    index.apply(0, [stored(hashes)])
    index.apply(1, [stored(hashes)])
    index.apply(0, [KVEvent("removed", hashes[3:])])  # evicted tail first, as the engine does
    assert index.overlap(hashes) == {0: 3, 1: 6}
    assert index.num_blocks(0) == 3
    index.apply(1, [KVEvent("cleared")])
    assert index.overlap(hashes) == {0: 3}
    index.remove_worker(0)
    assert index.overlap(hashes) == {} and index.num_blocks(0) == 0


def test_events_apply_in_order_within_a_batch():
    index = KVIndex()
    hashes = chain(SHARED)
    index.apply(0, [stored(hashes), KVEvent("removed", hashes), stored(hashes[:2])])
    assert index.overlap(hashes) == {0: 2}
    with pytest.raises(ValueError, match="unknown KV event"):
        index.apply(0, [KVEvent("teleported")])


def run_prompt(manager: KVCacheManager, request_id: str, prompt: list[int]) -> None:
    """Admit a request, compute its whole prompt, and free it (its full blocks stay cached)."""
    request = Request(request_id, prompt, SamplingParams(max_tokens=1))
    cached = manager.lookup_prefix(request)
    assert manager.allocate_slots(request, len(prompt) - cached, cached)
    request.num_computed_tokens = len(prompt)
    manager.cache_blocks(request)
    manager.free(request)


def test_index_fed_a_real_cache_managers_events_matches_its_prefix_lookups():
    """The engine's own events (stored chains, then evictions) keep the index exact."""
    manager = KVCacheManager(num_blocks=8, block_size=BLOCK)
    index = KVIndex()
    run_prompt(manager, "a", PROMPT_A + [7])
    index.apply(0, manager.take_events())
    assert index.overlap(chain(PROMPT_A)) == {0: 6}
    run_prompt(manager, "other", list(range(900, 920)))  # 5 blocks: evicts some of A's
    events = manager.take_events()
    assert any(e.kind == "removed" for e in events)
    index.apply(0, events)
    probe = Request("probe", PROMPT_A + [7], SamplingParams(max_tokens=1))
    assert index.overlap(chain(PROMPT_A)) == {0: 3}  # the chain's tail went first
    assert 3 * BLOCK == manager.lookup_prefix(probe)
    manager.reset_prefix_cache()
    index.apply(0, manager.take_events())
    assert index.overlap(chain(PROMPT_A)) == {} and index.overlap(chain(list(range(900, 920)))) == {}


def test_approximate_index_remembers_routed_prefixes_until_they_expire():
    index = ApproximateIndex(ttl_s=10.0)
    index.record_routed(0, chain(PROMPT_A), now=100.0)
    index.record_routed(1, chain(SHARED), now=105.0)
    assert index.mode == "approximate"
    assert index.overlap(chain(PROMPT_B), now=106.0) == {0: 4, 1: 4}
    assert index.overlap(chain(PROMPT_A), now=109.9) == {0: 6, 1: 4}
    assert index.overlap(chain(PROMPT_A), now=110.0) == {1: 4}   # worker 0's copy expired
    index.record_routed(1, chain(SHARED), now=112.0)               # a new request renews it
    assert index.overlap(chain(SHARED), now=121.0) == {1: 4}
    assert index.overlap(chain(SHARED), now=122.0) == {}
    index.prune(now=122.0)
    assert len(index) == 0


def test_approximate_index_forgets_a_removed_worker():
    index = ApproximateIndex(ttl_s=10.0)
    index.record_routed(0, chain(SHARED), now=0.0)
    index.record_routed(1, chain(SHARED), now=0.0)
    index.remove_worker(0)
    assert index.overlap(chain(SHARED), now=1.0) == {1: 4}
    with pytest.raises(ValueError):
        ApproximateIndex(ttl_s=0)


def test_routed_blocks_count_until_confirmed_or_expired():
    index = KVIndex(pending_ttl_s=10.0)
    hashes = [11, 12, 13]
    index.record_routed(1, hashes, now=0.0)
    assert index.overlap(hashes, now=1.0) == {1: 3}  # a burst right behind it follows it to worker 1
    assert index.overlap(hashes, now=10.5) == {}  # never confirmed (aborted before prefill): forgotten
    index.record_routed(1, hashes, now=20.0)
    index.apply(1, [KVEvent("stored", hashes[:2], token_ids=[0] * 8, block_size=4)])
    assert index.overlap(hashes, now=50.0) == {1: 2}  # the event speaks for what was really stored



def test_a_routed_block_stored_and_then_removed_stops_counting_at_once():
    index = KVIndex(pending_ttl_s=10.0)
    hashes = [21, 22, 23]
    index.apply(1, [stored(hashes[:1])])  # the first block was there already
    index.record_routed(1, hashes, now=0.0)
    index.apply(1, [stored(hashes[1:])])  # the prefill confirms the rest
    assert index.overlap(hashes, now=1.0) == {1: 3}
    index.apply(1, [KVEvent("removed", hashes[1:2])])  # evicted well within the routed blocks' TTL
    assert index.overlap(hashes, now=2.0) == {1: 1}
    index.apply(1, [KVEvent("removed", hashes[:1])])
    assert index.overlap(hashes, now=2.0) == {}

def test_copies_per_block_counts_how_many_workers_hold_each_cached_block():
    index = KVIndex()
    assert index.copies_per_block() == 0.0
    index.apply(0, [stored(chain(PROMPT_A))])
    assert index.copies_per_block() == 1.0
    index.apply(1, [stored(chain(SHARED))])  # 4 of A's 6 blocks now twice: 10 copies of 6 blocks
    assert index.copies_per_block() == pytest.approx(10 / 6)
    index.apply(1, [KVEvent("removed", chain(SHARED))])
    assert index.copies_per_block() == 1.0
