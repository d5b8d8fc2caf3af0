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
The token budgets keep no floor for the highest tier: admission from the top already reserves
the capacity for it, each engine's scheduler spends a short budget on the highest tier first,
and a step's power rises with its size, so a floor above the power share would break the budget.

Token budgets alone miss on an accelerator: a step of few tokens still reads all the weights, so
it takes nearly as long as a full one, and a long prompt needs many such slow steps. Pacing
(`GovernorConfig.pacing`, the default; live the config's `power.pacing`) keeps the steps whole
and spends the share in time instead, through a bucket of energy credit (`PaceBucket`, the same
code in the twin and in the engine process):

- credit grows at `pace_w` less what the worker draws (while it rests or idles, `pace_w - rest_w`
  per second; a step takes `(step_w - pace_w) x step_s`), and never above `capacity_j`;
- a step starts only while the credit covers the most one step can take (`step_j`), so the
  credit never falls below zero; a step without prompt work of the protected tier (the top
  priority) waits for a full bucket, so the rest of the bucket is kept for that tier's prompts,
  whose chunks then run back to back instead of resting after each.

Why every window holds: over any window [a, a + W] the energy drawn is pace_w x W less the
credit's net gain and less any credit lost at the cap, so at most
pace_w x W + credit(a) - credit(a + W) <= pace_w x W + capacity_j (credit(a) <= capacity_j and
credit(a + W) >= 0). `pace_power` picks `capacity_j = (share - pace_w) x window_s`, so every
window of `window_s` (the governor's sampling window) averages at most the share, not just the
long run. It sets `pace_w` so that the bucket holds one step's reach (`WorkerPower.pace_step_s`)
plus `GovernorConfig.pace_burst_s` of steps at full power for the protected tier: a worker that
had room (idle, or lower tiers shed) runs a `priority` prompt flat out. The lower tiers pay for
that burst in throughput: they run at `pace_w`, under the share by the bucket's size per window.

Tier shedding stays as above, over the capacity pacing leaves. Pacing takes the token budget's
place in the levers' order (first, with tier shedding; it needs no permission), and NVML power
caps (`gpu_power_caps`, off by default: they need the permission to set them) come last and
replace both: the GPU lowers its clock to fit, so the steps keep their size and no rest is needed.

The factory config's `power` section (`PowerSpec`) holds the static cap and the scheduled grid
events (daily at a UTC time, or once at a date and time); `scheduled_state` turns them, with the
events an admin added at runtime, into the state `decide` reads. `gateway/admission.py` runs
`decide` live; the twin can call it with simulated time.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from datetime import time as time_of_day

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


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

    @property
    def end_s(self) -> float:
        return self.start_s + self.duration_s

    def over(self, now: float) -> bool:
        """Whether the event has ramped out and can no longer cut anything."""
        return now >= self.end_s + self.ramp_s

    def cut_at(self, now: float) -> float:
        """The fraction of the budget this event removes at `now`."""
        end = self.end_s
        ramp_in_from = max(self.start_s - self.ramp_s, self.announced_s)
        if now < ramp_in_from or self.over(now):
            return 0.0
        if now < self.start_s:
            return self.cut_fraction * (now - ramp_in_from) / (self.start_s - ramp_in_from)
        if now < end:
            return self.cut_fraction
        return self.cut_fraction * (1.0 - (now - end) / self.ramp_s)


PACE_BURST_S = 0.3
"""A paced worker's credit for the protected tier, in seconds of full-power steps: enough for a
4,000-token prompt of a 70B model on 4 H100s (`bench power`) against `priority`'s 0.5 s TTFT."""


@dataclass(frozen=True, slots=True)
class GovernorConfig:
    static_cap_w: float
    """The factory's power cap, watts (the site's contract or its breakers)."""
    gpu_power_caps: bool = False
    """Also decide a power cap per GPU (for NVML to apply); off by default."""
    min_gpu_cap_w: float = 100.0
    """The lowest GPU cap to ask for (drivers refuse lower limits)."""
    pacing: bool = True
    """Pace whole steps with rests instead of shrinking them (see the module doc); False: token budgets."""
    window_s: float = 1.0
    """Power is sampled over windows this long; a paced worker keeps every one under its share."""
    pace_burst_s: float = PACE_BURST_S
    """Credit a paced worker keeps for the protected tier's prompts, in seconds of full-power steps."""
    min_pace_fraction: float = 0.05
    """The least share of its dynamic power a paced worker keeps (near zero would starve everyone)."""


@dataclass(frozen=True, slots=True)
class WorkerPower:
    """What the governor knows of one worker's power model."""

    worker_id: int
    idle_w: float
    max_w: float
    max_tokens_per_step: int
    rest_w: float | None = None
    """Draw while no step runs (a paced worker's rest); None: `idle_w`."""
    pace_tokens: int | None = None
    """Tokens per step while paced (None: `max_tokens_per_step`)."""
    pace_step_s: float = 0.0
    """The most one paced step can add to a window: its seconds x (power - rest) / (max - rest),
    for the longest-reaching step of `pace_tokens` (a full-power second counts 1)."""

    @property
    def resting_w(self) -> float:
        return self.idle_w if self.rest_w is None else self.rest_w


@dataclass(frozen=True, slots=True)
class TierLoad:
    """A tier's load: its priority and the tokens per step its running and queued work asks for."""

    tier: str
    priority: int
    demand_tokens_per_step: float


def tier_demand(running: int, queued_prompt_tokens: int, ttft_s: float, step_s: float | None,
                arriving_tokens_per_step: float = 0.0) -> float:
    """A tier's demand in tokens per step, comparable to a token budget: a token per running
    sequence, plus its prompts: those arriving (`arriving_tokens_per_step`), or its queued ones
    spread over the steps of `step_s` that fit in its TTFT target if more. A backlog is not all due
    in the next step; with no step time known yet (`None`) it is."""
    steps_in_ttft = 1.0 if step_s is None or step_s <= 0 else max(1.0, ttft_s / step_s)
    return running + max(arriving_tokens_per_step, queued_prompt_tokens / steps_in_ttft)


@dataclass(frozen=True, slots=True)
class GovernorState:
    events: tuple[GridEvent, ...] = ()


def add_event(state: GovernorState, event: GridEvent, now: float) -> GovernorState:
    """An admin call adds a grid event; it is stamped as announced now (which bounds its ramp)."""
    stamped = replace(event, announced_s=max(event.announced_s, now))
    return GovernorState(events=(*state.events, stamped))


@dataclass(frozen=True, slots=True)
class Pace:
    """A paced worker's bucket of energy credit (see the module doc and `PaceBucket`)."""

    pace_w: float
    """Credit is earned at this rate, less what the worker draws: its mean power in the long run."""
    rest_w: float
    """The worker's draw while no step runs."""
    capacity_j: float
    """The most credit the bucket holds: what a window may hold above `pace_w`."""
    step_j: float
    """The most one step can take from the bucket: a step starts only while the credit covers it."""
    protect_priority: int | None = None
    """Steps with prompt work of this priority or above may start before the bucket is full."""


@dataclass(frozen=True, slots=True)
class WorkerLimits:
    worker_id: int
    power_w: float
    """The worker's share of the budget."""
    token_budget: int
    """Tokens per step the worker may schedule."""
    gpu_cap_w: float | None = None
    pace: Pace | None = None
    """Paced: the worker's bucket (None: unpaced)."""

    @property
    def pace_w(self) -> float | None:
        return self.pace.pace_w if self.pace is not None else None


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


def pace_power(worker: WorkerPower, power_w: float, config: GovernorConfig,
               protect_priority: int | None = None) -> Pace | None:
    """The bucket that keeps every window of `config.window_s` at `power_w` or below (see the module
    doc); None when the worker may run flat out. A step of `pace_step_s` full-power seconds takes at
    most (max - pace) x `pace_step_s` from it (a step under full power takes less per second of its
    reach), and the bucket holds that plus `pace_burst_s` of the same for the protected tier, so
    (share - pace) x W = (max - pace) x (t + burst)."""
    if power_w >= worker.max_w:
        return None
    rest = worker.resting_w
    reach = (worker.pace_step_s + config.pace_burst_s) / config.window_s
    pace = (power_w - worker.max_w * reach) / (1.0 - reach) if reach < 1.0 else -math.inf
    # Under a deep cut the floor wins and the burst shrinks (below it, one step may overdraw).
    pace = max(pace, rest + config.min_pace_fraction * (worker.max_w - rest))
    capacity = max(0.0, (power_w - pace) * config.window_s)
    step = min(capacity, (worker.max_w - pace) * worker.pace_step_s)
    return Pace(pace, rest, capacity, step, protect_priority)


MIN_WAIT_S = 1e-6
"""The shortest rest `PaceBucket` asks for."""


class PaceBucket:
    """One paced worker's energy credit (see the module doc), on the caller's clock: the twin's
    simulated seconds or the engine process's monotonic ones."""

    def __init__(self) -> None:
        self.pace: Pace | None = None
        self.credit_j = 0.0
        self.at = 0.0
        """The credit is counted up to this time (the end of the last step, or later)."""

    def set(self, pace: Pace | None, now: float) -> None:
        """A new pace (None: unpaced). Credit carries over, within the new capacity; a worker that
        was unpaced starts with none."""
        if pace is not None and self.pace is not None:
            self._earn(now)
            self.credit_j = min(self.credit_j, pace.capacity_j)
        else:
            self.credit_j, self.at = 0.0, now
        self.pace = pace

    def protects(self, has_prompt_work: Callable[[int], bool]) -> bool:
        """Whether the next step would carry protected prompt work, asked of the worker's scheduler
        (`Scheduler.has_prompt_work`)."""
        pace = self.pace
        return pace is not None and pace.protect_priority is not None and has_prompt_work(pace.protect_priority)

    def wait_s(self, now: float, protected: bool) -> float:
        """Seconds from `now` until a step may start (0: at once); `protected`: the step carries
        prompt work of the protected tier, so one step's reach of credit is enough."""
        pace = self.pace
        if pace is None:
            return 0.0
        self._earn(now)
        need = (pace.step_j if protected else pace.capacity_j) - self.credit_j
        if need <= 1e-9:
            return max(0.0, self.at - now)
        # At least a microsecond: a wait under the clock's resolution would wake to the same credit.
        return max(0.0, self.at - now) + max(need / max(pace.pace_w - pace.rest_w, 1e-9), MIN_WAIT_S)

    def spend(self, start: float, step_s: float, step_w: float) -> None:
        """A step from `start`, `step_s` long at `step_w` watts on average."""
        pace = self.pace
        if pace is None:
            return
        self._earn(start)
        self.credit_j = min(pace.capacity_j, self.credit_j - (step_w - pace.pace_w) * step_s)
        self.at = max(self.at, start + step_s)

    def _earn(self, now: float) -> None:
        pace = self.pace
        if pace is not None and now > self.at:
            self.credit_j = min(pace.capacity_j, self.credit_j + (pace.pace_w - pace.rest_w) * (now - self.at))
            self.at = now


def admit_tiers(loads: list[TierLoad], capacity_tokens: float) -> tuple[frozenset[str], tuple[str, ...]]:
    """Admit tiers from the highest priority down while their demand fits `capacity_tokens` (an
    idle tier while room is left). The top tier stays admitted while any lower tier still has load
    (the lower ones go first)."""
    by_priority = sorted(loads, key=lambda t: t.priority, reverse=True)
    admitted: list[str] = []
    used = 0.0
    for i, tier in enumerate(by_priority):
        lower_has_load = any(t.demand_tokens_per_step > 0 for t in by_priority[i + 1:])
        demand = tier.demand_tokens_per_step
        # A tier with no load yet needs room for the load it is about to get.
        fits = used + demand <= capacity_tokens if demand > 0 else used < capacity_tokens
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
    protect = max((t.priority for t in loads), default=None)
    limits = []
    capacity = 0.0
    for w in workers:
        share = shares[w.worker_id]
        cap = max(config.min_gpu_cap_w, share) if config.gpu_power_caps else None
        pace = pace_power(w, share, config, protect) if config.pacing and cap is None else None
        if pace is None:
            limits.append(WorkerLimits(w.worker_id, share, token_budget(w, share), cap))
            capacity += limits[-1].token_budget
            continue
        # Whole steps for a share of the time: as many tokens as a step at the pace's power would get.
        limits.append(WorkerLimits(w.worker_id, share, w.pace_tokens or w.max_tokens_per_step, None, pace))
        capacity += w.max_tokens_per_step * (pace.pace_w - w.resting_w) / (w.max_w - w.resting_w)
    if budget >= sum(w.max_w for w in workers):
        # Power does not bind: the fleet at full tilt fits the budget, so no tier is refused for
        # power (a burst's queued prompts are the load-shedding rule's business, not this one's).
        return GovernorDecision(budget, tuple(limits), frozenset(t.tier for t in loads))
    admitted, shed = admit_tiers(loads, capacity)
    return GovernorDecision(budget, tuple(limits), admitted, shed)


# ---------------------------------------------------------------- the factory config's `power` section

DAY_S = 86400.0


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GridEventSpec(_Spec):
    """A scheduled grid event: `start` is a UTC time of day ("14:00": every day) or a date and time."""

    name: str = ""
    start: str | datetime = Field(description='"HH:MM" (UTC, every day) or an ISO 8601 date and time')
    duration_s: float = Field(gt=0, description="how long the full cut holds, seconds")
    cut_fraction: float = Field(ge=0, le=1, description="share of the static cap removed")
    ramp_s: float = Field(default=900.0, ge=0, description="ramp in before the start and out after the end")
    notice_s: float | None = Field(default=None, ge=0,
                                   description="announced this long before the start (none: known in advance)")

    @field_validator("start", mode="before")
    @classmethod
    def _quoted(cls, value: object) -> object:
        if isinstance(value, int):  # YAML 1.1 reads an unquoted 14:00 as the number 840
            raise ValueError("quote the time of day, e.g. start: '14:00'")
        return value

    @model_validator(mode="after")
    def _valid_start(self) -> GridEventSpec:
        if self.daily_at_s is None:
            _ = self.start_s  # raises for a malformed date
        elif self.duration_s + 2 * self.ramp_s >= DAY_S:
            raise ValueError("a daily event with its ramps must fit in a day")
        return self

    @property
    def daily_at_s(self) -> float | None:
        """Seconds after midnight UTC for a daily event, else None."""
        if isinstance(self.start, str) and len(self.start) <= 5 and ":" in self.start:
            try:
                at = time_of_day.fromisoformat(self.start)
            except ValueError:
                raise ValueError(f"start {self.start!r} is not a time of day HH:MM") from None
            return at.hour * 3600.0 + at.minute * 60.0
        return None

    @property
    def start_s(self) -> float:
        """Unix time of a one-off event."""
        when = self.start if isinstance(self.start, datetime) else None
        if when is None:
            try:
                when = datetime.fromisoformat(self.start)
            except ValueError:
                raise ValueError(f"start {self.start!r} is neither HH:MM nor an ISO 8601 date and time") from None
        return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()

    def events_near(self, now: float) -> list[GridEvent]:
        """The occurrences that can matter at `now` (a daily event: yesterday's, today's, tomorrow's)."""
        at = self.daily_at_s
        starts = [self.start_s] if at is None else [
            (math.floor(now / DAY_S) + day) * DAY_S + at for day in (-1, 0, 1)]
        return [GridEvent(start, self.duration_s, self.cut_fraction, self.ramp_s,
                          -math.inf if self.notice_s is None else start - self.notice_s, self.name)
                for start in starts]


class PowerSpec(_Spec):
    """The factory's power budget: a static cap and the grid events scheduled against it."""

    static_cap_w: float | None = Field(default=None, gt=0,
                                       description="watts for the whole fleet (none: the fleet's maximum)")
    grid_events: list[GridEventSpec] = Field(default_factory=list)
    interval_s: float = Field(default=1.0, gt=0, le=60, description="how often the live governor decides")
    min_tokens_per_step: int = Field(default=16, ge=1,
                                     description="the lowest token budget it sets (near zero would starve everyone)")
    pacing: bool = Field(default=True, description="keep steps whole and rest between them under a cut "
                                                   "(false: shrink the tokens per step instead)")
    pace_burst_s: float = Field(default=PACE_BURST_S, ge=0, le=0.9,
                                description="paced: credit kept for the top tier's prompts, seconds at full power")
    hardware: str | None = Field(default=None,
                                 description="power model of the workers where NVML is absent (default: by device)")


def scheduled_state(spec: PowerSpec, admin_events: tuple[GridEvent, ...], now: float) -> GovernorState:
    """The config's scheduled events near `now` plus the events the admin API added."""
    return GovernorState(events=(*(e for s in spec.grid_events for e in s.events_near(now)), *admin_events))
