"""A restarted gateway keeps every key's quota and per-minute windows: it reads them back from the ledger."""

from __future__ import annotations

import asyncio

from tokenfactory.control.tiers import KeyPolicy, TokenUsage, parse_factory_config
from tokenfactory.gateway.auth import Caller
from tokenfactory.gateway.errors import APIError
from tokenfactory.gateway.metering import Metering
from tokenfactory.meter.ledger import Ledger, LedgerEntry

TIERS = parse_factory_config("""
default_tier: free
tiers:
  free: {token_quota: 100, quota_period_s: 3600}
  paced: {requests_per_minute: 2}
  metered: {tokens_per_minute: 1000}
""")
CALLER = Caller("acme", "key-1", KeyPolicy("free", frozenset(TIERS.tiers)))
HOUR_START = 3600.0 * 1000  # a quota period starts here


class Gateway:
    """The metering part of one gateway's life on a database, with a clock the test moves."""

    def __init__(self, db: str, now: float) -> None:
        self.now = now
        self.metering = Metering(TIERS, clock=lambda: self.now)
        self.metering.attach_ledger(Ledger(db))

    def serve(self, tier: str, request_id: str, tokens: int) -> None:
        account = self.metering.open(CALLER, tier, "tiny")
        asyncio.run(account.complete(request_id, TokenUsage(tokens // 2, 0, tokens - tokens // 2)))

    def refused(self, tier: str) -> str | None:
        """The limit a new request of `tier` is refused for, None if admitted."""
        try:
            self.metering.open(CALLER, tier, "tiny")
        except APIError as e:
            assert e.status_code == 429 and int(e.headers["Retry-After"]) >= 1
            return e.code
        return None

    def stop(self) -> None:
        self.metering.ledger.close()


def test_a_restart_keeps_the_token_quota_of_the_period(db):
    first = Gateway(db, HOUR_START + 10)
    first.serve("free", "r1", 60)
    first.serve("free", "r2", 50)  # 110 >= 100: the quota is spent for this hour
    assert first.refused("free") == "token_quota"
    first.stop()

    again = Gateway(db, HOUR_START + 20)
    assert again.refused("free") == "token_quota"
    again.stop()
    next_hour = Gateway(db, HOUR_START + 3600 + 5)  # a new period: the old usage no longer counts
    assert next_hour.refused("free") is None
    next_hour.stop()


def test_a_restart_counts_only_this_periods_tokens_and_known_tiers(db):
    ledger = Ledger(db)
    for request_id, tier, created_at in [("last-hour", "free", HOUR_START - 100), ("gone-tier", "gold", HOUR_START + 1),
                                         ("this-hour", "free", HOUR_START + 1)]:
        ledger.submit(LedgerEntry(request_id, created_at, "acme", CALLER.key_id, tier, "tiny", 40, 0, 40, 0.0,
                                  0.1, 1.0, "completed"))
    ledger.close()
    gateway = Gateway(db, HOUR_START + 30)
    assert gateway.refused("free") is None  # 80 of 100 this hour: last hour's 80 and tier gold are not counted
    gateway.serve("free", "r3", 20)
    assert gateway.refused("free") == "token_quota"
    gateway.stop()


def test_a_restart_keeps_the_requests_of_the_last_minute(db):
    first = Gateway(db, HOUR_START)
    first.serve("paced", "p1", 10)
    first.serve("paced", "p2", 10)
    first.stop()
    again = Gateway(db, HOUR_START + 30)
    assert again.refused("paced") == "requests_per_minute"
    again.stop()
    later = Gateway(db, HOUR_START + 61)
    assert later.refused("paced") is None
    later.stop()


def test_shed_requests_were_never_admitted_and_stay_uncounted_after_a_restart(db):
    first = Gateway(db, HOUR_START)
    first.serve("paced", "p1", 10)
    first.metering.ledger.submit(LedgerEntry("shed-1", HOUR_START, "acme", CALLER.key_id, "paced", "tiny", 0, 0, 0,
                                             0.0, None, 0.0, "shed")).result(timeout=10)
    first.stop()
    again = Gateway(db, HOUR_START + 10)
    assert again.refused("paced") is None  # p1 and this one: 2 of 2
    assert again.refused("paced") == "requests_per_minute"
    again.stop()


def test_a_restart_keeps_the_tokens_of_the_last_minute(db):
    first = Gateway(db, HOUR_START)
    first.serve("metered", "t1", 1200)
    assert first.refused("metered") == "tokens_per_minute"
    first.stop()
    again = Gateway(db, HOUR_START + 30)
    assert again.refused("metered") == "tokens_per_minute"
    again.stop()
    later = Gateway(db, HOUR_START + 61)
    assert later.refused("metered") is None
    later.stop()
