"""Service tiers and the power governor in the digital twin.

`PowerSimulator` is the twin's `Simulator` with the gateway's admission in front of it and the
live governor's rounds in simulated time:

- each request of the workload gets a tier (`assign_tiers`: fractions, deterministic by seed);
  its engine request carries the tier's scheduling priority, so the real scheduler serves and
  preempts by tier as the engine does;
- on arrival the gateway's own rule (`gateway.admission.shed_decision`, over the same per-tier
  queued / running counts) sheds requests of the tiers the governor stopped admitting, and load
  sheds sheddable tiers behind too long a queue; a shed request is recorded as such, never run;
- every `interval_s` of simulated time it builds the governor's inputs from the simulated workers
  and calls the pure `control.governor.decide`, then applies its token budgets per worker
  (`Scheduler.set_token_budget`, floored at `min_tokens_per_step`) and its shed tiers, as
  `gateway.admission.LiveGovernor` does live;
- with `GovernorConfig.gpu_power_caps` the decision's per-worker caps are applied instead of the
  token budgets, as NVML power caps: each step runs at the highest clock whose power fits
  (`ClockedCostModel.power_cap_w`);
- with `GovernorConfig.pacing` a paced worker keeps whole steps (`WorkerPower.pace_tokens`) and
  starts each only when its `governor.PaceBucket` allows, resting at idle power meanwhile, as the
  live engine process does: a full bucket for most steps, one step's credit for a step with the
  protected tier's prompt work (a resting worker that gets such a request wakes as soon as its
  credit allows); its skipped-ahead decode stretches end within `pace_step_s`, so that a stretch
  takes no more from the bucket than one step;
- optionally, a clock policy (`twin.clocks.pick_clock`) sets each worker's SM clock for its load
  at the same rounds (energy-aware operation); each worker's steps are priced at its own clock.

The governor's worker model is linear (idle + (max - idle) x tokens per step / max tokens); the
twin calibrates it from the cost model (`worker_power`): the busy floor (a one-token step), the
full-power step, and the tokens per step of the steepest line from the floor through the cost
model's step power, so the linear model does not under-predict a step's power. Fleet power comes
from the cost model, per governor interval (`SimulationResult.power_w`), against the budget of
that interval (`PowerRun.samples`).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace

from tokenfactory.control.admission import AdmissionConfig, TierCounts, shed_decision
from tokenfactory.control.governor import (
    GovernorConfig,
    GovernorState,
    GridEvent,
    PaceBucket,
    TierLoad,
    WorkerPower,
    budget_at,
    decide,
    tier_demand,
)
from tokenfactory.control.router import Router
from tokenfactory.control.tiers import FactoryConfig, TokenUsage, price_usage
from tokenfactory.twin.clocks import ClockedCostModel, WorkerLoad, decode_shape, pick_clock
from tokenfactory.twin.cost_model import shape_of
from tokenfactory.twin.simulator import SimulationResult, Simulator, SimWorker, TwinConfig
from tokenfactory.twin.workloads import TraceRequest

DEMAND_WINDOW_S = 10.0
"""A tier's arriving prompt tokens count toward its demand over this many seconds."""
MODEL_NAME = "default"
"""The model name tiers are priced by in the twin (their `default` price)."""


def assign_tiers(count: int, fractions: Mapping[str, float], seed: int = 0) -> list[str]:
    """A tier per request, drawn with the given fractions (they need not sum to 1), by seed."""
    names = list(fractions)
    weights = [fractions[n] for n in names]
    if not names or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"tier fractions must be non-negative with a positive sum, got {dict(fractions)}")
    return random.Random(seed).choices(names, weights, k=count)


CALIBRATION_CONTEXTS = (0, 1024, 4096, 16384)
"""Context lengths (tokens already computed) of the steps `worker_power` prices: attention over a
long context adds compute, so such steps reach full power at fewer new tokens."""


PACE_THROUGHPUT = 0.95
"""A paced step is the smallest prefill chunk that computes this share of a full step's tokens
per second: larger ones gain little and reach further into a power window."""


def worker_power(cost: ClockedCostModel, max_tokens: int, max_seqs: int | None = None,
                 kv_tokens: int | None = None) -> WorkerPower:
    """The governor's linear model of one worker, calibrated from the cost model (see the module
    doc): prefill chunks and decode batches of every power-of-two size up to `max_tokens`, after
    each of `CALIBRATION_CONTEXTS`; and its pace: `pace_tokens`, and as `pace_step_s` the furthest
    reach of such a step (a prefill chunk, or a decode batch of at most `max_seqs` sequences whose
    contexts fit in `kv_tokens`).
    """
    floor = cost.step(shape_of([(1, 0)])).power_w
    rest = cost.hardware.idle_w * cost.tp
    sizes = sorted({2 ** k for k in range(int(math.log2(max(1, max_tokens))) + 1)} | {max_tokens})
    points = [(t, cost.step(shape).power_w) for t in sizes for context in CALIBRATION_CONTEXTS
              for shape in (shape_of([(t, context)]), decode_shape(t, context))]
    top = max(p for _, p in points)
    if top <= floor:
        return WorkerPower(0, floor, floor, max_tokens, rest)
    # The line from (0, floor) to (T, top) lies above every (t, power) for T = min of t x rise / gain.
    saturation = min(t * (top - floor) / (p - floor) for t, p in points if p > floor)
    rate = {t: t / cost.step(shape_of([(t, 0)])).duration_s for t in sizes}
    pace_tokens = min(t for t in sizes if rate[t] >= PACE_THROUGHPUT * max(rate.values()))
    seqs = min(pace_tokens, max_seqs or pace_tokens)
    paced = [cost.step(shape) for context in CALIBRATION_CONTEXTS
             for shape in (shape_of([(pace_tokens, context)]),
                           decode_shape(max(1, min(seqs, (kv_tokens or math.inf) // max(1, context))), context))]
    reach = max(step.duration_s * max(0.0, step.power_w - rest) / (top - rest) for step in paced)
    return WorkerPower(0, floor, top, max(1, min(max_tokens, math.floor(saturation))), rest, pace_tokens, reach)


@dataclass(frozen=True, slots=True)
class PowerSample:
    at: float
    """Start of the interval, simulated seconds."""
    power_w: float
    """The fleet's mean modeled power over the interval."""
    budget_w: float
    """The lowest budget during the interval."""


@dataclass(frozen=True, slots=True)
class TierReport:
    tier: str
    requests: int
    shed: int
    finished: int
    slo_met: int
    """Finished within the tier's TTFT and ITL targets (shed and unfinished requests miss)."""
    prompt_tokens: int
    cached_tokens: int
    output_tokens: int
    revenue_usd: float

    @property
    def slo_attainment(self) -> float:
        return self.slo_met / self.requests if self.requests else 1.0


@dataclass
class PowerRun:
    result: SimulationResult
    tiers: dict[str, TierReport]
    samples: list[PowerSample]
    """One per governor interval from time 0 to the last finish."""
    energy_j: float
    output_tokens: int
    clock_seconds: dict[float, float] = field(default_factory=dict)
    """Worker-seconds spent at each clock level (energy-aware runs)."""

    @property
    def joules_per_token(self) -> float:
        return self.energy_j / self.output_tokens if self.output_tokens else math.nan

    def max_power_over_budget(self, after_s: float = -math.inf, until_s: float = math.inf) -> float:
        """The highest sample's power / budget in [after_s, until_s)."""
        ratios = [s.power_w / s.budget_w for s in self.samples if after_s <= s.at < until_s and s.budget_w > 0]
        return max(ratios, default=0.0)


@dataclass(frozen=True)
class ClockPolicy:
    """Energy-aware operation: each worker's clock for its load, re-picked every governor round."""

    itl_s: float
    ttft_s: float
    levels: tuple[float, ...]
    headroom: float = 0.5


class PowerSimulator(Simulator):
    """The twin with tiers, admission and the power governor (see the module doc)."""

    def __init__(self, config: TwinConfig, router: Router | None, tiers: FactoryConfig,
                 governor: GovernorConfig, events: Sequence[GridEvent] = (), tier_of: Sequence[str] = (),
                 interval_s: float = 1.0, min_tokens_per_step: int = 16,
                 admission: AdmissionConfig | None = None, clocks: ClockPolicy | None = None,
                 use_governor: bool = True) -> None:
        if not isinstance(config.cost, ClockedCostModel):
            raise TypeError("PowerSimulator needs a ClockedCostModel (activity-based power) as config.cost")
        if interval_s <= 0 or min_tokens_per_step < 1:
            raise ValueError("need interval_s > 0 and min_tokens_per_step >= 1")
        unknown = set(tier_of) - set(tiers.tiers)
        if unknown:
            raise ValueError(f"tiers {sorted(unknown)} are not in the factory config's {sorted(tiers.tiers)}")
        # Power is sampled once per governor round.
        super().__init__(replace(config, power_interval_s=interval_s), router)
        self.tiers = tiers
        self.governor = governor
        self.state = GovernorState(events=tuple(events))
        self.tier_of = list(tier_of)
        self.interval_s = interval_s
        self.min_tokens_per_step = min_tokens_per_step
        self.admission = admission or AdmissionConfig()
        self.clocks = clocks
        self.use_governor = use_governor
        self.max_tokens = config.scheduler.max_num_batched_tokens
        kv_tokens = (config.num_blocks or config.cost.kv_num_blocks(config.block_size)) * config.block_size
        power = worker_power(config.cost, self.max_tokens, config.scheduler.max_num_seqs, kv_tokens)
        self.powers = [replace(power, worker_id=i) for i in range(len(self.workers))]
        self._step_s = config.cost.step(shape_of([(power.max_tokens_per_step, 0)])).duration_s
        """A full-power step's duration (the demand's time scale)."""
        self.worker_cost = [config.cost] * len(self.workers)
        self._buckets = [PaceBucket() for _ in self.workers]
        self._resting: list[float | None] = [None] * len(self.workers)
        """Per worker: when its rest ends (its wake-up is in the step heap), or None."""
        self.counts = {name: TierCounts() for name in tiers.tiers}
        self.shed_tiers: frozenset[str] = frozenset()
        self.shed_ids: set[str] = set()
        self._tier_by_id: dict[str, str] = {}
        self._arrived = {name: deque() for name in tiers.tiers}
        """Per tier: (arrival time, prompt tokens) over the last DEMAND_WINDOW_S."""
        self._arrived_tokens = {name: 0 for name in tiers.tiers}
        self._queued: list[dict[str, int]] = [{} for _ in self.workers]
        """Per worker: request id -> prompt tokens, for requests with no token yet."""
        self._running: list[set[str]] = [set() for _ in self.workers]
        self._next_tick = 0.0
        self._clock_since = [0.0] * len(self.workers)
        self.clock_seconds: dict[float, float] = {}

    # --- the governor's rounds ----------------------------------------------------------------

    def _catch_up(self) -> None:
        """Run the rounds due by now (between events nothing changes, so a late round is exact)."""
        while self.now >= self._next_tick:
            self._tick(self._next_tick)
            self._next_tick += self.interval_s

    def _tick(self, at: float) -> None:
        if self.use_governor:
            loads = [TierLoad(name, spec.priority, self._demand(name, at)) for name, spec in self.tiers.tiers.items()]
            decision = decide(self.governor, self.state, self.powers, loads, at)
            for limit, worker, power in zip(decision.workers, self.workers, self.powers):
                # Given its full power a worker needs no limit; below it, the decision's tokens per
                # step, or with GPU caps on, its power share as the cap (the GPU lowers its clock to
                # fit, so the steps keep their size).
                full = limit.power_w >= power.max_w - 1e-9
                self._buckets[worker.index].set(limit.pace, at)
                self._wake_sooner(worker)
                if limit.gpu_cap_w is not None:
                    cost = self.worker_cost[worker.index]
                    self.worker_cost[worker.index] = cost.capped(None if full else limit.gpu_cap_w)
                    worker.scheduler.set_token_budget(self.max_tokens)
                    continue
                if limit.pace_w is not None:
                    worker.scheduler.set_token_budget(limit.token_budget)
                    continue
                budget = self.max_tokens if full else max(self.min_tokens_per_step, limit.token_budget)
                worker.scheduler.set_token_budget(budget)
            self.shed_tiers = frozenset(decision.shed_tiers)
        if self.clocks is not None:
            for worker in self.workers:
                self._set_clock(worker, at)

    def _demand(self, tier: str, now: float) -> float:
        """Tokens per step the tier asks for (`control.governor.tier_demand`), its arriving prompts
        counted (shed or not) over the last `DEMAND_WINDOW_S` at the rate of full-power steps."""
        counts, arrived = self.counts[tier], self._arrived[tier]
        while arrived and arrived[0][0] < now - DEMAND_WINDOW_S:
            self._arrived_tokens[tier] -= arrived.popleft()[1]
        arriving = self._arrived_tokens[tier] * self._step_s / DEMAND_WINDOW_S
        return tier_demand(counts.running, counts.queued_prompt_tokens, self.tiers.tiers[tier].slo.ttft_s,
                           self._step_s, arriving)

    def _set_clock(self, worker: SimWorker, at: float) -> None:
        records = [self._records[r] for r in self._running[worker.index]]
        context = sum(r.num_prompt_tokens + r.num_output_tokens for r in records) / len(records) if records else 0.0
        load = WorkerLoad(len(records), context, worker.queued_prefill_tokens)
        policy = self.clocks
        assert policy is not None
        clock = pick_clock(self.worker_cost[worker.index], load, policy.itl_s, policy.ttft_s,
                           worker.scheduler.token_budget, policy.levels, policy.headroom)
        current = self.worker_cost[worker.index].clock
        if clock != current:
            self.clock_seconds[current] = self.clock_seconds.get(current, 0.0) + at - self._clock_since[worker.index]
            self._clock_since[worker.index] = at
            self.worker_cost[worker.index] = self.worker_cost[worker.index].at(clock)

    def _arrival_bound(self, *args: object, **kwargs: object) -> float:
        # Skipped-ahead steps also end before the next round, which may change a token budget,
        # and while a worker is paced, within a paced step's reach (a stretch rests as one step).
        bound = min(super()._arrival_bound(*args, **kwargs), self._next_tick)
        if any(bucket.pace is not None for bucket in self._buckets):
            bound = min(bound, self.now + max(self.powers[0].pace_step_s, 1e-6))
        return bound

    # --- requests -----------------------------------------------------------------------------

    def _arrive(self, request_id: str, trace: TraceRequest) -> int | None:
        """Admission (the gateway's shedding rule), then the base simulator's arrival with the
        tier's priority on the engine request."""
        self._catch_up()
        tier = self.tier_of[int(request_id)] if self.tier_of else self.tiers.default_tier
        self._arrived[tier].append((self.now, trace.input_length))
        self._arrived_tokens[tier] += trace.input_length
        if shed_decision(tier, self.tiers, self.counts, self.shed_tiers, self.admission) is not None:
            self.shed_ids.add(request_id)
            del self._records[request_id]
            return None
        index = super()._arrive(request_id, trace, self.tiers.tiers[tier].priority)
        if index is None:
            return None
        self._wake_sooner(self.workers[index])
        self._tier_by_id[request_id] = tier
        counts = self.counts[tier]
        counts.queued += 1
        counts.queued_prompt_tokens += trace.input_length
        self._queued[index][request_id] = trace.input_length
        return index

    def _start_step(self, worker: SimWorker) -> None:
        index = worker.index
        if worker.busy or not worker.scheduler.has_unfinished():
            return
        bucket = self._buckets[index]
        wait = bucket.wait_s(self.now, bucket.protects(worker.scheduler.has_prompt_work))
        if wait > 0:
            # Resting: a completion with no step in flight wakes the worker when the rest is over.
            worker.busy = True
            self._resting[index] = self.now + wait
            self._seq += 1
            heapq.heappush(self._steps, (self.now + wait, self._seq, index))
            return
        busy_s, energy_j = worker.busy_s, worker.energy_j
        self.cost = self.worker_cost[index]  # each worker's steps at its own clock
        try:
            super()._start_step(worker)
        finally:
            self.cost = self.config.cost
        step_s = worker.busy_s - busy_s
        if step_s > 0:
            bucket.spend(self.now, step_s, (worker.energy_j - energy_j) / step_s)

    def _wake_sooner(self, worker: SimWorker) -> None:
        """A resting worker whose bucket now allows a step sooner (protected work arrived, or the
        pace changed) has its wake-up moved earlier."""
        index, until = worker.index, self._resting[worker.index]
        if until is None:
            return
        bucket = self._buckets[index]
        sooner = self.now + bucket.wait_s(self.now, bucket.protects(worker.scheduler.has_prompt_work))
        if sooner >= until - 1e-12:
            return
        for i, (at, seq, which) in enumerate(self._steps):
            if which == index and at == until:
                self._steps[i] = (sooner, seq, index)
                heapq.heapify(self._steps)
                self._resting[index] = sooner
                return

    def _end_step(self, worker: SimWorker) -> None:
        self._resting[worker.index] = None
        super()._end_step(worker)
        queued, running = self._queued[worker.index], self._running[worker.index]
        for request_id in [r for r in queued if self._records[r].first_token >= 0]:
            counts = self.counts[self._tier_by_id[request_id]]
            counts.queued -= 1
            counts.queued_prompt_tokens -= queued.pop(request_id)
            counts.running += 1
            running.add(request_id)
        for request_id in self._finished:
            if request_id in running:
                running.discard(request_id)
                self.counts[self._tier_by_id[request_id]].running -= 1
        self._catch_up()

    # --- the report ---------------------------------------------------------------------------

    def run_power(self, workload: Sequence[TraceRequest], on_progress: Callable[[float], None] | None = None,
                  ) -> PowerRun:
        """Run `workload` (a static list: tiers are assigned by position) and report by tier."""
        if self.tier_of and len(self.tier_of) != len(workload):
            raise ValueError(f"{len(self.tier_of)} tiers for {len(workload)} requests")
        result = self.run(workload, on_progress)
        end = self.now
        for worker in self.workers:  # close the clock accounting
            clock = self.worker_cost[worker.index].clock
            self.clock_seconds[clock] = self.clock_seconds.get(clock, 0.0) + end - self._clock_since[worker.index]
        tiers = {name: _TierTotals() for name in self.tiers.tiers}
        for i, record in enumerate(result.records):
            request_id = str(i)
            tier = self.tier_of[i] if self.tier_of else self.tiers.default_tier
            totals, spec = tiers[tier], self.tiers.tiers[tier]
            totals.requests += 1
            if request_id in self.shed_ids:
                totals.shed += 1
                continue
            if record.finish < 0:
                continue
            totals.finished += 1
            totals.slo_met += record.ttft <= spec.slo.ttft_s and record.itl <= spec.slo.itl_s
            usage = TokenUsage(record.num_prompt_tokens, record.num_cached_tokens, record.num_output_tokens)
            totals.prompt += usage.prompt_tokens
            totals.cached += usage.cached_tokens
            totals.output += usage.completion_tokens
            totals.revenue += price_usage(spec, MODEL_NAME, usage)
        reports = {name: TierReport(name, t.requests, t.shed, t.finished, t.slo_met, t.prompt, t.cached, t.output,
                                    t.revenue) for name, t in tiers.items()}
        first = int(min((r.arrival for r in result.records), default=0.0) // self.interval_s)
        samples = [PowerSample(at, watts, self._lowest_budget(at))
                   for i, watts in enumerate(result.power_w) for at in [(first + i) * self.interval_s]]
        output = sum(r.output for r in tiers.values())
        return PowerRun(result, reports, samples, result.summary.energy_j, output, dict(self.clock_seconds))

    def _lowest_budget(self, start: float) -> float:
        """The budget's minimum over [start, start + interval): it is piecewise linear, so at an
        end or at an event's corner."""
        end = start + self.interval_s
        corners = [t for e in self.state.events
                   for t in (e.start_s, e.start_s + e.duration_s, e.start_s - e.ramp_s, e.start_s + e.duration_s + e.ramp_s)
                   if start < t < end]
        return min(budget_at(self.governor, self.state, t) for t in (start, end, *corners))


@dataclass(slots=True)
class _TierTotals:
    requests: int = 0
    shed: int = 0
    finished: int = 0
    slo_met: int = 0
    prompt: int = 0
    cached: int = 0
    output: int = 0
    revenue: float = 0.0
