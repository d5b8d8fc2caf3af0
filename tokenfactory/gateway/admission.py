"""Admission at the gateway: who gets in under load and under the power budget.

- `TierTraffic` is the gateway's own view of each tier: sequences queued (sent to an engine, no
  token yet) and running, their prompt tokens, tokens generated, and a minute of recent TTFTs and
  ended requests (for the dashboard's live figures).
- `control.admission.shed_decision` (pure, shared with the twin) says whether a request of a tier
  is shed; `shed_error` makes its 503 with Retry-After in the OpenAI error format, and the request
  gets a ledger row with outcome `shed`.
- `LiveGovernor` runs the pure `control.governor` policy in the gateway every `interval_s` over
  every engine of every model, each on its own model's device and power model (`GovernedEngine`):
  it reads each device's power (NVML where present, else the modeled power of the engine's
  hardware at the utilisation its token rate implies, labelled `modeled`), the tiers' load, the
  config's scheduled grid events and those the admin API added, and applies the levers: each
  engine's pace (`power.pacing`, the default: whole steps, started when the engine's
  `governor.PaceBucket` allows, so that its power over any `interval_s` stays within its share) or
  its token budget per step; and the tiers admitted.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Gauge
from pydantic import BaseModel, ConfigDict, Field

from tokenfactory.control.governor import (
    GovernorConfig,
    GovernorDecision,
    GovernorState,
    GridEvent,
    PowerSpec,
    TierLoad,
    WorkerLimits,
    WorkerPower,
    add_event,
    decide,
    scheduled_state,
    tier_demand,
)
from tokenfactory.control.admission import AdmissionConfig, Shed, TierCounts, shed_decision
from tokenfactory.control.tiers import FactoryConfig
from tokenfactory.gateway.auth import AdminAuth
from tokenfactory.gateway.errors import APIError, bad_request
from tokenfactory.meter.ledger import LedgerEntry
from tokenfactory.meter.power import ModeledPowerSensor, PowerSensor, default_hardware, sensor_for
from tokenfactory.runtime.client import AsyncEngineClient, Worker
from tokenfactory.runtime.pool import ModelPools, WorkerPool
from tokenfactory.runtime.wire import EngineLoad
from tokenfactory.twin.hardware import Hardware

logger = logging.getLogger(__name__)

WINDOW_S = 60.0
"""The live figures (TTFT, joules and dollars per token) cover the last minute."""
PACE_REACH_STEPS = 2.0
"""A paced engine's longest step, in its mean steps (what one step can add to a power window)."""


# ---------------------------------------------------------------- the tiers' traffic


@dataclass(slots=True)
class Flight:
    """One request between its submission to the engine and its ledger entry."""

    tier: str
    num_seqs: int
    prompt_tokens: int
    submitted: float
    started: bool = False
    done: bool = False


@dataclass(frozen=True, slots=True)
class Ended:
    at: float
    tier: str
    tokens: int
    """Prompt plus completion tokens billed."""
    computed_tokens: int
    """Uncached prompt plus completion tokens: what the energy computed."""
    energy_j: float | None
    cost_usd: float
    outcome: str


class TierTraffic:
    """Per tier: what is in flight now, and what happened in the last minute (clock injected)."""

    def __init__(self, tiers: FactoryConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.tiers = tiers
        self.clock = clock
        self.counts = {name: TierCounts() for name in tiers.tiers}
        self._ttfts: deque[tuple[float, str, float]] = deque()  # (at, tier, seconds)
        self._ended: deque[Ended] = deque()

    def submitted(self, tier: str, num_seqs: int, prompt_tokens: int) -> Flight:
        c = self.counts[tier]
        c.queued += num_seqs
        c.queued_prompt_tokens += prompt_tokens
        return Flight(tier, num_seqs, prompt_tokens, self.clock())

    def first_token(self, flight: Flight) -> None:
        if flight.started or flight.done:
            return
        flight.started = True
        c = self.counts[flight.tier]
        c.queued -= flight.num_seqs
        c.queued_prompt_tokens -= flight.prompt_tokens
        c.running += flight.num_seqs
        now = self.clock()
        self._ttfts.append((now, flight.tier, now - flight.submitted))

    def generated(self, tier: str, num_tokens: int) -> None:
        self.counts[tier].generated_tokens += num_tokens

    def ended(self, flight: Flight | None, entry: LedgerEntry) -> None:
        """A request's ledger entry was written: it leaves the flight counts (if it was in flight)."""
        if flight is not None and not flight.done:
            flight.done = True
            c = self.counts[flight.tier]
            if flight.started:
                c.running -= flight.num_seqs
            else:
                c.queued -= flight.num_seqs
                c.queued_prompt_tokens -= flight.prompt_tokens
        computed = entry.prompt_tokens - entry.cached_tokens + entry.completion_tokens
        self._ended.append(Ended(self.clock(), entry.tier, entry.prompt_tokens + entry.completion_tokens,
                                 computed, entry.energy_j, entry.cost_usd, entry.outcome))

    def loads(self, step_s: float | None = None) -> list[TierLoad]:
        """Each tier's demand on the engines in tokens per step (`control.governor.tier_demand`): a
        token per running sequence, plus the prompts waiting for their prefill spread over the steps
        of `step_s` (the engines' recent mean step time; None: unknown) that fit in its TTFT target."""
        return [TierLoad(name, spec.priority, tier_demand(c.running, c.queued_prompt_tokens, spec.slo.ttft_s, step_s))
                for name, spec in self.tiers.tiers.items() for c in [self.counts[name]]]

    def _forget_old(self) -> None:
        horizon = self.clock() - WINDOW_S
        while self._ttfts and self._ttfts[0][0] < horizon:
            self._ttfts.popleft()
        while self._ended and self._ended[0].at < horizon:
            self._ended.popleft()

    def recent(self) -> tuple[list[tuple[str, float]], list[Ended]]:
        """The last minute's TTFTs (tier, seconds) and ended requests."""
        self._forget_old()
        return [(tier, s) for _, tier, s in self._ttfts], list(self._ended)

    def start_rate(self) -> float:
        """Sequences that got their first token per second, over the last minute (asked on every
        admission check, so it counts without copying the window)."""
        self._forget_old()
        return len(self._ttfts) / WINDOW_S


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------- shedding


def shed_error(shed: Shed) -> APIError:
    """503 with Retry-After (whole seconds), as OpenAI answers when it is overloaded."""
    code = "power_budget_exceeded" if shed.reason == "power" else "server_overloaded"
    return APIError(503, shed.message, type="service_unavailable_error", code=code,
                    headers={"Retry-After": str(max(1, math.ceil(shed.retry_after_s)))})


# ---------------------------------------------------------------- the live governor


@dataclass(frozen=True, slots=True)
class EventView:
    """A grid event as the admin API and the dashboard show it."""

    event: GridEvent
    source: str
    """`config` (scheduled) or `admin` (added at runtime)."""


@dataclass(frozen=True, slots=True)
class Sample:
    """One governor round, for the dashboard's charts."""

    at: float
    budget_w: float
    power_w: float
    tokens_per_s: dict[str, float]


def engines_of(worker: Worker | ModelPools) -> list[Worker]:
    """The engines behind a worker, a pool, or every model's pools (the governor's fleet)."""
    return list(worker.workers) if isinstance(worker, (WorkerPool, ModelPools)) else [worker]


@dataclass(frozen=True, slots=True)
class GovernedEngine:
    """One engine of the governor's fleet, with its own model's device and power model."""

    model: str
    index: int
    """Its place in its model's pool (the `worker` label of its metrics)."""
    engine: Worker
    device: str
    hardware: Hardware
    max_tokens_per_step: int


def fleet_of(worker: Worker | ModelPools, device: str, max_tokens_per_step: int,
             hardware: str | None) -> list[GovernedEngine]:
    """Every model's engines on their own model's device and step budget (`ModelPools`), or the
    engines of one worker or pool on `device` with `max_tokens_per_step`, as model `default`.
    `hardware`: the config's power model where NVML is absent (None: by device)."""
    if isinstance(worker, ModelPools):
        return [GovernedEngine(name, i, engine, served.config.device, default_hardware(served.config.device, hardware),
                               served.config.scheduler.max_num_batched_tokens)
                for name, served in worker.models.items() for i, engine in enumerate(served.engines)]
    return [GovernedEngine("default", i, engine, device, default_hardware(device, hardware), max_tokens_per_step)
            for i, engine in enumerate(engines_of(worker))]


@dataclass(slots=True)
class _EngineWatch:
    """The last load seen of one engine, to turn its counters into rates."""

    at: float
    load: EngineLoad


@dataclass(slots=True)
class LiveGovernor:
    """The power governor in the gateway: reads power and load, decides, applies the levers."""

    spec: PowerSpec
    worker: Worker | ModelPools
    traffic: TierTraffic
    device: str
    """The device of a plain worker's engines (every model brings its own in `ModelPools`)."""
    max_tokens_per_step: int
    """A plain worker's step budget (likewise)."""
    clock: Callable[[], float] = time.time
    """Wall time: grid events are scheduled in it."""
    admin_events: tuple[GridEvent, ...] = ()
    decision: GovernorDecision | None = None
    power_w: float = 0.0
    power_source: str = "modeled"
    cap_w: float | None = None
    """The static cap of the last round."""
    history: deque[Sample] = field(default_factory=lambda: deque(maxlen=600))
    step_s: float | None = None
    """The engines' mean step time over the last round they stepped in (None: none seen yet)."""
    fleet: list[GovernedEngine] = field(init=False)
    _sensors: dict[str, PowerSensor] = field(init=False, default_factory=dict)
    """NVML sensors by device, where present (engines on one device share its reading)."""
    _watch: dict[int, _EngineWatch] = field(init=False, default_factory=dict)
    _step_totals: tuple[int, float] = field(init=False, default=(0, 0.0))
    _generated: deque[tuple[float, dict[str, int]]] = field(init=False, default_factory=lambda: deque(maxlen=6))

    def __post_init__(self) -> None:
        self.fleet = fleet_of(self.worker, self.device, self.max_tokens_per_step, self.spec.hardware)
        for device in {g.device for g in self.fleet}:
            sensor = sensor_for(device, self.spec.hardware)
            if sensor.source == "measured":
                self._sensors[device] = sensor

    @property
    def shed_tiers(self) -> frozenset[str]:
        return frozenset(self.decision.shed_tiers) if self.decision is not None else frozenset()

    def applied_budget(self, limit: WorkerLimits) -> int:
        """The tokens per step a worker gets: the decision's, floored (near zero starves everyone)."""
        return max(self.spec.min_tokens_per_step, limit.token_budget)

    def add_event(self, event: GridEvent) -> GridEvent:
        """A grid event from the admin API, stamped as announced now."""
        state = add_event(GovernorState(events=self.admin_events), event, self.clock())
        self.admin_events = state.events
        return state.events[-1]

    def events(self) -> list[EventView]:
        """Scheduled events near now and admin events, by start time."""
        now = self.clock()
        views = [EventView(e, "config") for s in self.spec.grid_events for e in s.events_near(now)]
        views += [EventView(e, "admin") for e in self.admin_events]
        return sorted(views, key=lambda v: v.event.start_s)

    def tick(self) -> GovernorDecision:
        """One round: read, decide, apply. Dead workers get no share."""
        now = self.clock()
        self.admin_events = tuple(e for e in self.admin_events if not e.over(now))
        alive = [i for i, g in enumerate(self.fleet) if g.engine.is_alive]
        self.observe_steps([self.fleet[i].engine.load for i in alive])
        # What one step can add to a power window beyond the pace: the governor sees only the
        # engines' mean step, so it allows twice that for the longer ones.
        reach = PACE_REACH_STEPS * (self.step_s or 0.0)
        powers = []
        for i in alive:
            hw = self.fleet[i].hardware
            powers.append(WorkerPower(i, hw.idle_w, hw.tdp_w, self.fleet[i].max_tokens_per_step, hw.idle_w, None, reach))
        cap = self.spec.static_cap_w
        cap = cap if cap is not None else sum(g.hardware.tdp_w for g in self.fleet)
        config = GovernorConfig(static_cap_w=cap, pacing=self.spec.pacing, window_s=self.spec.interval_s,
                                pace_burst_s=self.spec.pace_burst_s)
        state = scheduled_state(self.spec, self.admin_events, now)
        decision = decide(config, state, powers, self.traffic.loads(self.step_s), now)
        for limit in decision.workers:
            engine = self.fleet[limit.worker_id].engine
            if isinstance(engine, AsyncEngineClient):
                engine.set_token_budget(self.applied_budget(limit))
                engine.set_pace(limit.pace)
        self.power_w, self.power_source = self.read_power(alive, now)
        self.cap_w = config.static_cap_w
        self.history.append(Sample(now, decision.budget_w, self.power_w, self._token_rates(now)))
        self.decision = decision
        return decision

    def observe_steps(self, loads: list[EngineLoad]) -> None:
        """Update `step_s` from the live engines' step counters since the last round (kept when
        they did not step; a restarted engine's counters start again, so a drop is skipped)."""
        steps, seconds = sum(load.num_steps for load in loads), sum(load.step_seconds for load in loads)
        last_steps, last_seconds = self._step_totals
        self._step_totals = (steps, seconds)
        if steps > last_steps and seconds > last_seconds:
            self.step_s = (seconds - last_seconds) / (steps - last_steps)

    def read_power(self, alive: list[int], now: float) -> tuple[float, str]:
        """Fleet power and its source: each device with NVML read once, the other engines modeled
        (`measured`, `modeled`, or `mixed` when some of each)."""
        modeled = [i for i in alive if self.fleet[i].device not in self._sensors]
        watts = sum(sensor.read().watts for sensor in self._sensors.values())
        watts += sum(self.modeled_power(i, self.fleet[i].engine.load, now) for i in modeled)
        source = "modeled" if not self._sensors else "measured" if not modeled else "mixed"
        return watts, source

    def modeled_power(self, index: int, load: EngineLoad, now: float) -> float:
        """Engine `index`'s modeled power at the utilisation its last interval implies: the share
        of time it stepped x its tokens per step / its maximum, on its own hardware."""
        engine = self.fleet[index]
        last = self._watch.get(index)
        self._watch[index] = _EngineWatch(now, load)
        utilisation = 0.0
        if last is not None and now > last.at and load.num_steps > last.load.num_steps:
            busy = min(1.0, (load.step_seconds - last.load.step_seconds) / (now - last.at))
            per_step = (load.num_tokens - last.load.num_tokens) / (load.num_steps - last.load.num_steps)
            utilisation = max(0.0, busy * min(1.0, per_step / engine.max_tokens_per_step))
        return ModeledPowerSensor(engine.hardware, utilisation).read().watts

    def _token_rates(self, now: float) -> dict[str, float]:
        """Completion tokens per second by tier over the last five rounds (tokens come in bursts)."""
        generated = {tier: counts.generated_tokens for tier, counts in self.traffic.counts.items()}
        self._generated.append((now, generated))
        then, before = self._generated[0]
        dt = now - then
        return {tier: (n - before.get(tier, 0)) / dt if dt > 0 else 0.0 for tier, n in generated.items()}


class GovernorMetrics:
    """The governor's state in /metrics: budget, fleet power, levers and per-tier queues."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.budget = Gauge("tokenfactory_power_budget_watts", "The governor's fleet power budget now", registry=r)
        self.power = Gauge("tokenfactory_fleet_power_watts", "Fleet power as the governor reads it", ["source"],
                           registry=r)
        self.token_budget = Gauge("tokenfactory_token_budget", "Tokens per step the governor allows a worker",
                                  ["model", "worker"], registry=r)
        self.pace = Gauge("tokenfactory_pace_watts", "The mean power a paced worker's steps and rests keep to "
                          "(0: unpaced)", ["model", "worker"], registry=r)
        self.admitted = Gauge("tokenfactory_tier_admitted", "1 while the governor admits the tier, else 0",
                              ["tier"], registry=r)
        self.queued = Gauge("tokenfactory_tier_queued_sequences", "Sequences waiting for their first token",
                            ["tier"], registry=r)
        self.running = Gauge("tokenfactory_tier_running_sequences", "Sequences streaming tokens", ["tier"],
                             registry=r)

    def update(self, governor: LiveGovernor) -> None:
        decision = governor.decision
        if decision is not None:
            self.budget.set(decision.budget_w)
            for limit in decision.workers:
                engine = governor.fleet[limit.worker_id]
                labels = (engine.model, str(engine.index))
                self.token_budget.labels(*labels).set(governor.applied_budget(limit))
                self.pace.labels(*labels).set(limit.pace_w or 0.0)
            for tier in governor.traffic.counts:
                self.admitted.labels(tier).set(0 if tier in decision.shed_tiers else 1)
        self.power.labels(governor.power_source).set(governor.power_w)
        for tier, counts in governor.traffic.counts.items():
            self.queued.labels(tier).set(counts.queued)
            self.running.labels(tier).set(counts.running)


class Admission:
    """The gateway's admission: traffic by tier, the live governor, and the shedding rule."""

    def __init__(self, tiers: FactoryConfig, worker: Worker, device: str, max_tokens_per_step: int,
                 config: AdmissionConfig | None = None, clock: Callable[[], float] = time.time,
                 registry: CollectorRegistry | None = None) -> None:
        self.tiers = tiers
        self.config = config or AdmissionConfig()
        self.traffic = TierTraffic(tiers)
        self.governor = LiveGovernor(tiers.power, worker, self.traffic, device, max_tokens_per_step, clock)
        self.metrics = GovernorMetrics(registry) if registry is not None else None

    def check(self, tier: str) -> Shed | None:
        return shed_decision(tier, self.tiers, self.traffic.counts, self.governor.shed_tiers, self.config,
                             self.traffic.start_rate())

    def tick(self) -> GovernorDecision:
        decision = self.governor.tick()
        if self.metrics is not None:
            self.metrics.update(self.governor)
        return decision

    async def run(self) -> None:
        """Run the governor every `interval_s` until cancelled; a failed round is logged, not fatal."""
        while True:
            try:
                self.tick()
            except Exception:
                logger.exception("the power governor's round failed")
            await asyncio.sleep(self.governor.spec.interval_s)


# ---------------------------------------------------------------- the admin API


class GridEventRequest(BaseModel):
    """POST /admin/grid-events: cut `cut_fraction` of the budget for `duration_s`, starting at
    unix time `start_s` or `start_in_s` seconds from now (default: now)."""

    model_config = ConfigDict(extra="forbid")

    name: str = ""
    cut_fraction: float = Field(ge=0, le=1)
    duration_s: float = Field(gt=0)
    start_s: float | None = None
    start_in_s: float | None = Field(default=None, ge=0)
    ramp_s: float = Field(default=0.0, ge=0, description="ramp in before the start and out after the end")


def event_state(event: GridEvent, now: float) -> str:
    if event.over(now):
        return "over"
    if now >= event.end_s:
        return "ramping out"
    if now >= event.start_s:
        return "active"
    return "ramping in" if event.cut_at(now) > 0 else "upcoming"


def event_json(view: EventView, now: float) -> dict:
    e = view.event
    return {"object": "grid_event", "name": e.name, "source": view.source, "start_s": e.start_s,
            "end_s": e.end_s, "duration_s": e.duration_s, "cut_fraction": e.cut_fraction,
            "ramp_s": e.ramp_s, "announced_s": e.announced_s if math.isfinite(e.announced_s) else None,
            "cut_now": round(e.cut_at(now), 6), "state": event_state(e, now)}


def add_grid_event_routes(app: FastAPI, admin: AdminAuth, admission: Admission) -> None:
    """`/admin/grid-events`: add a demand-response cut now or later; list the events near now."""
    governor = admission.governor

    # Async handlers: they run on the event loop, like the governor's rounds (no thread races).
    @app.post("/admin/grid-events", dependencies=[Depends(admin)])
    async def create_grid_event(body: GridEventRequest) -> JSONResponse:
        if body.start_s is not None and body.start_in_s is not None:
            raise bad_request("Give start_s (unix time) or start_in_s (seconds from now), not both.",
                              param="start_s")
        now = governor.clock()
        start = body.start_s if body.start_s is not None else now + (body.start_in_s or 0.0)
        event = governor.add_event(GridEvent(start, body.duration_s, body.cut_fraction, body.ramp_s, name=body.name))
        admission.tick()  # act on it now, not at the next round
        return JSONResponse(event_json(EventView(event, "admin"), governor.clock()))

    @app.get("/admin/grid-events", dependencies=[Depends(admin)])
    async def list_grid_events() -> JSONResponse:
        now = governor.clock()
        decision = governor.decision
        return JSONResponse({"object": "list", "data": [event_json(v, now) for v in governor.events()],
                             "budget_w": decision.budget_w if decision is not None else None})
