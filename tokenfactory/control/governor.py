"""The power governor: a power budget and grid events in, per-worker limits out.

Pure policy (state in, decision out, clock passed in, no I/O), so the live factory and the twin
call the same code. The budget is a static cap, cut by grid events ("cut 25% from 14:00 for 3 h"):
an event ramps its cut in linearly over `ramp_s` before it starts, so the factory is under the
reduced budget at the start time, and back out over `ramp_s` after it ends. An event announced
later than its ramp would begin ramps from the announcement instead (short notice, a steeper ramp).

A worker's power is modeled as idle + (max - idle) x (tokens per step / max tokens per step). The
governor leaves every worker its idle power, shares the rest of the budget among them up to their
maximum (water-filling), and turns each share into a token budget per step. Tiers are then
admitted from the highest priority down while their demand fits that capacity: the lowest tier
stops first, then the next; the highest tier is never refused while a lower tier still has load.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace


@dataclass(frozen=True, slots=True)
class GridEvent:
    """A demand-response request: cut `cut_fraction` of the budget from `start_s` for `duration_s`."""

    start_s: float
    duration_s: float
    cut_fraction: float
    ramp_s: float = 900.0
    announced_s: float = -math.inf
    name: str = ""

    def __post_init__(self) -> None:
        if not 0.0 <= self.cut_fraction <= 1.0:
            raise ValueError(f"cut_fraction must be in [0, 1], got {self.cut_fraction}")
        if self.duration_s <= 0 or self.ramp_s < 0:
            raise ValueError("a grid event needs duration_s > 0 and ramp_s >= 0")

    def cut_at(self, now: float) -> float:
        """The fraction of the budget this event removes at `now`."""
        end = self.start_s + self.duration_s
        ramp_in_from = max(self.start_s - self.ramp_s, self.announced_s)
        if now < ramp_in_from or now >= end + self.ramp_s:
            return 0.0
        if now < self.start_s:
            return self.cut_fraction * (now - ramp_in_from) / (self.start_s - ramp_in_from)
        if now < end:
            return self.cut_fraction
        return self.cut_fraction * (1.0 - (now - end) / self.ramp_s)


@dataclass(frozen=True, slots=True)
class GovernorConfig:
    static_cap_w: float
    """The factory's power cap, watts (the site's contract or its breakers)."""
    gpu_power_caps: bool = False
    """Also decide a power cap per GPU (for NVML to apply); off by default."""
    min_gpu_cap_w: float = 100.0
    """The lowest GPU cap to ask for (drivers refuse lower limits)."""


@dataclass(frozen=True, slots=True)
class WorkerPower:
    """What the governor knows of one worker's power model."""

    worker_id: int
    idle_w: float
    max_w: float
    max_tokens_per_step: int


@dataclass(frozen=True, slots=True)
class TierLoad:
    """A tier's load: its priority and the tokens per step its running and queued work asks for."""

    tier: str
    priority: int
    demand_tokens_per_step: float


@dataclass(frozen=True, slots=True)
class GovernorState:
    events: tuple[GridEvent, ...] = ()


def add_event(state: GovernorState, event: GridEvent, now: float) -> GovernorState:
    """An admin call adds a grid event; it is stamped as announced now (which bounds its ramp)."""
    stamped = replace(event, announced_s=max(event.announced_s, now))
    return GovernorState(events=(*state.events, stamped))


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    worker_id: int
    power_w: float
    """The worker's share of the budget."""
    token_budget: int
    """Tokens per step the worker may schedule."""
    gpu_cap_w: float | None = None


@dataclass(frozen=True, slots=True)
class GovernorDecision:
    budget_w: float
    workers: tuple[WorkerLimits, ...]
    admitted_tiers: frozenset[str]
    shed_tiers: tuple[str, ...] = field(default=())
    """Tiers not admitted now, lowest priority first."""


def budget_at(config: GovernorConfig, state: GovernorState, now: float) -> float:
    """The static cap less every active event's cut (cuts add up, never below zero)."""
    cut = sum(event.cut_at(now) for event in state.events)
    return config.static_cap_w * max(0.0, 1.0 - cut)


def share_power(budget_w: float, workers: list[WorkerPower]) -> dict[int, float]:
    """Each worker's power: its idle draw, plus an equal share of what is left, capped at its
    maximum, the excess going to the others (water-filling). Below the idle sum, idle power only."""
    shares = {w.worker_id: w.idle_w for w in workers}
    left = budget_w - sum(shares.values())
    open_workers = sorted(workers, key=lambda w: w.max_w - w.idle_w)
    while left > 1e-9 and open_workers:
        equal = left / len(open_workers)
        w = open_workers[0]
        give = min(equal, w.max_w - shares[w.worker_id])
        shares[w.worker_id] += give
        left -= give
        open_workers.pop(0)
    return shares


def token_budget(worker: WorkerPower, power_w: float) -> int:
    """The tokens per step that keep the worker's modeled power at `power_w` or below."""
    dynamic = worker.max_w - worker.idle_w
    fraction = 1.0 if dynamic <= 0 else min(1.0, max(0.0, (power_w - worker.idle_w) / dynamic))
    return math.floor(worker.max_tokens_per_step * fraction)


def admit_tiers(loads: list[TierLoad], capacity_tokens: float) -> tuple[frozenset[str], tuple[str, ...]]:
    """Admit tiers from the highest priority down while their demand fits `capacity_tokens`. The
    top tier stays admitted while any lower tier still has load (the lower ones go first)."""
    by_priority = sorted(loads, key=lambda t: t.priority, reverse=True)
    admitted: list[str] = []
    used = 0.0
    for i, tier in enumerate(by_priority):
        lower_has_load = any(t.demand_tokens_per_step > 0 for t in by_priority[i + 1:])
        fits = used + tier.demand_tokens_per_step <= capacity_tokens
        if fits or (i == 0 and lower_has_load):
            admitted.append(tier.tier)
            used += tier.demand_tokens_per_step
        else:
            break  # a lower tier never runs while a higher one is refused
    shed = tuple(t.tier for t in reversed(by_priority) if t.tier not in admitted)
    return frozenset(admitted), shed


def decide(config: GovernorConfig, state: GovernorState, workers: list[WorkerPower], loads: list[TierLoad],
           now: float) -> GovernorDecision:
    """Per-worker power shares, token budgets and GPU caps, and the tiers to admit, at `now`."""
    budget = budget_at(config, state, now)
    shares = share_power(budget, workers)
    limits = []
    for w in workers:
        cap = max(config.min_gpu_cap_w, shares[w.worker_id]) if config.gpu_power_caps else None
        limits.append(WorkerLimits(w.worker_id, shares[w.worker_id], token_budget(w, shares[w.worker_id]), cap))
    admitted, shed = admit_tiers(loads, sum(limit.token_budget for limit in limits))
    return GovernorDecision(budget, tuple(limits), admitted, shed)
