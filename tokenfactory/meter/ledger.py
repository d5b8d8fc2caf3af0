"""The usage ledger: one row per request, written durably and exactly once.

Every request that ran (completed, aborted, failed or shed) becomes a `LedgerEntry`: who (tenant,
key), what (tier, model, prompt / cached / completion tokens), how well (TTFT, duration), the cost
from its tier's prices, and its energy in joules: each engine step's energy (measured with NVML on
a GPU, modeled elsewhere) split over the step's requests by their share of its tokens. Energy is
NULL where no engine reported it (a request aborted before its engine answered, pooled workers).

A writer thread owns the writes so the gateway's event loop never blocks on disk: `submit` queues
an entry and returns a future that resolves once its batch is committed. The gateway awaits that
future before it sends a response's final chunk, so a client that saw its last chunk is already
in the ledger (see `meter/db.py` for why `synchronous=FULL`). The request id is the primary key and
inserts do nothing on conflict, so a retry never counts a request twice.

The ledger lives in the factory database (`meter/db.py`): a SQLite file or a PostgreSQL URL.
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
from concurrent.futures import Future
from contextlib import closing
from dataclasses import astuple, dataclass, fields
from pathlib import Path

from tokenfactory.control.tiers import RateLimiter
from tokenfactory.meter.db import connect

OUTCOMES = ("completed", "aborted", "failed", "shed")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    request_id: str
    created_at: float  # unix seconds when the request arrived
    tenant: str
    key_id: str
    tier: str
    model: str
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float
    ttft_s: float | None  # None: no token was produced
    duration_s: float
    outcome: str
    energy_j: float | None = None  # None: no engine reported energy for it

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {OUTCOMES}, got {self.outcome!r}")


_COLUMNS = tuple(f.name for f in fields(LedgerEntry))
_INSERT = (f"INSERT INTO usage ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' for _ in _COLUMNS)}) "
           "ON CONFLICT (request_id) DO NOTHING")
GROUPINGS = {"tenant": "tenant", "tier": "tier", "model": "model", "key": "key_id", "outcome": "outcome"}

MAX_BATCH = 512


@dataclass(frozen=True, slots=True)
class UsageTotals:
    group: str
    requests: int
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cost_usd: float


class Ledger:
    """The ledger in the factory database, with a writer thread that commits queued entries in batches."""

    def __init__(self, db: str | Path) -> None:
        self.db = db
        self._db = connect(db, "ledger")
        self._queue: queue.Queue[tuple[LedgerEntry, Future[None]] | None] = queue.Queue()
        self._writer = threading.Thread(target=self._write_loop, name="ledger-writer", daemon=True)
        self._writer.start()

    def submit(self, entry: LedgerEntry) -> Future[None]:
        """Queue an entry; the future resolves once it is committed (or raises why not)."""
        done: Future[None] = Future()
        self._queue.put((entry, done))
        return done

    async def record(self, entry: LedgerEntry) -> None:
        """Queue an entry and wait, without blocking the event loop, until it is committed."""
        await asyncio.wrap_future(self.submit(entry))

    def close(self) -> None:
        """Commit everything queued, then stop the writer."""
        self._queue.put(None)
        self._writer.join()
        self._db.close()

    def _write_loop(self) -> None:
        while True:
            item = self._queue.get()
            batch: list[tuple[LedgerEntry, Future[None]]] = []
            while item is not None:
                batch.append(item)
                if len(batch) >= MAX_BATCH:
                    break
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    break
            if batch:
                self._commit(batch)
            if item is None:
                return

    def _commit(self, batch: list[tuple[LedgerEntry, Future[None]]]) -> None:
        # A waiter that gave up (its client left while the row was being written) has cancelled its
        # future: the row is committed all the same, and nobody is told. Setting a result on a
        # cancelled future would raise here and kill the writer, and every later waiter would hang.
        waiting = [done for _, done in batch if done.set_running_or_notify_cancel()]
        try:
            with self._db.transaction():
                self._db.executemany(_INSERT, [astuple(entry) for entry, _ in batch])
        except Exception as e:  # handed to every waiter: the gateway then fails the request loudly
            for done in waiting:
                done.set_exception(e)
            return
        for done in waiting:
            done.set_result(None)


# ---------------------------------------------------------------- reading (separate connections)


def read_entries(db: str | Path, since: float = 0.0) -> list[LedgerEntry]:
    with closing(connect(db)) as conn:
        rows = conn.execute(f"SELECT {', '.join(_COLUMNS)} FROM usage WHERE created_at >= ? ORDER BY created_at",
                            (since,)).fetchall()
    return [LedgerEntry(*row) for row in rows]


def summarize(db: str | Path, by: str = "tenant", since: float = 0.0) -> list[UsageTotals]:
    """Requests, tokens and cost per tenant / tier / model / key / outcome since a unix time."""
    column = GROUPINGS[by]
    with closing(connect(db)) as conn:
        rows = conn.execute(
            f"SELECT {column}, COUNT(*), SUM(prompt_tokens), SUM(cached_tokens), SUM(completion_tokens), "
            f"SUM(cost_usd) FROM usage WHERE created_at >= ? GROUP BY {column} ORDER BY {column}", (since,),
        ).fetchall()
    # PostgreSQL sums BIGINT columns into NUMERIC (Decimal): the totals are ints on both backends.
    return [UsageTotals(group, int(n), int(prompt), int(cached), int(completion), float(cost))
            for group, n, prompt, cached, completion, cost in rows]


def restore_limits(limiter: RateLimiter, db: str | Path, now: float) -> None:
    """Count against `limiter` what the ledger recorded before this gateway started, so a restart
    neither refills a key's token quota nor resets its per-minute windows.

    A request counts where the live limiter counted it: its tokens when it ended (arrival plus
    duration), its admission when it arrived; a shed request was never admitted. Rows of tiers the
    config no longer sells are skipped.
    """
    with closing(connect(db)) as conn:
        for tier, spec in limiter.config.tiers.items():
            if spec.token_quota is None:
                continue
            period_start = math.floor(now / spec.quota_period_s) * spec.quota_period_s
            rows = conn.execute(
                "SELECT key_id, SUM(prompt_tokens + completion_tokens) FROM usage "
                "WHERE tier = ? AND created_at + duration_s >= ? GROUP BY key_id", (tier, period_start),
            ).fetchall()
            for key_id, tokens in rows:
                limiter.restore_quota(key_id, tier, int(tokens), now)
        recent = conn.execute(
            "SELECT key_id, tier, created_at, created_at + duration_s, prompt_tokens + completion_tokens FROM usage "
            "WHERE created_at + duration_s > ? AND outcome <> ? ORDER BY created_at", (now - limiter.WINDOW_S, "shed"),
        ).fetchall()
    for key_id, tier, admitted_at, ended_at, tokens in recent:
        if tier in limiter.config.tiers:
            limiter.restore_request(key_id, tier, admitted_at, ended_at, int(tokens), now)
