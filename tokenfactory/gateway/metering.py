"""Tokens as a product at the gateway: pick the tier, enforce its limits, write the ledger.

`Metering.open` turns (caller, requested `service_tier`) into a `RequestAccount` or an OpenAI
error (400 unknown tier, 403 tier not allowed for this key, 429 with Retry-After over a limit,
503 with Retry-After when admission sheds it by load or power: recorded as `shed`).
The account times the request and, at its end, prices its usage and writes exactly one ledger
entry: `complete` awaits the commit (the caller then sends its final chunk), `abandon` queues an
aborted or failed entry without waiting (it runs while the request is being torn down).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenfactory.control.tiers import (
    FactoryConfig,
    RateLimiter,
    TierRefusal,
    TierSpec,
    TokenUsage,
    pick_tier,
    price_usage,
    retry_after_header,
)
from tokenfactory.gateway.auth import Caller
from tokenfactory.gateway.admission import Admission, Flight, shed_error
from tokenfactory.gateway.errors import APIError, bad_request, forbidden, rate_limited
from tokenfactory.gateway.protocol import random_id
from tokenfactory.meter.energy import EnergyBook
from tokenfactory.meter.ledger import Ledger, LedgerEntry, restore_limits
from tokenfactory.meter.metrics import FactoryMetrics


class Metering:
    """The factory's tiers, each key's rate-limit windows, and the ledger (None: not recorded).

    `energy` holds the joules the engine attributed to ended requests (None: energy unknown, the
    ledger's column stays NULL); `metrics` counts every request its ledger entry records."""

    def __init__(self, tiers: FactoryConfig, ledger: Ledger | None = None,
                 clock: Callable[[], float] = time.time, energy: EnergyBook | None = None,
                 metrics: FactoryMetrics | None = None) -> None:
        self.tiers = tiers
        self.ledger = ledger
        self.energy = energy
        self.metrics = metrics
        self.limiter = RateLimiter(tiers)
        self.clock = clock
        self.admission: Admission | None = None
        """Sheds requests by load and power (503); None: every request is admitted."""

    def attach_ledger(self, ledger: Ledger) -> None:
        """Record to `ledger`, first counting what it already holds against the keys' limits, so
        a restarted gateway neither refills a quota nor resets a per-minute window."""
        restore_limits(self.limiter, ledger.db, self.clock())
        self.ledger = ledger

    def open(self, caller: Caller, requested_tier: str | None, model: str) -> RequestAccount:
        tier = pick_tier(self.tiers, caller.policy, requested_tier)
        if isinstance(tier, TierRefusal):
            if tier.status == 403:
                raise forbidden(tier.message, param="service_tier", code=tier.code)
            raise bad_request(tier.message, param="service_tier", code=tier.code)
        now = self.clock()
        shed = self.admission.check(tier) if self.admission is not None else None
        if shed is not None:  # recorded as shed, without counting against the key's limits
            account = RequestAccount(self, caller, tier, self.tiers.tiers[tier], model, now, time.monotonic())
            account.abandon(random_id("shed"), TokenUsage(0, 0, 0), "shed")
            raise shed_error(shed)
        limit = self.limiter.admit(caller.key_id, tier, now)
        if limit is not None:
            raise rate_limited(limit.message, limit.limit, retry_after_header(limit))
        return RequestAccount(self, caller, tier, self.tiers.tiers[tier], model, now, time.monotonic())


@dataclass(slots=True)
class RequestAccount:
    """One request's tier, timing and, once it ends, its single ledger entry."""

    metering: Metering
    caller: Caller
    tier: str
    spec: TierSpec
    model: str
    arrived_s: float  # wall clock, for the ledger
    started: float  # monotonic, for durations
    first_token: float | None = None
    closed: bool = field(default=False)
    flight: Flight | None = None
    """Its place in the tiers' traffic while an engine works on it (for admission)."""
    entry: LedgerEntry | None = None
    """The ledger entry, once the request ended (the response reports its cost and energy)."""

    @property
    def priority(self) -> int:
        return self.spec.priority

    def submitted(self, num_seqs: int, prompt_tokens: int) -> None:
        """Its sequences went to the engine: they count in the tier's queue until a token comes."""
        admission = self.metering.admission
        if admission is not None and self.flight is None and not self.closed:
            self.flight = admission.traffic.submitted(self.tier, num_seqs, prompt_tokens)

    def saw_tokens(self, num_tokens: int = 0) -> None:
        if self.first_token is None:
            self.first_token = time.monotonic()
        admission = self.metering.admission
        if admission is not None:
            if self.flight is not None:
                admission.traffic.first_token(self.flight)
            admission.traffic.generated(self.tier, num_tokens)

    async def complete(self, request_id: str, usage: TokenUsage) -> None:
        """Record a completed request and wait for the commit: call before the final chunk goes out."""
        entry = self._close(request_id, usage, "completed")
        if entry is not None and self.metering.ledger is not None:
            try:
                await self.metering.ledger.record(entry)
            except Exception as e:  # the client must not get a response the ledger does not hold
                raise APIError(500, f"Could not record usage: {e}", type="server_error") from None

    def abandon(self, request_id: str, usage: TokenUsage, outcome: str) -> None:
        """Record an aborted or failed request (no-op if it was already recorded)."""
        entry = self._close(request_id, usage, outcome)
        if entry is not None and self.metering.ledger is not None:
            self.metering.ledger.submit(entry)

    def _close(self, request_id: str, usage: TokenUsage, outcome: str) -> LedgerEntry | None:
        if self.closed:
            return None
        self.closed = True
        now = time.monotonic()
        self.metering.limiter.record(self.caller.key_id, self.tier, usage.total_tokens, self.metering.clock())
        energy = self.metering.energy
        entry = LedgerEntry(
            request_id=request_id, created_at=self.arrived_s, tenant=self.caller.tenant,
            key_id=self.caller.key_id, tier=self.tier, model=self.model,
            prompt_tokens=usage.prompt_tokens, cached_tokens=usage.cached_tokens,
            completion_tokens=usage.completion_tokens, cost_usd=price_usage(self.spec, self.model, usage),
            ttft_s=None if self.first_token is None else self.first_token - self.started,
            duration_s=now - self.started, outcome=outcome,
            energy_j=energy.take(request_id) if energy is not None else None,
        )
        if self.metering.metrics is not None:
            self.metering.metrics.observe(entry)
        if self.metering.admission is not None:
            self.metering.admission.traffic.ended(self.flight, entry)
        self.entry = entry
        return entry
