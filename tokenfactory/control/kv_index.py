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
    """The exact index: block hash -> workers whose prefix cache holds it, from KV events.

    Between routing a request and that worker's "stored" event for its prompt lies the prompt's
    prefill; a burst of requests sharing a new prefix would scatter in that window. So blocks
    routed to a worker count as held there ("pending") until its event confirms them, or for
    `pending_ttl_s` at most (a request aborted before its prefill never confirms).
    """

    mode = "events"

    def __init__(self, pending_ttl_s: float = 30.0) -> None:
        self.pending_ttl_s = pending_ttl_s
        self._holders: dict[int, set[WorkerId]] = {}
        self._blocks_of: dict[WorkerId, set[int]] = {}
        self._pending: dict[WorkerId, dict[int, float]] = {}
        """Worker -> block hash -> when the routed-but-unconfirmed copy stops counting. Kept per
        worker, like `_blocks_of`, so an event or a routing touches one worker's maps only."""
        self._routed_since_prune = 0

    def apply(self, worker_id: WorkerId, events: Iterable[KVEvent]) -> None:
        """Take one batch of a worker's events, in the order the worker emitted them."""
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
        holders_map = self._holders
        for block_hash in block_hashes:
            holders = holders_map.get(block_hash)
            if holders is None:
                holders_map[block_hash] = {worker_id}
            else:
                holders.add(worker_id)
        blocks.update(block_hashes)
        self._drop_pending(worker_id, block_hashes)  # confirmed: the event now speaks for them

    def _remove(self, worker_id: WorkerId, block_hashes: Sequence[int]) -> None:
        blocks = self._blocks_of.get(worker_id)
        if blocks is not None:
            blocks.difference_update(block_hashes)
        self._drop_pending(worker_id, block_hashes)
        holders_map = self._holders
        for block_hash in block_hashes:
            holders = holders_map.get(block_hash)
            if holders is not None:
                holders.discard(worker_id)
                if not holders:
                    del holders_map[block_hash]

    def remove_worker(self, worker_id: WorkerId) -> None:
        self._remove(worker_id, list(self._blocks_of.pop(worker_id, ())))
        self._pending.pop(worker_id, None)

    def _drop_pending(self, worker_id: WorkerId, block_hashes: Sequence[int]) -> None:
        pending = self._pending.get(worker_id)
        if pending:
            for block_hash in [h for h in block_hashes if h in pending]:
                del pending[block_hash]

    def num_blocks(self, worker_id: WorkerId) -> int:
        """Cached blocks the index believes `worker_id` holds."""
        return len(self._blocks_of.get(worker_id, ()))

    def copies_per_block(self) -> float:
        """Workers holding each cached block, on average (1.0: no prefix is cached twice)."""
        copies = sum(len(workers) for workers in self._holders.values())
        return copies / len(self._holders) if self._holders else 0.0

    def overlap(self, block_hashes: Sequence[int], now: float = 0.0) -> dict[WorkerId, int]:
        # A worker's count is its own leading run (what `leading_overlap` computes), so each
        # worker is walked on its own maps and stops at its first miss.
        counts: dict[WorkerId, int] = {}
        no_pending: dict[int, float] = {}
        for worker_id in self._blocks_of.keys() | self._pending.keys():
            held = self._blocks_of.get(worker_id, ())
            pending = self._pending.get(worker_id) or no_pending
            depth = 0
            for block_hash in block_hashes:
                if block_hash not in held and pending.get(block_hash, now) <= now:
                    break
                depth += 1
            if depth:
                counts[worker_id] = depth
        return counts

    def record_routed(self, worker_id: WorkerId, block_hashes: Sequence[int], now: float) -> None:
        """The blocks count as `worker_id`'s until its events confirm them (or the TTL passes)."""
        until = now + self.pending_ttl_s
        held = self._blocks_of.get(worker_id, ())
        pending = self._pending.get(worker_id)
        if pending is None:
            pending = self._pending[worker_id] = {}
        for block_hash in block_hashes:
            if block_hash not in held:
                pending[block_hash] = until
        self._routed_since_prune += 1
        if self._routed_since_prune >= 1024:  # bound the memory of never-confirmed entries
            self._routed_since_prune = 0
            for pending in self._pending.values():
                for block_hash in [h for h, t in pending.items() if t <= now]:
                    del pending[block_hash]


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
