"""Which worker holds which prefix: the router's view of every worker's KV cache.

Block hashes are chained (`engine.kv_cache.hash_block_tokens`): block i's hash covers every token
before it, so a worker holds a prompt's first k blocks exactly when it holds the hashes of blocks
0..k-1. `overlap` counts, per worker, the leading blocks of a request's chain that it holds and
stops at that worker's first miss (a block past a gap cannot be reused: its parent is gone).

Two indexes answer the same questions:
- `KVIndex` is built only from the workers' `KVEvent`s (stored / removed / cleared): exact, as of
  the last event received.
- `ApproximateIndex` hears no events; it remembers where it sent each request's blocks and
  forgets them after a time-to-live, for workers that publish no events.
Both are plain dicts and sets, so a lookup is O(blocks of the request) per worker, and stops at
that worker's first miss.
"""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from typing import Protocol

from tokenfactory.engine.kv_cache import KVEvent

WorkerId = int


class PrefixIndex(Protocol):
    """What a router asks of an index."""

    mode: str
    """"events" or "approximate": how the index learns what workers hold."""

    def overlap(self, block_hashes: Sequence[int], now: float = 0.0) -> dict[WorkerId, int]:
        """Per worker holding at least the first block: how many leading blocks it holds."""
        ...

    def record_routed(self, worker_id: WorkerId, block_hashes: Sequence[int], now: float) -> None:
        """The router sent a request with these blocks to `worker_id`."""
        ...

    def remove_worker(self, worker_id: WorkerId) -> None:
        """Forget everything about a worker (it died or left the pool)."""
        ...


def leading_overlap(holders_of: Iterable[set[WorkerId] | None]) -> dict[WorkerId, int]:
    """Count, per worker, the leading run of blocks it holds; `holders_of` yields each block's
    holders in chain order. Stops as soon as no worker is still on its run."""
    counts: dict[WorkerId, int] = {}
    still_matching: set[WorkerId] | None = None
    for depth, holders in enumerate(holders_of, start=1):
        if not holders:
            break
        still_matching = set(holders) if still_matching is None else still_matching & holders
        if not still_matching:
            break
        for worker_id in still_matching:
            counts[worker_id] = depth
    return counts


class KVIndex:
    """The exact index: the block hashes each worker's prefix cache holds, from its KV events.

    Between routing a request and that worker's "stored" event for its prompt lies the prompt's
    prefill; a burst of requests sharing a new prefix would scatter in that window. So blocks
    routed to a worker count as held there ("pending") until its event confirms them, or for
    `pending_ttl_s` at most (a request aborted before its prefill never confirms).

    A held block counts whatever its pending entry says, so entries are not dropped when their
    blocks are stored (nor left out for blocks already held): they matter again only once the
    block is removed, and a removal drops them. That spares every routed and every stored block
    a lookup; the entries are pruned once expired.
    """

    mode = "events"

    def __init__(self, pending_ttl_s: float = 30.0) -> None:
        self.pending_ttl_s = pending_ttl_s
        self._blocks_of: dict[WorkerId, set[int]] = {}
        """Worker -> the block hashes its events say it caches. Per worker only (no hash -> workers
        map): `overlap` walks each worker's own set, and an event touches one set, in C."""
        self._pending: dict[WorkerId, dict[int, float]] = {}
        """Worker -> block hash -> when the routed-but-unconfirmed copy stops counting."""
        self._routed_since_prune = 0
        self._last_runs: tuple[Sequence[int] | None, dict[WorkerId, int]] = (None, {})
        """The last `overlap` query's block hashes and, per worker, how many of them lead its
        confirmed blocks: routing that request right after records only the blocks past them."""

    def apply(self, worker_id: WorkerId, events: Iterable[KVEvent]) -> None:
        """Take one batch of a worker's events, in the order the worker emitted them."""
        self._last_runs = (None, {})
        for event in events:
            if event.kind == "stored":
                self._store(worker_id, event.block_hashes)
            elif event.kind == "removed":
                self._remove(worker_id, event.block_hashes)
            elif event.kind == "cleared":
                self.remove_worker(worker_id)
            else:
                raise ValueError(f"unknown KV event kind {event.kind!r}")

    def _store(self, worker_id: WorkerId, block_hashes: Sequence[int]) -> None:
        blocks = self._blocks_of.get(worker_id)
        if blocks is None:
            blocks = self._blocks_of[worker_id] = set()
        blocks.update(block_hashes)

    def _remove(self, worker_id: WorkerId, block_hashes: Sequence[int]) -> None:
        blocks = self._blocks_of.get(worker_id)
        if blocks is not None:
            blocks.difference_update(block_hashes)
        self._drop_pending(worker_id, block_hashes)

    def remove_worker(self, worker_id: WorkerId) -> None:
        self._last_runs = (None, {})
        self._blocks_of.pop(worker_id, None)
        self._pending.pop(worker_id, None)

    def _drop_pending(self, worker_id: WorkerId, block_hashes: Sequence[int]) -> None:
        pending = self._pending.get(worker_id)
        if pending:
            for block_hash in pending.keys() & block_hashes:
                del pending[block_hash]

    def num_blocks(self, worker_id: WorkerId) -> int:
        """Cached blocks the index believes `worker_id` holds."""
        return len(self._blocks_of.get(worker_id, ()))

    def copies_per_block(self) -> float:
        """Workers holding each cached block, on average (1.0: no prefix is cached twice)."""
        held = [blocks for blocks in self._blocks_of.values() if blocks]
        distinct = len(set().union(*held))
        return sum(map(len, held)) / distinct if distinct else 0.0

    def overlap(self, block_hashes: Sequence[int], now: float = 0.0) -> dict[WorkerId, int]:
        # A worker's count is its own leading run (what `leading_overlap` computes), so each
        # worker is walked on its own maps and stops at its first miss.
        counts: dict[WorkerId, int] = {}
        runs: dict[WorkerId, int] = {}
        for worker_id in self._blocks_of.keys() | self._pending.keys():
            held = self._blocks_of.get(worker_id, ())
            depth = runs[worker_id] = _leading_run(held, block_hashes)
            pending = self._pending.get(worker_id)
            if pending:  # past the confirmed run, routed blocks not yet expired count too
                for block_hash in itertools.islice(block_hashes, depth, None):
                    if block_hash not in held and pending.get(block_hash, now) <= now:
                        break
                    depth += 1
            if depth:
                counts[worker_id] = depth
        self._last_runs = (block_hashes, runs)
        return counts

    def record_routed(self, worker_id: WorkerId, block_hashes: Sequence[int], now: float) -> None:
        """The blocks count as `worker_id`'s until its events confirm them (or the TTL passes)."""
        pending = self._pending.get(worker_id)
        if pending is None:
            pending = self._pending[worker_id] = {}
        last_query, runs = self._last_runs
        known_held = runs.get(worker_id, 0) if last_query is block_hashes else 0
        pending.update(dict.fromkeys(itertools.islice(block_hashes, known_held, None), now + self.pending_ttl_s))
        self._routed_since_prune += 1
        if self._routed_since_prune >= 1024:  # bound the memory of never-confirmed entries
            self._routed_since_prune = 0
            for pending in self._pending.values():
                for block_hash in [h for h, t in pending.items() if t <= now]:
                    del pending[block_hash]


def _leading_run(held: set[int] | tuple[()], block_hashes: Sequence[int]) -> int:
    """How many of `block_hashes`, from the first, are in `held` (counted in C: a long cached
    prefix is hundreds of blocks)."""
    try:
        return operator.indexOf(map(held.__contains__, block_hashes), False)
    except ValueError:  # held all
        return len(block_hashes)


class ApproximateIndex:
    """A guess from the router's own decisions: blocks routed to a worker are assumed cached
    there for `ttl_s` seconds after the last request that carried them."""

    mode = "approximate"

    def __init__(self, ttl_s: float = 120.0) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self.ttl_s = ttl_s
        self._expiry: dict[int, dict[WorkerId, float]] = {}
        """Block hash -> worker -> the time its copy is assumed gone."""

    def record_routed(self, worker_id: WorkerId, block_hashes: Sequence[int], now: float) -> None:
        expires = now + self.ttl_s
        for block_hash in block_hashes:
            self._expiry.setdefault(block_hash, {})[worker_id] = expires

    def overlap(self, block_hashes: Sequence[int], now: float = 0.0) -> dict[WorkerId, int]:
        return leading_overlap(self._live_holders(h, now) for h in block_hashes)

    def _live_holders(self, block_hash: int, now: float) -> set[WorkerId] | None:
        """Holders whose copy has not expired; drops the expired ones on the way."""
        expiry = self._expiry.get(block_hash)
        if expiry is None:
            return None
        for worker_id in [w for w, t in expiry.items() if t <= now]:
            del expiry[worker_id]
        if not expiry:
            del self._expiry[block_hash]
            return None
        return set(expiry)

    def prune(self, now: float) -> None:
        """Drop every expired entry (lookups drop them lazily; this bounds memory)."""
        for block_hash in list(self._expiry):
            self._live_holders(block_hash, now)

    def remove_worker(self, worker_id: WorkerId) -> None:
        for block_hash in list(self._expiry):
            expiry = self._expiry[block_hash]
            expiry.pop(worker_id, None)
            if not expiry:
                del self._expiry[block_hash]

    def __len__(self) -> int:
        """Block hashes remembered (expired ones included until pruned)."""
        return len(self._expiry)
