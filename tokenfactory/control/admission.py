"""Who gets in: a pure rule over the tiers' traffic, run unchanged by the gateway and the twin.

`shed_decision` says whether a new request of a tier is shed, and why: by power when the governor
stopped admitting the tier, by load when a sheddable tier would queue behind too many sequences.
A tier is never shed while a lower-priority tier has requests in flight, so a `priority` request is
never refused while a `flex` one runs. The gateway turns a `Shed` into a 503 with Retry-After.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from tokenfactory.control.tiers import FactoryConfig


@dataclass(slots=True)
class TierCounts:
    queued: int = 0
    """Sequences sent to an engine that have no token yet."""
    running: int = 0
    """Sequences streaming tokens."""
    queued_prompt_tokens: int = 0
    generated_tokens: int = 0
    """Completion tokens streamed since start."""

    @property
    def in_flight(self) -> int:
        return self.queued + self.running


@dataclass(frozen=True, slots=True)
class AdmissionConfig:
    max_queued: int = 64
    """A sheddable tier's request is shed when this many sequences of its priority or higher
    already wait for their first token."""
    power_retry_after_s: float = 5.0
    """Retry-After of a request shed by the power budget (the governor decides every second or so;
    a grid cut lasts longer)."""

    def __post_init__(self) -> None:
        if self.max_queued < 1 or self.power_retry_after_s <= 0:
            raise ValueError("max_queued must be >= 1 and power_retry_after_s > 0")


@dataclass(frozen=True, slots=True)
class Shed:
    reason: str
    """`power` or `load`."""
    retry_after_s: float
    message: str


def shed_decision(tier: str, tiers: FactoryConfig, counts: Mapping[str, TierCounts], power_shed: frozenset[str],
                  config: AdmissionConfig, start_rate: float = 0.0) -> Shed | None:
    """Whether a new request of `tier` is shed now, and why. `power_shed`: the tiers the governor
    stopped admitting; `start_rate`: sequences started per second lately (for Retry-After)."""
    priority = tiers.tiers[tier].priority
    if any(counts[name].in_flight for name, spec in tiers.tiers.items() if spec.priority < priority):
        return None  # the lower tiers give way first
    if tier in power_shed:
        return Shed("power", config.power_retry_after_s,
                    f"The factory is under a power cut and not admitting service_tier `{tier}` now; "
                    f"retry later or use a higher tier.")
    ahead = sum(counts[name].queued for name, spec in tiers.tiers.items() if spec.priority >= priority)
    if tiers.tiers[tier].sheddable and ahead >= config.max_queued:
        wait = ahead / start_rate if start_rate > 0 else 1.0
        return Shed("load", min(60.0, max(1.0, wait)),
                    f"The server is overloaded: {ahead} requests are queued ahead of service_tier `{tier}`; "
                    f"retry later.")
    return None
