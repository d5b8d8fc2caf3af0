"""The ledger: entries committed durably in batches, each request id exactly once, summaries; on SQLite and
PostgreSQL alike (the `db` fixture)."""

from __future__ import annotations

import asyncio
import sqlite3

from tokenfactory.meter.ledger import Ledger, LedgerEntry, read_entries, summarize


def entry(request_id: str, tenant: str = "acme", tier: str = "default", completion: int = 10,
          outcome: str = "completed", created_at: float = 1000.0) -> LedgerEntry:
    return LedgerEntry(request_id, created_at, tenant, "k1", tier, "tiny", prompt_tokens=20, cached_tokens=5,
                       completion_tokens=completion, cost_usd=0.001 * completion, ttft_s=0.01, duration_s=0.2,
                       outcome=outcome)


def test_record_commits_before_returning_and_is_idempotent(db):
    ledger = Ledger(db)

    async def record_all() -> None:
        await asyncio.gather(*(ledger.record(entry(f"r{i}")) for i in range(50)))
        await ledger.record(entry("r0", completion=99))  # a retry of r0: ignored

    asyncio.run(record_all())
    rows = read_entries(db)  # another connection: what a crash right now would leave
    assert sorted(r.request_id for r in rows) == sorted(f"r{i}" for i in range(50))
    assert next(r for r in rows if r.request_id == "r0").completion_tokens == 10
    assert rows[0].energy_j is None
    ledger.close()


def test_durability_settings(tmp_path):
    Ledger(tmp_path / "factory.db").close()
    conn = sqlite3.connect(tmp_path / "factory.db")
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_close_commits_what_is_queued(db):
    ledger = Ledger(db)
    futures = [ledger.submit(entry(f"q{i}", outcome="aborted")) for i in range(20)]
    ledger.close()
    assert all(f.done() and f.exception() is None for f in futures)
    assert len(read_entries(db)) == 20


def test_summaries_group_and_filter_by_time(db):
    ledger = Ledger(db)
    for i, (tenant, tier) in enumerate([("acme", "default"), ("acme", "priority"), ("globex", "flex")]):
        ledger.submit(entry(f"s{i}", tenant=tenant, tier=tier, created_at=1000.0 + i))
    ledger.close()
    by_tenant = {t.group: t for t in summarize(db, by="tenant")}
    assert by_tenant["acme"].requests == 2 and by_tenant["acme"].completion_tokens == 20
    assert by_tenant["acme"].cost_usd == 0.02 and by_tenant["globex"].cached_tokens == 5
    assert type(by_tenant["acme"].prompt_tokens) is int  # PostgreSQL sums BIGINTs into NUMERIC
    assert [t.group for t in summarize(db, by="tier", since=1001.0)] == ["flex", "priority"]


def test_a_waiter_that_gives_up_neither_loses_its_row_nor_stops_the_writer(db):
    ledger = Ledger(db)
    abandoned = [ledger.submit(entry(f"gone-{i}")) for i in range(200)]
    for future in abandoned:
        future.cancel()  # the client left while its row was being written
    ledger.submit(entry("after")).result(timeout=10)  # the writer still serves everyone else
    ledger.close()
    assert len(read_entries(db)) == 201
