"""The paged KV cache manager: fixed-size blocks, ref counts and a hash-chained prefix cache.

Pure Python bookkeeping; the model runner owns the tensors and only ever sees block ids.

A block's hash covers its tokens and, through its parent's hash, every token before it, so
equal hashes mean equal prefixes. A block is cached (hash -> block) once all of its tokens'
KV has been computed, whether they came from the prompt or were generated.

Free blocks live in two pools:
- `_fresh`: blocks holding no cached hash; allocation takes these first.
- `_evictable`: blocks with ref count 0 that still hold a cached prefix, least recently freed
  first. Allocation evicts from the front when `_fresh` is empty; a prefix hit revives a
  block out of it in O(1). A request's blocks are freed tail-first, so a chain's end is
  evicted before its start (a shorter prefix stays usable longer).

Every store into and eviction from the prefix cache is recorded as a `KVEvent`; that stream
is all a router in another process knows about this cache.
"""

from __future__ import annotations

import array
import collections
import hashlib
import itertools
import operator
import struct
import sys
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field

import msgspec

from tokenfactory.engine.request import Request

ROOT_HASH = 0
"""The parent hash of a sequence's first block."""
_first = operator.itemgetter(0)


def hash_block_tokens(parent_hash: int, token_ids: Sequence[int]) -> int:
    """A 64-bit hash of one block, chained on its parent's; the same in every process
    (no Python `hash()`, whose salt differs per process)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(parent_hash.to_bytes(8, "little"))
    h.update(struct.pack(f"<{len(token_ids)}I", *token_ids))
    return int.from_bytes(h.digest(), "little")


def prompt_block_hashes(token_ids: Sequence[int], block_size: int, parent_hash: int = ROOT_HASH) -> list[int]:
    """The chained hashes of every full block of `token_ids` (a router uses these to find
    which worker holds a prompt's prefix); `parent_hash` continues the chain of earlier blocks."""
    hashes: list[int] = []
    _extend_block_hashes(hashes, token_ids, block_size, len(token_ids) // block_size, parent_hash)
    return hashes


def _extend_block_hashes(
    hashes: list[int], token_ids: Sequence[int], block_size: int, num_blocks: int, root: int = ROOT_HASH
) -> None:
    """Append the hashes of blocks len(hashes)..num_blocks-1, continuing the chain.

    The same values as `hash_block_tokens` block by block, about 3x faster: the tokens are
    packed once, and each parent's 8 bytes are the previous digest itself.
    """
    start = len(hashes)
    if start >= num_blocks:
        return
    packed = array.array("I", token_ids[start * block_size : num_blocks * block_size])
    if packed.itemsize != 4 or sys.byteorder != "little":  # "<I" is what hash_block_tokens packs
        packed = array.array("B", struct.pack(f"<{len(packed)}I", *packed))
    data, stride = packed.tobytes(), 4 * block_size
    digest = (hashes[-1] if hashes else root).to_bytes(8, "little")
    blake2b, from_bytes, append = hashlib.blake2b, int.from_bytes, hashes.append
    for offset in range(0, len(data), stride):
        digest = blake2b(digest + data[offset : offset + stride], digest_size=8).digest()
        append(from_bytes(digest, "little"))


class KVEvent(msgspec.Struct, frozen=True, array_like=True, omit_defaults=True):
    """A change to the prefix cache, as a router sees it.

    "stored": `block_hashes` form one chain (each the parent of the next); the first one's
    parent is `parent_hash` (None at a sequence start); `token_ids` are their tokens, in order.
    "removed": `block_hashes` were evicted. "cleared": the whole cache was dropped.
    """

    kind: str
    block_hashes: list[int] = []
    parent_hash: int | None = None
    token_ids: list[int] = []
    block_size: int = 0


@dataclass(slots=True)
class _RequestBlocks:
    """One request's share of the cache; kept across preemption so hashes are never redone."""

    block_ids: list[int] = field(default_factory=list)
    hashes: list[int] = field(default_factory=list)
    """Chained hashes of the request's full blocks, extended as tokens arrive."""
    num_cached_blocks: int = 0
    """Leading blocks of `block_ids` already offered to the prefix cache."""
    lookup_memo: tuple[int, int] = (-1, 0)
    """(cache generation, cached blocks) of the last lookup: while no cached block has left the
    cache since, those blocks are still there and the next lookup resumes after them."""
    frontier: int = -1
    """Index of the next block this request computes, while it is one of its known full blocks
    (-1 otherwise): the one block of it that a request sharing its prefix would wait for."""
    computing_until: int = 0
    """The request's known full blocks when admitted: it computes blocks up to here."""


class KVCacheManager:
    """Hands out KV blocks to requests, shares cached prefixes, and evicts in LRU order."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self._ref_counts = [0] * num_blocks
        self._block_hashes: list[int | None] = [None] * num_blocks
        self._hash_to_block: dict[int, int] = {}
        self._fresh: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() yields block 0 first
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._requests: dict[str, _RequestBlocks] = {}
        self._events: list[KVEvent] = []
        self._computing: dict[int, int] = {}
        """Hash -> number of running requests whose next block to compute it is."""
        self._generation = 0
        """Bumped whenever a cached block leaves the cache (eviction, reset)."""
        self.prefix_cache_queries = 0
        """Tokens of admitted requests looked up in the prefix cache."""
        self.prefix_cache_hits = 0
        """Of those, tokens served from the cache."""

    # --- stats -----------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self._fresh) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by some request (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cache_hits / self.prefix_cache_queries if self.prefix_cache_queries else 0.0

    @property
    def num_cached_blocks(self) -> int:
        return len(self._hash_to_block)

    # --- the scheduler's verbs -------------------------------------------------------------

    def lookup_prefix(self, request: Request) -> int:
        """Tokens of `request` whose KV already sits in the cache (a multiple of block_size).

        At most num_tokens - 1: the last token is always computed, to get its logits.
        Changes nothing but the request's memoised hashes.
        """
        if not self.enable_prefix_caching:
            return 0
        state = self._state(request.request_id)
        max_blocks = (request.num_tokens - 1) // self.block_size
        _extend_block_hashes(state.hashes, request.all_token_ids, self.block_size, max_blocks)
        generation, known = state.lookup_memo
        start = min(known, max_blocks) if generation == self._generation else 0
        num_blocks = start + self._count_cached(state.hashes, start, max_blocks)
        state.lookup_memo = (self._generation, num_blocks)
        return num_blocks * self.block_size

    def set_prompt_hashes(self, request: Request, prompt_hashes: Sequence[int]) -> None:
        """Take `prompt_block_hashes` of a new request's prompt from a caller that already has
        them (it hashed the prompt to route it), so the prompt is not hashed twice."""
        state = self._state(request.request_id)
        if not state.hashes:  # as lookup_prefix would: never the block holding the last token
            state.hashes = list(prompt_hashes[: (request.num_tokens - 1) // self.block_size])

    def is_computing(self, request: Request, num_cached_tokens: int) -> bool:
        """Whether the block right after `request`'s cached prefix is the one another running
        request computes next: waiting for it turns the duplicate work into a prefix hit.

        Only each request's next block is tracked, not all it will compute: a request sharing
        its prefix finds the cache ending right there (the blocks before are cached, by it or
        before it), so that is the block it asks about; tracking one block a request instead of
        hundreds keeps long prompts cheap."""
        state = self._requests.get(request.request_id)
        if state is None or not self._computing:
            return False
        index = num_cached_tokens // self.block_size
        return index < len(state.hashes) and state.hashes[index] in self._computing

    def allocate_slots(self, request: Request, num_new_tokens: int, num_cached_tokens: int = 0) -> bool:
        """Make room for `num_new_tokens` past `request.num_computed_tokens`; all or nothing.

        On a request's admission `num_cached_tokens` (from `lookup_prefix`, same step) attaches
        the cached prefix blocks first. Returns False, changing nothing, when blocks are short.
        """
        state = self._state(request.request_id)
        admitting = not state.block_ids
        hits: list[int] = []
        if num_cached_tokens:
            if state.block_ids:
                raise ValueError(f"request {request.request_id} already holds blocks")
            hits = self._cached_chain(state.hashes, num_cached_tokens // self.block_size)
            if len(hits) * self.block_size != num_cached_tokens:
                raise ValueError(f"{num_cached_tokens} cached tokens were not looked up this step")
        total_tokens = request.num_computed_tokens + num_cached_tokens + num_new_tokens
        num_needed = -(-total_tokens // self.block_size) - len(state.block_ids) - len(hits)
        num_reviving = sum(1 for b in hits if self._ref_counts[b] == 0)
        if num_needed > self.num_free_blocks - num_reviving:
            return False
        if not state.block_ids and self.enable_prefix_caching:
            self.prefix_cache_queries += request.num_tokens
            self.prefix_cache_hits += num_cached_tokens
        if hits:
            for block in hits:  # revive before allocating, so eviction cannot take them
                if self._ref_counts[block] == 0:
                    del self._evictable[block]
                self._ref_counts[block] += 1
            state.block_ids.extend(hits)
            state.num_cached_blocks = len(hits)
        if admitting and self.enable_prefix_caching:
            state.computing_until = len(state.hashes)
            self._advance_frontier(state, len(hits))
        if num_needed > 0:
            state.block_ids.extend(self._take_free_blocks(num_needed))
        return True

    def append_decode_blocks(self, requests: Sequence[Request]) -> bool:
        """One more block for each of `requests`, in order: the same blocks and events as
        `allocate_slots(request, 1)` for each, when each has just filled its last block.
        All or nothing: False, changing nothing, when fewer blocks are free."""
        if len(requests) > self.num_free_blocks:
            return False
        states, bs = self._requests, self.block_size
        for request in requests:
            state = states[request.request_id]
            if not state.block_ids or request.num_computed_tokens != len(state.block_ids) * bs:
                raise ValueError(f"request {request.request_id} has not filled its last block")
            state.block_ids.extend(self._take_free_blocks(1))
        return True

    def cache_blocks(self, request: Request) -> None:
        """Offer the request's newly full, computed blocks to the prefix cache.

        Called after a step advanced `num_computed_tokens`; hashes are extended only over the
        new blocks. A block whose prefix is already cached elsewhere stays private.
        """
        state = self._requests.get(request.request_id)
        if not self.enable_prefix_caching or state is None:
            return
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(state.block_ids))
        if num_full <= state.num_cached_blocks:
            return
        _extend_block_hashes(state.hashes, request.all_token_ids, bs, num_full)
        if state.frontier >= 0:
            self._advance_frontier(state, num_full)
        run_start: int | None = None  # first block of the current chain of new entries
        hashes, block_ids = state.hashes, state.block_ids
        hash_to_block, block_hashes = self._hash_to_block, self._block_hashes
        start = state.num_cached_blocks
        if hash_to_block.keys().isdisjoint(hashes[start:num_full]):  # the usual case: all new, one chain
            hash_to_block.update(zip(hashes[start:num_full], block_ids[start:num_full]))
            for i in range(start, num_full):
                block_hashes[block_ids[i]] = hashes[i]
            self._emit_stored(hashes, request.all_token_ids, start, num_full)
            state.num_cached_blocks = num_full
            return
        for i in range(start, num_full):
            block_hash, block = hashes[i], block_ids[i]
            if block_hash in hash_to_block:  # the same prefix computed twice
                if run_start is not None:
                    self._emit_stored(hashes, request.all_token_ids, run_start, i)
                run_start = None
                continue
            hash_to_block[block_hash] = block
            block_hashes[block] = block_hash
            if run_start is None:
                run_start = i
        if run_start is not None:
            self._emit_stored(state.hashes, request.all_token_ids, run_start, num_full)
        state.num_cached_blocks = num_full

    def free(self, request: Request) -> None:
        """Release the request's blocks, tail first. A finished request is forgotten; a
        preempted one keeps its hashes for its next lookup."""
        state = self._requests.get(request.request_id)
        if state is None:
            return
        if state.frontier >= 0:
            self._advance_frontier(state, state.computing_until)
        ref_counts, block_hashes, fresh, evictable = self._ref_counts, self._block_hashes, self._fresh, self._evictable
        for block in reversed(state.block_ids):
            count = ref_counts[block] = ref_counts[block] - 1
            if count == 0:
                if block_hashes[block] is None:
                    fresh.append(block)
                else:
                    evictable[block] = None  # most recently used at the end
        if request.is_finished:
            del self._requests[request.request_id]
        else:
            state.block_ids = []
            state.num_cached_blocks = 0

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table (a live view: read it, do not change it)."""
        state = self._requests.get(request_id)
        return state.block_ids if state is not None else []

    def take_events(self) -> list[KVEvent]:
        events, self._events = self._events, []
        return events

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix (e.g. after new weights); blocks in use stay allocated."""
        self._generation += 1
        for block in self._hash_to_block.values():
            self._block_hashes[block] = None
        self._hash_to_block.clear()
        self._fresh.extend(self._evictable)
        self._evictable.clear()
        self._events.append(KVEvent("cleared", block_size=self.block_size))

    # --- internals -------------------------------------------------------------------------

    def _state(self, request_id: str) -> _RequestBlocks:
        state = self._requests.get(request_id)
        if state is None:
            state = self._requests[request_id] = _RequestBlocks()
        return state

    def _advance_frontier(self, state: _RequestBlocks, index: int) -> None:
        """The request's next block to compute is now block `index` (none once it reaches the
        blocks known at admission)."""
        computing = self._computing
        if state.frontier >= 0:
            block_hash = state.hashes[state.frontier]
            count = computing[block_hash]
            if count == 1:
                del computing[block_hash]
            else:
                computing[block_hash] = count - 1
        state.frontier = index if index < state.computing_until else -1
        if state.frontier >= 0:
            block_hash = state.hashes[index]
            computing[block_hash] = computing.get(block_hash, 0) + 1

    def _count_cached(self, hashes: list[int], start: int, stop: int) -> int:
        """How many of hashes[start:stop] are cached, counting until the first miss (in C: a
        cached prefix is often hundreds of blocks)."""
        window = hashes[start:stop]
        try:
            return operator.indexOf(map(self._hash_to_block.__contains__, window), False)
        except ValueError:  # all cached
            return len(window)

    def _cached_chain(self, hashes: list[int], max_blocks: int) -> list[int]:
        """Block ids of the longest cached prefix among the first `max_blocks` hashes."""
        blocks = list(map(self._hash_to_block.get, hashes[:max_blocks]))
        if None in blocks:
            del blocks[blocks.index(None) :]
        return blocks

    def _take_free_blocks(self, count: int) -> list[int]:
        """`count` free blocks with ref count 1: fresh ones first (block ids in the order
        `_fresh.pop()` yields them), then the least recently used cached ones, whose eviction
        is recorded as one "removed" event. The caller has checked that enough are free."""
        fresh = self._fresh
        split = max(len(fresh) - count, 0)
        blocks = fresh[split:]
        del fresh[split:]
        blocks.reverse()
        num_evicting = count - len(blocks)
        if num_evicting > 0:
            block_hashes, hash_to_block = self._block_hashes, self._hash_to_block
            # Loops in C (map over bound methods): evictions come by the hundred with long prompts.
            victims = list(map(_first, map(self._evictable.popitem, itertools.repeat(False, num_evicting))))
            victim_hashes = list(map(block_hashes.__getitem__, victims))
            assert None not in victim_hashes
            collections.deque(map(hash_to_block.__delitem__, victim_hashes), maxlen=0)
            for block in victims:
                block_hashes[block] = None
            self._events.append(KVEvent("removed", victim_hashes, block_size=self.block_size))
            self._generation += num_evicting
            blocks.extend(victims)
        ref_counts = self._ref_counts
        for block in blocks:
            ref_counts[block] = 1
        return blocks

    def _emit_stored(self, hashes: list[int], token_ids: list[int], start: int, end: int) -> None:
        bs = self.block_size
        self._events.append(
            KVEvent(
                "stored",
                hashes[start:end],
                parent_hash=hashes[start - 1] if start else None,
                token_ids=token_ids[start * bs : end * bs],
                block_size=bs,
            )
        )
