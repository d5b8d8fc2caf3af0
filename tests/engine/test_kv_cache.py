import os
import subprocess
import sys

import msgspec
import pytest

from tokenfactory.engine.kv_cache import (
    KVCacheManager,
    KVEvent,
    hash_block_tokens,
    prompt_block_hashes,
)
from tokenfactory.engine.request import Request, RequestStatus, SamplingParams

BS = 4


def make_request(request_id: str, prompt: list[int], max_tokens: int = 8) -> Request:
    return Request(request_id, list(prompt), SamplingParams(max_tokens=max_tokens))


def admit(kv: KVCacheManager, request: Request) -> int:
    """Look up, allocate and compute the whole request, as the scheduler and runner would."""
    cached = kv.lookup_prefix(request)
    assert kv.allocate_slots(request, request.num_tokens - cached, cached)
    request.num_computed_tokens = request.num_tokens
    kv.cache_blocks(request)
    return cached


def finish(kv: KVCacheManager, request: Request) -> None:
    request.status = RequestStatus.FINISHED_STOPPED
    kv.free(request)


def test_block_hash_is_the_same_in_another_process():
    tokens = list(range(1000, 1037))
    here = prompt_block_hashes(tokens, 8)
    code = (
        "from tokenfactory.engine.kv_cache import prompt_block_hashes;"
        f"print(prompt_block_hashes(list(range(1000, 1037)), 8))"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == str(here)
    assert len(here) == 4  # 37 tokens: four full blocks of 8, the partial fifth is not hashed


def test_block_hashes_chain_on_the_whole_prefix():
    a = prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8], BS)
    b = prompt_block_hashes([9, 2, 3, 4, 5, 6, 7, 8], BS)
    assert a[0] != b[0]
    assert a[1] != b[1]  # same tokens in block 1, different prefix
    assert a[1] == hash_block_tokens(a[0], [5, 6, 7, 8])
    assert prompt_block_hashes([1, 2, 3, 4, 5, 6, 7, 8, 9], BS) == a


def test_prefix_hit_shares_blocks_across_requests():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    a = make_request("a", list(range(10)))  # blocks [0..3] [4..7] and a partial one
    assert admit(kv, a) == 0
    b = make_request("b", list(range(8)) + [99, 98, 97])
    assert kv.lookup_prefix(b) == 8
    assert kv.allocate_slots(b, 3, 8)
    assert kv.block_ids("b")[:2] == kv.block_ids("a")[:2]
    assert kv.block_ids("b")[2] not in kv.block_ids("a")
    assert kv.prefix_cache_hits == 8 and kv.prefix_cache_queries == 10 + 11


def test_last_token_is_never_served_from_cache():
    kv = KVCacheManager(num_blocks=16, block_size=BS)
    admit(kv, make_request("a", list(range(8))))
    again = make_request("b", list(range(8)))
    assert kv.lookup_prefix(again) == 4  # not 8: the last token must be computed for logits


def test_shared_blocks_are_ref_counted_and_nothing_leaks():
    kv = KVCacheManager(num_blocks=10, block_size=BS)
    a, b = make_request("a", list(range(12))), make_request("b", list(range(8)) + [50, 51])
    admit(kv, a)
    assert admit(kv, b) == 8
    assert kv.num_free_blocks == 10 - 3 - 1  # b holds two shared blocks and one own block
    finish(kv, a)
    assert kv.num_free_blocks == 10 - 3  # a's third block freed; the shared two still held by b
    finish(kv, b)
    assert kv.num_free_blocks == 10
    assert kv.usage == 0.0
    assert kv.block_ids("a") == [] and kv.block_ids("b") == []


def test_allocation_is_all_or_nothing():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(12)))
    admit(kv, a)
    b = make_request("b", list(range(100, 108)))
    assert not kv.allocate_slots(b, 8)
    assert kv.num_free_blocks == 1 and kv.block_ids("b") == []
    assert kv.allocate_slots(b, 4)


def test_eviction_takes_fresh_blocks_first_then_lru_tail_first():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    a, b = make_request("a", list(range(8)) + [0]), make_request("b", list(range(100, 108)) + [0])
    admit(kv, a)  # 3 blocks, two of them cached
    admit(kv, b)
    ha, hb = prompt_block_hashes(a.all_token_ids, BS), prompt_block_hashes(b.all_token_ids, BS)
    finish(kv, a)  # freed first: least recently used
    finish(kv, b)
    kv.take_events()
    c = make_request("c", list(range(200, 204)))
    assert kv.allocate_slots(c, 8)  # two uncached blocks are free: no eviction yet
    assert kv.take_events() == []
    assert kv.allocate_slots(c, 12) and kv.allocate_slots(c, 16)  # one eviction each
    events = kv.take_events()
    evicted = [h for e in events if e.kind == "removed" for h in e.block_hashes]
    assert evicted == [ha[1], ha[0]]  # a's chain, its tail first
    assert kv.lookup_prefix(make_request("b2", b.all_token_ids)) == 8
    assert kv.lookup_prefix(make_request("a2", a.all_token_ids)) == 0


def test_a_hit_revives_an_evictable_block_so_it_is_not_evicted():
    kv = KVCacheManager(num_blocks=4, block_size=BS)
    a = make_request("a", list(range(8)) + [0])
    admit(kv, a)
    finish(kv, a)
    assert kv.num_free_blocks == 4
    b = make_request("b", list(range(8)) + [7, 7])
    assert kv.lookup_prefix(b) == 8
    assert kv.allocate_slots(b, 2, 8)
    assert kv.num_free_blocks == 1  # both cached blocks revived plus one new
    c = make_request("c", [5, 5, 5, 5])
    assert kv.allocate_slots(c, 4)
    assert not kv.allocate_slots(make_request("d", [1]), 1)  # nothing left to evict
    assert kv.lookup_prefix(make_request("e", list(range(8)) + [1])) == 8


def test_events_describe_stored_and_removed_chains():
    kv = KVCacheManager(num_blocks=3, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    hashes = prompt_block_hashes(a.all_token_ids, BS)
    [stored] = kv.take_events()
    assert stored == KVEvent("stored", hashes, parent_hash=None, token_ids=list(range(8)), block_size=BS)
    # generated tokens fill the third block: it is stored chained on the second
    for token in (9, 10, 11):
        a.append_output_token(token)
        assert kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
        kv.cache_blocks(a)
    [more] = kv.take_events()
    assert more.block_hashes == [hash_block_tokens(hashes[1], [8, 9, 10, 11])]
    assert more.parent_hash == hashes[1] and more.token_ids == [8, 9, 10, 11]
    finish(kv, a)
    b = make_request("b", list(range(50, 62)))
    assert kv.allocate_slots(b, 12)
    [removed] = kv.take_events()
    assert removed.kind == "removed" and removed.block_hashes == [more.block_hashes[0], hashes[1], hashes[0]]
    wire = msgspec.msgpack.encode(removed)
    assert msgspec.msgpack.decode(wire, type=KVEvent) == removed


def test_reset_prefix_cache_forgets_everything():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    finish(kv, a)
    kv.take_events()
    kv.reset_prefix_cache()
    assert [e.kind for e in kv.take_events()] == ["cleared"]
    assert kv.lookup_prefix(make_request("b", list(range(9)))) == 0
    assert kv.num_free_blocks == 8 and kv.num_cached_blocks == 0


def test_prefix_caching_disabled_shares_nothing():
    kv = KVCacheManager(num_blocks=8, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", list(range(9)))
    admit(kv, a)
    assert admit(kv, make_request("b", list(range(9)))) == 0
    assert kv.take_events() == []
    assert kv.num_free_blocks == 8 - 6


def test_same_prefix_computed_twice_is_cached_once():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    a, b = make_request("a", list(range(5))), make_request("b", list(range(5)))
    for r in (a, b):  # both admitted before either computed: no hit for b
        assert kv.lookup_prefix(r) == 0 and kv.allocate_slots(r, 5)
    for r in (a, b):
        r.num_computed_tokens = 5
        kv.cache_blocks(r)
    assert len(kv.take_events()) == 1 and kv.num_cached_blocks == 1
    finish(kv, a)
    finish(kv, b)
    assert kv.num_free_blocks == 8


def test_stale_cached_token_count_is_refused():
    kv = KVCacheManager(num_blocks=8, block_size=BS)
    with pytest.raises(ValueError, match="not looked up"):
        kv.allocate_slots(make_request("a", list(range(9))), 1, 8)


def test_repeated_lookups_see_new_stores_and_evictions():
    kv = KVCacheManager(num_blocks=6, block_size=BS)
    waiting = make_request("waiting", list(range(1, 18)))  # 4 full blocks + 1 token
    assert kv.lookup_prefix(waiting) == 0
    first = make_request("first", list(range(1, 10)))  # shares blocks 0 and 1
    admit(kv, first)
    finish(kv, first)
    assert kv.lookup_prefix(waiting) == 2 * BS  # a store since the last lookup is seen
    filler = make_request("filler", list(range(100, 121)))  # 6 blocks: evicts both cached ones
    admit(kv, filler)
    assert kv.lookup_prefix(waiting) == 0  # and so is an eviction
