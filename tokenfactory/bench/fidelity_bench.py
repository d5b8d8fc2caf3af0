"""`tokenfactory bench fidelity`: does the twin, calibrated by a profile, predict the live engine?

One workload (Poisson arrivals, mixed prompt and output lengths, part of the prompts sharing
prefixes) is served twice, in this process:

- live: an `EngineCore` steps while the arrivals are replayed in real time (greedy, ignore_eos,
  each request's max_tokens), recording each request's arrival, first and last token times
  (`--clock cpu` replays them in the engine thread's CPU time instead: a busy machine disturbs
  that less, though not nothing);
- twin: the `Simulator` replays it with a `ProfiledCostModel` from a profile of the same engine,
  on the same scheduler configuration and the same number of KV blocks, each step at its fitted
  price times the profile's `Slowdown` factor for it (the twin at mean prices is printed beside).

It prints throughput, TTFT p50/p90 and inter-token latency p50/p90 of both, the twin's relative
error on each, and PASS/MISS against 10% (issue 3's goal; the aim is 5%). The profile is measured
in the same run unless `--profile FILE` gives one: a sweep before the first live replay and one
after each. A shared machine's speed moves by a third within seconds, which no profile can know
in advance (probing the machine's level beside the live run was tried: it read the level 3-8%
off, and a probe heavy enough to read it well slowed the live steps), so the live replay is made
`--rounds` times between the sweeps and each metric is compared as its median over the rounds on
either side: what the twin predicts is the engine on this machine, not one minute of it. Each
live round is matched by `DRAWS` twin runs on the machine the sweeps either side of it measured
(`round_machines`: their speed and their slowdown series), so that the twin's rounds vary as the
live ones do and the two medians are the same kind of round. Torch threads are fixed for the
whole run. How far the live engine's own rounds disagree (the odd rounds' median against the
even rounds') is printed too: on a noisy machine that is what any comparison can hope for.

To say why an error is what it is, the live run's own steps are priced by the fitted model too:
the step model's error on the very batches the engine ran, the loop's time between steps, and
how late the replay woke up for arrivals at an idle engine.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from tokenfactory.bench.neighbour import neighbour
from tokenfactory.control.router import RoundRobinRouter
from tokenfactory.engine.config import EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.twin.cost_model import BatchShape
from tokenfactory.twin.metrics import RequestRecord, Summary, summarize
from tokenfactory.twin.profile import (
    CLOCKS,
    QUICK_GRID,
    Profile,
    ProfiledCostModel,
    ProfileGrid,
    ProfilePoint,
    ShapeRecordingRunner,
    Slowdown,
    StepTimeFit,
    add_engine_arguments,
    build_runner,
    check_clock,
    describe,
    engine_config,
    fit_step_time,
    run_profile,
)
from tokenfactory.twin.plots import cdf, log_axes, pyplot
from tokenfactory.twin.simulator import SimulationResult, Simulator, TwinConfig
from tokenfactory.twin.workloads import LengthDistribution, TraceRequest, prompt_token_ids

GOAL = 0.10
AIM = 0.05

SWEEP = ProfileGrid(repeats=2, slowdown_steps=400)
"""One profile sweep between live rounds: short, since the sweeps add up (two passes over the grid
each, so 2 x (rounds + 1) samples a point), and a round more of live replay buys more than a
longer sweep where a round now and then runs a third slow."""


# --- the workload -----------------------------------------------------------------------------


def fidelity_workload(num_requests: int, rate: float, input_length: LengthDistribution,
                      output_length: LengthDistribution, shared_fraction: float = 0.5,
                      num_groups: int = 2, seed: int = 0) -> list[TraceRequest]:
    """Poisson arrivals; a `shared_fraction` of the prompts belong to one of `num_groups`
    conversations (one shared block id: a prompt repeats the group's tokens up to its length, so
    any two share their shorter one's prefix), the rest are unique."""
    if num_requests < 1 or rate <= 0:
        raise ValueError(f"need at least one request and a positive rate, got {num_requests} and {rate}")
    if not 0 <= shared_fraction <= 1 or num_groups < 1:
        raise ValueError("shared_fraction must lie in [0, 1] and num_groups be at least 1")
    rng = random.Random(seed)
    now, requests = 0.0, []
    for uid in range(num_requests):
        group = (num_requests + rng.randrange(num_groups),) if rng.random() < shared_fraction else ()
        requests.append(TraceRequest(now, input_length.sample(rng), output_length.sample(rng), group, uid))
        now += rng.expovariate(rate)
    return requests


def live_prompt(request: TraceRequest, vocab_size: int) -> list[int]:
    """The twin's prompt in the model's vocabulary. Prompts differ only in their leading ids (the
    request's uid or block id); below the vocabulary size they stay distinct, so the live prefix
    cache shares exactly what the twin's does."""
    if max((request.uid, *request.hash_ids)) >= vocab_size:
        raise ValueError(f"request ids must stay below the vocabulary ({vocab_size}) to keep prompts distinct")
    return [t % vocab_size for t in prompt_token_ids(request)]


# --- the live run -----------------------------------------------------------------------------


@dataclass
class LiveRun:
    records: list[RequestRecord]
    shapes: list[BatchShape] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    """Each step's time, `EngineCore.step` end to end."""
    step_start_s: list[float] = field(default_factory=list)
    gap_s: list[float] = field(default_factory=list)
    """Between one step's end and the next one's start while work was queued (the loop itself)."""
    wake_late_s: list[float] = field(default_factory=list)
    """For each step started by an arrival at an idle engine: its start minus that arrival."""
    arrived_idle: set[int] = field(default_factory=set)
    """Requests that arrived while the engine had nothing to do: their TTFT is the wake-up and
    their own prefill, with no queueing in it."""

    def steps(self) -> list[tuple[BatchShape, float]]:
        """Each step's shape and measured seconds."""
        return list(zip(self.shapes, self.step_s))


SPIN_S = 0.003
"""The last stretch of an idle wait is spent polling, not sleeping: a sleeper wakes late on a
busy machine (5 ms at the median on ours), and the engine process busy-polls its inputs too."""


class ReplayClock:
    """Seconds since the replay began. On the wall clock an idle engine waits for the next
    arrival; on the CPU clock (the engine thread's CPU time) it jumps there instead."""

    def __init__(self, kind: str = "wall") -> None:
        self.kind, self.read = kind, CLOCKS[kind]
        self.start, self.skipped = self.read(), 0.0

    def now(self) -> float:
        return self.read() - self.start + self.skipped

    def wait_until(self, t: float) -> None:
        if self.kind == "wall":
            time.sleep(max(0.0, t - self.now() - SPIN_S))
            while self.now() < t:
                pass
        else:
            self.skipped += max(0.0, t - self.now())


def replay_live(core: EngineCore, runner: ShapeRecordingRunner, workload: list[TraceRequest],
                clock: str = "wall") -> LiveRun:
    """Serve `workload` on `core` with its arrivals replayed in time (from now)."""
    vocab = core.config.model.vocab_size
    prompts = [live_prompt(r, vocab) for r in workload]  # built before the clock starts
    run = LiveRun([RequestRecord(r.arrival_time, r.input_length) for r in workload])
    position, last_end, woken_by = 0, None, None
    replay = ReplayClock(clock)
    while position < len(workload) or core.has_work():
        now = replay.now()
        idle = not core.has_work()
        while position < len(workload) and workload[position].arrival_time <= now:
            trace = workload[position]
            sampling = SamplingParams(max_tokens=trace.output_length, temperature=0.0, ignore_eos=True)
            core.add_request(Request(str(position), prompts[position], sampling, arrival_time=trace.arrival_time))
            if idle:
                run.arrived_idle.add(position)
            position += 1
        if not core.has_work():
            woken_by, last_end = workload[position].arrival_time, None
            replay.wait_until(woken_by)
            continue
        runner.last_shape = None
        began = replay.now()
        outputs = core.step()
        ended = replay.now()
        for output in outputs:
            run.records[int(output.request_id)].observe(output, ended)
        if runner.last_shape is None:
            continue  # nothing fitted the cache this step
        run.shapes.append(runner.last_shape)
        run.step_s.append(ended - began)
        run.step_start_s.append(began)
        if last_end is not None:
            run.gap_s.append(began - last_end)
        elif woken_by is not None:
            run.wake_late_s.append(began - woken_by)
        last_end, woken_by = ended, None
    return run


def warm_up(core: EngineCore) -> None:
    """A few steps of every kind, so the first live step is not the first of its shape."""
    vocab = core.config.model.vocab_size
    for i in range(4):
        prompt = [(7 * i + j) % vocab for j in range(48)]
        core.add_request(Request(f"warm-{i}", prompt, SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)))
    while core.has_work():
        core.step()


# --- both sides -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Comparison:
    name: str
    live: float
    twin: float

    @property
    def error(self) -> float:
        return (self.twin - self.live) / self.live if self.live else float("nan")

    @property
    def passed(self) -> bool:
        return abs(self.error) <= GOAL


@dataclass
class FidelityResult:
    live: Summary
    twin: Summary
    comparisons: list[Comparison]
    run: LiveRun
    profile: Profile
    live_wall_s: float
    workload: list[TraceRequest]
    """As served (its arrival times rescaled when a utilisation was asked for)."""
    twin_busy_fraction: float
    twin_records: list[RequestRecord] = field(default_factory=list)
    """The twin's requests, run by run in the workload's order (as the live run's), `draws` runs a live round."""
    rounds: int = 1
    """Live replays (the twin runs `draws` times for each)."""
    live_rounds: list[Summary] = field(default_factory=list)
    """Each live replay on its own: how far apart minutes of the same machine are."""
    twin_rounds: list[Summary] = field(default_factory=list)
    rescaled: list[Summary] | None = None
    """The twin with each round's step prices scaled so that its live round's own steps are priced
    right in total: not a prediction (it reads the answer), but it separates the machine's speed
    drifting between the sweeps and the rounds from what the rest of the twin gets wrong."""
    at_mean: list[Summary] | None = None
    """The twin without the slowdown series, every step at its round's mean price: what modeling
    the machine's variability adds."""
    draws: int = 1
    """Twin runs per live round."""
    runs: list[LiveRun] = field(default_factory=list)
    """Each live replay's own steps."""
    machines: list[RoundMachine] = field(default_factory=list)
    """The machine the twin ran each live round on."""

    @property
    def step_model_error(self) -> float:
        """Predicted over measured time, summed over the live run's own steps, minus 1."""
        return self.step_model_error_where(lambda shape: True)

    def step_model_error_where(self, which: Callable[[BatchShape], bool]) -> float:
        """`step_model_error` over the live steps whose shape `which` accepts (nan if none)."""
        return step_error(self.profile.fit, [(shape, s) for shape, s in self.run.steps() if which(shape)])

    def ttft_ratios(self, arrived_idle: bool) -> list[float]:
        """Per request, the twin's TTFT over the live one's, for the requests that arrived at an
        idle live engine (or those that did not)."""
        n = len(self.workload)
        twin = [self.twin_records[r * self.draws * n + q] for r in range(self.rounds) for q in range(n)]  # first draws
        return [twin[i].ttft / record.ttft for i, record in enumerate(self.run.records)
                if (i in self.run.arrived_idle) == arrived_idle and record.ttft > 0 and twin[i].first_token >= 0]

    def slowdown_by_second(self, min_steps: int = 10) -> list[float]:
        """Measured over predicted step time in each second of the live run (with enough steps):
        how much the machine's load moved under the run."""
        windows: dict[int, list[float]] = {}
        for start, shape, seconds in zip(self.run.step_start_s, self.run.shapes, self.run.step_s):
            sums = windows.setdefault(int(start), [0.0, 0.0, 0])
            sums[0] += seconds
            sums[1] += self.profile.fit.predict(shape)
            sums[2] += 1
        return [measured / predicted for measured, predicted, n in windows.values() if n >= min_steps and predicted]


def step_error(fit: StepTimeFit, steps: list[tuple[BatchShape, float]]) -> float:
    """Predicted over measured time, summed over (shape, measured seconds) steps, minus 1 (nan if none)."""
    measured = sum(s for _, s in steps)
    return sum(fit.predict(shape) for shape, _ in steps) / measured - 1 if measured else float("nan")


METRICS: tuple[tuple[str, Callable[[Summary], float]], ...] = (
    ("throughput (output tokens/s)", lambda s: s.output_tokens_per_s),
    ("TTFT p50 (ms)", lambda s: 1000 * s.ttft.p50),
    ("TTFT p90 (ms)", lambda s: 1000 * s.ttft.p90),
    ("inter-token latency p50 (ms)", lambda s: 1000 * s.itl.p50),
    ("inter-token latency p90 (ms)", lambda s: 1000 * s.itl.p90),
)


def compare(live: list[Summary], twin: list[Summary]) -> list[Comparison]:
    """Each metric's median over the rounds on either side: a round that a burst of load from
    elsewhere slowed by a third (it happens here) moves the median no more than any other round."""
    return [Comparison(name, statistics.median(map(metric, live)), statistics.median(map(metric, twin)))
            for name, metric in METRICS]


def _summary(records: list[RequestRecord]) -> Summary:
    return summarize(records, num_rejected=0, num_gpus=1, energy_j=0.0, price_per_gpu_hour=0.0)


def merge_profiles(profiles: list[Profile]) -> Profile:
    """One profile from sweeps of the same grid: each point's mean over every sweep's repeats,
    refitted; their slowdown series one after the other."""
    first = profiles[0]
    points = [
        ProfilePoint(ps[0].kind, ps[0].shape, statistics.fmean(s for p in ps for s in p.samples),
                     tuple(s for p in ps for s in p.samples))
        for ps in zip(*(profile.points for profile in profiles), strict=True)
    ]
    fit = fit_step_time([(p.shape, p.seconds) for p in points])
    return Profile(points, fit, first.model, first.engine, first.machine, sum(p.wall_s for p in profiles),
                   joined([profile.slowdown for profile in profiles]))


def joined(series: list[Slowdown | None]) -> Slowdown | None:
    """Slowdown series one after the other (None if there are none)."""
    seconds = tuple(s for slowdown in series if slowdown for s in slowdown.seconds)
    return Slowdown(seconds) if seconds else None


def pooled(rounds: list[list[RequestRecord]]) -> list[RequestRecord]:
    """The records of several replays of one workload as one run: each replay's times shifted to
    begin where the previous one ended, so percentiles pool every request and throughput is all
    tokens over the replays' summed durations."""
    out: list[RequestRecord] = []
    end = 0.0
    for records in rounds:
        shift = end - min(r.arrival for r in records)
        for r in records:
            out.append(dataclasses.replace(r, arrival=r.arrival + shift, **{
                name: getattr(r, name) + shift for name in ("first_token", "last_token", "finish")
                if getattr(r, name) >= 0}))
        end = max((r.finish for r in out if r.finish >= 0), default=end)
    return out


def merge_runs(runs: list[LiveRun]) -> LiveRun:
    """Live replays of one workload as one run: records pooled, steps one after the other."""
    merged = LiveRun(pooled([run.records for run in runs]))
    offset = 0.0
    for i, run in enumerate(runs):
        merged.shapes += run.shapes
        merged.step_s += run.step_s
        merged.step_start_s += [t + offset for t in run.step_start_s]
        merged.gap_s += run.gap_s
        merged.wake_late_s += run.wake_late_s
        merged.arrived_idle |= {i * len(run.records) + k for k in run.arrived_idle}
        offset += max(run.step_start_s, default=0.0) + 1.0
    return merged


def run_fidelity(config: EngineConfig, workload: list[TraceRequest], threads: int = 1,
                 grid: ProfileGrid | None = SWEEP, profile: Profile | None = None,
                 clock: str = "wall", utilisation: float | None = None,
                 console: Console | None = None, rounds: int = 9) -> FidelityResult:
    """Profile (unless given), then `rounds` times: replay live, profile again; simulate as many
    rounds; `config.scheduler` and its KV blocks are used on both sides, and one clock
    throughout. With `utilisation`, the workload's arrivals are first spread or packed until the
    profiled twin predicts the engine busy that fraction of the time (a rate that means the same
    load on any machine or clock)."""
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    console = console or Console()
    check_clock(config, clock)
    runner = build_runner(config, threads)
    sweeps = []
    if profile is None:
        if grid is None:
            raise ValueError("give a profile or a grid to measure one")
        sweeps.append(run_profile(config, grid, threads, runner, clock))
        profile = sweeps[0]
    else:
        if profile.engine.get("clock", "wall") != clock:
            raise ValueError(f"the profile was timed on the {profile.engine.get('clock')} clock, "
                             f"this run uses the {clock} clock")
        warm_up(EngineCore(config, runner))
    if utilisation is not None:
        workload = at_utilisation(workload, utilisation, lambda w: busy_fraction(
            simulate_run(config, runner.num_blocks, profile.fit, profile, w)))
    runs = []
    started = time.perf_counter()
    for i in range(rounds):
        console.print(f"live ({clock} clock), round {i + 1} of {rounds}: {len(workload)} requests over "
                      f"{workload[-1].arrival_time:.1f} s of arrivals ...")
        runs.append(replay_live(EngineCore(config, runner), runner, workload, clock))
        if sweeps:
            sweeps.append(run_profile(config, grid, threads, runner, clock))
    live_wall = time.perf_counter() - started
    if sweeps:
        profile = merge_profiles(sweeps)
    run = merge_runs(runs)
    machines = round_machines(profile, sweeps, rounds)
    twin = simulate_rounds(config, runner.num_blocks, profile, workload, machines)
    live_rounds = [_summary(r.records) for r in runs]
    result = FidelityResult(_summary(run.records), twin.summary, compare(live_rounds, twin.rounds), run, profile,
                            live_wall, workload, twin.busy_fraction, twin.records, rounds, live_rounds, twin.rounds,
                            draws=DRAWS, runs=runs, machines=machines)
    if all(r.step_s for r in runs):
        rescaled = [dataclasses.replace(m, scale=1 / (1 + step_error(profile.fit, r.steps())))
                    for m, r in zip(machines, runs)]
        result.rescaled = simulate_rounds(config, runner.num_blocks, profile, workload, rescaled).rounds
    if any(m.slowdown for m in machines):
        steady = [dataclasses.replace(m, slowdown=None) for m in machines]
        result.at_mean = simulate_rounds(config, runner.num_blocks, profile, workload, steady).rounds
    return result


def simulate_run(config: EngineConfig, num_blocks: int, fit: StepTimeFit, profile: Profile,
                 workload: list[TraceRequest]) -> SimulationResult:
    """The twin of the live engine: one worker, its scheduler configuration and KV blocks."""
    cost = dataclasses.replace(ProfiledCostModel.from_profile(profile), fit=fit)
    twin_config = TwinConfig(cost=cost, num_workers=1, scheduler=config.scheduler,
                             block_size=config.cache.block_size, num_blocks=num_blocks)
    return Simulator(twin_config, RoundRobinRouter()).run(workload)


@dataclass
class PooledTwin:
    summary: Summary
    """Every round's requests pooled."""
    rounds: list[Summary]
    records: list[RequestRecord]
    busy_fraction: float
    """The mean over the rounds."""


def sweep_levels(sweeps: list[Profile], merged: Profile) -> list[float]:
    """Each sweep's speed against the merged profile: the geometric mean over the grid's points of
    the sweep's mean time for the point over the merged mean (1.1: that sweep ran 10% slow)."""
    raw = [statistics.geometric_mean([statistics.fmean(p.samples) / m.seconds
                                      for p, m in zip(sweep.points, merged.points)]) for sweep in sweeps]
    middle = statistics.geometric_mean(raw)
    return [r / middle for r in raw]


def scaled(fit: StepTimeFit, scale: float) -> StepTimeFit:
    return StepTimeFit(tuple(c * scale for c in fit.coefficients), fit.rms_relative_error)


DRAWS = 5
"""Twin runs per live round, each walking its round's slowdown series from another point: a
simulation costs a fraction of a second, and the twin's median should not hang on where one walk
puts the series' slow stretches against the workload's bursts."""


@dataclass(frozen=True)
class RoundMachine:
    """What the twin knows of the machine one live round ran on."""

    scale: float
    """Its speed against the merged profile's (1.1: steps take 10% longer)."""
    slowdown: Slowdown | None
    """The variability to price steps with (None: every step at its mean)."""


def round_machines(profile: Profile, sweeps: list[Profile], rounds: int) -> list[RoundMachine]:
    """Each live round's machine, from the sweeps before and after it: their level (the geometric
    mean of the two) and their slowdown series. A shared machine's speed drifts from minute to
    minute, and a round's median is the round in the middle, not the machine averaged over every
    round: with one series pooled over the whole run, every twin round walked through every slow
    stretch of the run, and its upper percentiles came out 8-35% above the median live round's
    beside a noisy neighbour. Without sweeps (a profile file), every round gets the profile's own."""
    if len(sweeps) != rounds + 1:
        return [RoundMachine(1.0, profile.slowdown)] * rounds
    levels = sweep_levels(sweeps, profile)
    return [RoundMachine(math.sqrt(levels[i] * levels[i + 1]), joined([sweeps[i].slowdown, sweeps[i + 1].slowdown]))
            for i in range(rounds)]


def simulate_rounds(config: EngineConfig, num_blocks: int, profile: Profile, workload: list[TraceRequest],
                    machines: list[RoundMachine], draws: int = DRAWS) -> PooledTwin:
    """The twin over `draws` runs for each of the live rounds' `machines`, pooled as the live
    rounds are: each run prices steps by the profile's fit at its machine's scale, walking its
    machine's slowdown series from its own point (draw d of round i from (d + i / rounds) / draws
    of the way along: a round's draws spread over its series, and rounds sharing one series start
    apart)."""
    n = len(machines) * draws
    results: list[SimulationResult] = []
    for i, machine in enumerate(machines):
        fit = scaled(profile.fit, machine.scale)
        series = machine.slowdown.seconds if machine.slowdown else ()
        for d in range(draws):
            if not series and d:  # every draw would be the same run
                results.append(results[-1])
                continue
            k = (d * len(machines) + i) * len(series) // n
            slowdown = Slowdown(series[k:] + series[:k]) if series else None
            results.append(simulate_run(config, num_blocks, fit, dataclasses.replace(profile, slowdown=slowdown),
                                        workload))
    records = pooled([r.records for r in results])
    return PooledTwin(_summary(records), [r.summary for r in results], records,
                      statistics.fmean(busy_fraction(r) for r in results))


def busy_fraction(result: SimulationResult) -> float:
    """How much of the run (first arrival to last finish) the one worker spent stepping."""
    return result.workers[0].busy_s / result.summary.duration_s


def at_utilisation(workload: list[TraceRequest], utilisation: float,
                   predict_busy: Callable[[list[TraceRequest]], float]) -> list[TraceRequest]:
    """`workload` with its arrival times stretched (or squeezed) until `predict_busy` says
    the engine is busy for `utilisation` of the time (within 2%, or after a few tries)."""
    if not 0 < utilisation < 1:
        raise ValueError(f"utilisation must lie strictly between 0 and 1, got {utilisation}")
    for _ in range(8):
        stretch = min(4.0, max(0.25, predict_busy(workload) / utilisation))
        if abs(stretch - 1) < 0.02:
            break
        workload = [dataclasses.replace(r, arrival_time=r.arrival_time * stretch) for r in workload]
    return workload


# --- the command ------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--profile", type=Path, help="a `twin profile` file (default: profile in this run)")
    p.add_argument("--save-profile", type=Path, help="write the profile measured in this run to this file")
    p.add_argument("--requests", type=int, default=120)
    p.add_argument("--utilisation", type=float, default=0.6,
                   help="spread the arrivals so that the profiled twin predicts the engine busy this "
                        "fraction of the time (default 0.6: batches form, queues stay short)")
    p.add_argument("--rate", type=float, help="Poisson arrivals per second instead (ignores --utilisation)")
    p.add_argument("--input-mean", type=int, default=96, help="mean prompt tokens (lognormal)")
    p.add_argument("--output-mean", type=int, default=32, help="mean output tokens (lognormal)")
    p.add_argument("--shared-fraction", type=float, default=0.5, help="prompts in a shared-prefix conversation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--max-num-batched-tokens", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="a small profile grid (smoke tests)")
    p.add_argument("--plots", type=Path, metavar="DIR",
                   help="also draw the comparison (latency CDFs, step prices, errors by round) as DIR/fidelity.png")
    p.add_argument("--neighbour", type=int, metavar="SEED",
                   help="run beside a noisy neighbour: another process loading the machine in random bursts "
                        "(this seed's), to see how fidelity holds up on a noisy machine")
    p.add_argument("--rounds", type=int, default=9,
                   help="live replays, each followed by a profile sweep, and as many twin runs; each metric "
                        "is compared as its median over the rounds (default 9: this machine's speed drifts "
                        "from minute to minute, a round now and then runs a third slow)")


def main(args: argparse.Namespace) -> int:
    console = Console()
    config = dataclasses.replace(engine_config(args), scheduler=SchedulerConfig(
        max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs))
    workload = fidelity_workload(
        args.requests, args.rate or 1.0,
        LengthDistribution(args.input_mean, 0.8, maximum=4 * args.input_mean),
        LengthDistribution(args.output_mean, 0.6, maximum=4 * args.output_mean),
        args.shared_fraction, seed=args.seed,
    )
    try:
        profile = Profile.load(args.profile) if args.profile else None
    except (OSError, ValueError) as e:
        console.print(f"[red]cannot use the profile {args.profile}: {e}[/red]")
        return 2
    grid = None if profile is not None else (QUICK_GRID if args.quick else SWEEP)
    utilisation = None if args.rate else args.utilisation
    with neighbour(args.neighbour):
        if args.neighbour is not None:
            console.print(f"with a noisy neighbour (seed {args.neighbour}): bursts of 0.5-5 s of matrix products "
                          "or memory sweeps in another process, as long apart")
        result = run_fidelity(config, workload, args.threads, grid, profile, args.clock, utilisation, console,
                              args.rounds)
    console.print(f"profile: {describe(result.profile)}")
    if args.save_profile:
        result.profile.save(args.save_profile)
    console.print(_table(result))
    _diagnose(result, console)
    if args.plots:
        console.print(f"plot: {write_fidelity_plot(result, args.plots / 'fidelity.png')}")
    misses = [c.name for c in result.comparisons if not c.passed]
    console.print(f"fidelity goal (every metric within {GOAL:.0%}, aim {AIM:.0%}): "
                  + ("PASS" if not misses else f"MISS ({', '.join(misses)})"))
    return 0


def _table(result: FidelityResult) -> Table:
    arrivals = result.workload[-1].arrival_time
    rate = (len(result.workload) - 1) / arrivals if arrivals else float("inf")
    table = Table(title=f"live engine vs twin: {len(result.workload)} requests at {rate:.2f}/s "
                        f"(twin busy {result.twin_busy_fraction:.0%}), median of {result.rounds} rounds, "
                        f"{result.live.duration_s:.1f} s live, "
                        f"prefix hit rate {result.live.prefix_hit_rate:.0%} live / "
                        f"{result.twin.prefix_hit_rate:.0%} twin")
    for column in ("metric", "live", "twin", "error", f"within {GOAL:.0%}"):
        table.add_column(column, justify="left" if column == "metric" else "right")
    for c in result.comparisons:
        table.add_row(c.name, f"{c.live:.1f}", f"{c.twin:.1f}", f"{c.error:+.1%}", "PASS" if c.passed else "MISS")
    return table


STEP_KINDS: tuple[tuple[str, str, Callable[[BatchShape], bool]], ...] = (
    ("other decode-only", "tab:blue", lambda s: not s.num_prefill_chunks and not s.num_first_decodes),
    ("decode-only with a row's first decode", "tab:green",
     lambda s: not s.num_prefill_chunks and s.num_first_decodes > 0),
    ("with a prefill chunk", "tab:orange", lambda s: s.num_prefill_chunks > 0),
)
"""The live steps by kind, as the diagnosis and the plot split them (drawn in this order, the many first)."""


def _diagnose(result: FidelityResult, console: Console) -> None:
    run = result.run
    mean_step = statistics.fmean(run.step_s) if run.step_s else float("nan")
    gap = statistics.fmean(run.gap_s) if run.gap_s else 0.0
    late = statistics.median(run.wake_late_s) if run.wake_late_s else 0.0
    console.print(
        f"live steps: {len(run.step_s)}, mean {1000 * mean_step:.1f} ms; the fitted model prices them "
        f"{result.step_model_error:+.1%} off in total; loop time between steps {1e6 * gap:.0f} us "
        f"({gap / mean_step:.2%} of a step); wake-up after an idle wait {1000 * late:.2f} ms (median, "
        f"{len(run.wake_late_s)} times); torch threads {torch.get_num_threads()}"
    )

    idle, queued = result.ttft_ratios(arrived_idle=True), result.ttft_ratios(arrived_idle=False)
    console.print(
        "by kind, the fitted model prices the live steps " + ", ".join(
            f"{name} {result.step_model_error_where(which):+.1%}" for name, _, which in STEP_KINDS) + "; "
        f"per request, twin over live TTFT (median): "
        f"{_median_text(idle)} for those arriving at an idle engine ({len(idle)}: no queueing), "
        f"{_median_text(queued)} for the others ({len(queued)})"
    )
    slowdown = sorted(result.slowdown_by_second())
    if len(slowdown) >= 2:
        p10, p90 = slowdown[len(slowdown) // 10], slowdown[len(slowdown) * 9 // 10]
        console.print(f"measured over predicted step time, second by second of the live run: p10 {p10:.2f}, "
                      f"p90 {p90:.2f} ({len(slowdown)} seconds)")
    if len(result.live_rounds) > 1:
        console.print("the twin against each live round alone: " + "; ".join(
            f"{c.name.split(' (')[0]} " + " / ".join(f"{e:+.0%}" for e in round_errors(result, c, metric))
            for c, (_, metric) in zip(result.comparisons, METRICS)))
    if result.machines and result.runs:
        live = [1 / (1 + step_error(result.profile.fit, r.steps())) for r in result.runs]
        console.print("the machine's speed round by round (step time over the merged profile's): for the twin, from "
                      "the sweeps either side " + " ".join(f"{m.scale:.2f}" for m in result.machines)
                      + "; live, measured over priced " + " ".join(f"{x:.2f}" for x in live))
    if len(result.live_rounds) >= 2:
        console.print("the live engine against itself, the odd rounds' median against the even rounds' (how much "
                      f"of any comparison this machine's noise takes): "
                      f"{_errors(result.live_rounds[0::2], result.live_rounds[1::2])}")
    if result.at_mean is not None:
        console.print(f"the twin without the slowdown series (every step at its round's mean price): "
                      f"{_errors(result.live_rounds, result.at_mean)}")
    if result.rescaled is not None:
        errors = _errors(result.live_rounds, result.rescaled)
        console.print(f"diagnostic, not a prediction: the twin with each round's step prices scaled to that "
                      f"live round's own steps: {errors}")


def round_errors(result: FidelityResult, comparison: Comparison, metric: Callable[[Summary], float]) -> list[float]:
    """The twin's median of `metric` against each live round alone (relative; rounds at 0 left out)."""
    return [(comparison.twin - metric(live)) / metric(live) for live in result.live_rounds if metric(live)]


def write_fidelity_plot(result: FidelityResult, path: Path) -> Path:
    """One PNG of the comparison: TTFT and inter-token latency CDFs of both sides (every round
    pooled), the live run's own steps measured against the fitted model's price, and each latency
    metric's error, the twin's median against every live round alone and against their median."""
    plt = pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(12, 9), dpi=110)
    sides = (("live engine", "black", result.run.records), ("twin", "tab:red", result.twin_records))
    for ax, (label, value) in zip(axes[0], (
        ("time to first token (ms)", lambda r: 1000 * r.ttft if r.first_token >= 0 else None),
        ("inter-token latency, per request (ms)", lambda r: 1000 * r.itl if r.num_output_tokens > 1 else None),
    )):
        for side, color, records in sides:
            cdf(ax, [v for v in map(value, records) if v is not None], color, side)
        log_axes(ax, "x")
        ax.set_xlabel(label)
        ax.legend(fontsize=8, loc="lower right")

    ax = axes[1][0]
    predicted = [1000 * result.profile.fit.predict(shape) for shape in result.run.shapes]
    for name, color, which in STEP_KINDS:
        steps = [(p, 1000 * s) for shape, p, s in zip(result.run.shapes, predicted, result.run.step_s) if which(shape)]
        if steps:
            ax.scatter(*zip(*steps), s=3, alpha=0.25, color=color, linewidths=0,
                       label=f"{name} ({result.step_model_error_where(which):+.1%} in total)")
    if predicted:
        line = [min(predicted), max(predicted)]
        ax.plot(line, line, color="0.3", linewidth=1, label="measured = priced")
        for factor in (0.9, 1.1):
            ax.plot(line, [factor * x for x in line], color="0.6", linewidth=0.8, linestyle="--")
        log_axes(ax, "xy")
    ax.set_xlabel("the fitted model's price of the step (ms)")
    ax.set_ylabel("the live step, measured (ms)")
    ax.set_title(f"{len(result.run.step_s):,} live steps (dashed: 10% off)", fontsize=9)
    ax.grid(True, alpha=0.3)
    legend = ax.legend(fontsize=8, loc="upper left", markerscale=4)
    for handle in legend.legend_handles:
        handle.set_alpha(1)

    ax = axes[1][1]
    latency = [(c, metric) for c, (_, metric) in zip(result.comparisons, METRICS) if "throughput" not in c.name]
    for x, (comparison, metric) in enumerate(latency):
        per_round = [100 * e for e in round_errors(result, comparison, metric)]
        ax.scatter([x] * len(per_round), per_round, s=14, color="0.55", zorder=2,
                   label="against one live round" if x == 0 else None)
        ax.scatter([x], [100 * comparison.error], s=70, marker="D", zorder=3,
                   color="tab:green" if comparison.passed else "tab:red",
                   label="median against median (the goal)" if x == 0 else None)
    ax.axhspan(-100 * GOAL, 100 * GOAL, color="tab:green", alpha=0.08)
    ax.axhline(0, color="0.3", linewidth=0.8)
    ax.set_xticks(range(len(latency)), [c.name.replace(" (ms)", "").replace("inter-token latency", "ITL")
                                        for c, _ in latency])
    ax.set_ylabel("twin over live - 1 (%)")
    ax.set_title(f"{result.rounds} live rounds, {result.draws} twin runs each; shaded: within {GOAL:.0%}", fontsize=9)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    misses = [c for c in result.comparisons if not c.passed]
    figure.suptitle(f"the twin on a profile of this engine against the live engine: {len(result.workload)} requests "
                    f"x {result.rounds} rounds, fidelity goal " + ("PASS" if not misses else "MISS"), fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path)
    plt.close(figure)
    return path


def _errors(live: list[Summary], twin: list[Summary]) -> str:
    return ", ".join(f"{c.name.split(' (')[0]} {c.error:+.1%}" for c in compare(live, twin))


def _median_text(values: list[float]) -> str:
    return f"{statistics.median(values):.2f}" if values else "n/a"
