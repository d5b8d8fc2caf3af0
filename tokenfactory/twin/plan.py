"""`tokenfactory plan`: search factory configurations in the twin and keep the best ones.

A configuration (`Candidate`) is a fleet layout (aggregated, or P prefill and D decode workers,
split always or conditionally), a tensor-parallel degree, batch limits and a router policy.
Every candidate that fits the GPU (or power) budget replays the workload at each load level
(`--speedups`: the trace's arrival times divided by it, or a synthetic rate times it) through the
real schedulers, KV caches and routers (`Simulator` / `DisaggregatedSimulator`). The workload is a
trace, Poisson arrivals, or agent sessions (`--workload agentic`: the twin's `AgenticSessions`,
multi-turn tasks with sub-agent fan-out and think time, which release each turn as the one before
finishes; each run starts from a fresh copy). Each (candidate, load) is a `Point` with the
factory's figures: output tokens/s per GPU and per MW, tokens/s per user (1 / median
inter-token latency), goodput, SLO attainment, $ per million tokens and joules per token.

Points whose SLO attainment reaches the target qualify. The best are ranked by goodput per
GPU; the Pareto frontier is the set of qualifying points that no other beats on both tokens/s
per GPU (or per MW) and tokens/s per user. `report.py` draws and writes them.

With `--tiers`, each tier of the factory config (its SLO, its prices) gets its own answer to
"what does it cost": a tighter SLO holds only at a lighter load, and a lighter load costs more
per token. Each point's requests are checked against every tier's SLO, and a tier's cost is the
lowest $ per million output tokens of any point where the tier's SLO holds for --min-attainment of
the requests, beside what the tier's prices charge for that point's token mix (printed, in the
HTML report, and marked on the PNG).

Prices and power come from the hardware catalog (`twin/hardware.py`); a YAML file overrides
any field of a known chip, or adds a chip with all its fields (`load_hardware_file`).
"""

from __future__ import annotations

import argparse
import builtins
import contextlib
import copy
import dataclasses
import math
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenfactory.control.disagg import DisaggConfig
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.control.tiers import (
    ConfigError,
    FactoryConfig,
    TokenUsage,
    builtin_config,
    parse_factory_config,
    price_usage,
)
from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.twin.cost_model import CostModel, default_model
from tokenfactory.twin.disagg_sim import ALWAYS_SPLIT, DisaggregatedSimulator, SplitConfig
from tokenfactory.twin.hardware import HARDWARE, Hardware
from tokenfactory.twin import report
from tokenfactory.twin.cli import add_agentic_arguments, agentic_workload
from tokenfactory.twin.metrics import SLO, RequestRecord, Summary
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import (
    AZURE_TRACE,
    DynamicWorkload,
    LengthDistribution,
    TraceRequest,
    load_trace,
    poisson_workload,
)

T = TypeVar("T")

DEFAULT_GPUS = 8
WORKLOADS = ("trace", "poisson", "agentic")
DEFAULT_LIMIT = {"trace": 200, "poisson": 200, "agentic": 50}
"""Requests (or agent tasks) per run when --limit is not given."""
DEFAULT_RATE = {"poisson": 20.0, "agentic": 0.5}
"""Requests/s (or tasks/s) at speedup 1 when --rate is not given."""
PRICED_MODEL = "default"
"""Tiers price the twin's model by their `default` price."""

Workload = list[TraceRequest] | DynamicWorkload

# --- hardware overrides -------------------------------------------------------------------------


class HardwareError(ValueError):
    """A hardware file that cannot be used; the message says where and why."""


class _HardwareFields(BaseModel):
    """One chip in a hardware file; every field optional for a known chip (an override)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str | None = None
    peak_flops_bf16: float | None = Field(None, gt=0, description="dense BF16 FLOP/s")
    peak_flops_fp8: float | None = Field(None, gt=0, description="dense FP8 FLOP/s")
    hbm_bandwidth: float | None = Field(None, gt=0, description="bytes/s")
    hbm_capacity: float | None = Field(None, gt=0, description="bytes")
    interconnect_bandwidth: float | None = Field(None, gt=0, description="bytes/s per GPU")
    tdp_w: float | None = Field(None, gt=0)
    idle_w: float | None = Field(None, ge=0)
    price_per_hour: float | None = Field(None, ge=0, description="US dollars per GPU-hour")


def load_hardware_file(path: str | Path, catalog: dict[str, Hardware] = HARDWARE) -> dict[str, Hardware]:
    """The catalog with the file's chips merged in. The file maps a chip key to fields:

        h200:                 # a known chip: only the fields given change
          price_per_hour: 2.9
        my-gpu:               # a new chip: every field
          name: My GPU
          peak_flops_bf16: 1.0e+15
          ...
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except OSError as e:
        raise HardwareError(f"cannot read hardware file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise HardwareError(f"hardware file {path} is not valid YAML: {e}") from None
    if not isinstance(data, dict) or not data:
        raise HardwareError(f"hardware file {path}: expected a mapping of chip names to fields")
    merged = dict(catalog)
    for key, fields in data.items():
        key = str(key).lower()
        try:
            given = _HardwareFields.model_validate(fields if fields is not None else {})
        except ValidationError as e:
            problems = "; ".join(f"{key}.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in e.errors())
            raise HardwareError(f"hardware file {path}: {problems}") from None
        updates = given.model_dump(exclude_none=True)
        if key in merged:
            chip = dataclasses.replace(merged[key], **updates)
        else:
            missing = [f.name for f in dataclasses.fields(Hardware) if f.name not in updates]
            if missing:
                raise HardwareError(
                    f"hardware file {path}: {key!r} is not in the catalog ({', '.join(catalog)}), "
                    f"so it needs every field; missing: {', '.join(missing)}"
                )
            chip = Hardware(**updates)
        if chip.idle_w > chip.tdp_w:
            raise HardwareError(f"hardware file {path}: {key}: idle_w ({chip.idle_w}) exceeds tdp_w ({chip.tdp_w})")
        merged[key] = chip
    return merged


# --- candidates and their figures ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Candidate:
    """One factory configuration."""

    tp: int
    num_workers: int
    """Engines (each a tensor-parallel group of `tp` GPUs)."""
    num_prefill: int = 0
    """Of those, prefill-only workers; 0: aggregated (every worker does both)."""
    conditional: bool = False
    """Split only what `control.disagg.should_split` picks (default thresholds); else every request."""
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    router: str = "kv"

    @property
    def num_gpus(self) -> int:
        return self.num_workers * self.tp

    @property
    def layout(self) -> str:
        if not self.num_prefill:
            return "aggregated"
        split = f"{self.num_prefill}P:{self.num_workers - self.num_prefill}D"
        return f"{split} conditional" if self.conditional else split

    @property
    def label(self) -> str:
        """E.g. "6P:2D TP1 kv 8192t 256s": layout, TP, router, step token budget, max sequences."""
        return f"{self.layout} TP{self.tp} {self.router} {self.max_num_batched_tokens}t {self.max_num_seqs}s"


@dataclass(frozen=True)
class Setup:
    """What every candidate shares: the model on the hardware, the SLO, the KV link."""

    hardware: Hardware
    precision: str = "bf16"
    slo: SLO = SLO()
    block_size: int = 16
    transfer_latency_s: float = SplitConfig.transfer_latency_s
    transfer_bandwidth: float | None = None
    usd_per_kwh: float = 0.0
    """Electricity price, charged on the modeled energy times `pue`; 0 leaves GPU-hours only."""
    pue: float = 1.0
    """Facility power over IT power (cooling, conversion)."""
    tier_slos: tuple[tuple[str, SLO], ...] = ()
    """(tier, its SLO): each point's requests are checked against each (`Point.tier_attainment`)."""


def build_simulator(candidate: Candidate, setup: Setup) -> Simulator:
    """The candidate's fleet, ready to run a workload."""
    config = TwinConfig(
        cost=CostModel(default_model(), setup.hardware, setup.precision, candidate.tp),
        num_workers=candidate.num_workers,
        scheduler=SchedulerConfig(max_num_batched_tokens=candidate.max_num_batched_tokens,
                                  max_num_seqs=candidate.max_num_seqs),
        block_size=setup.block_size,
        slo=setup.slo,
    )
    router = make_router(candidate.router)
    if not candidate.num_prefill:
        return Simulator(config, router)
    split = SplitConfig(
        candidate.num_prefill,
        DisaggConfig() if candidate.conditional else ALWAYS_SPLIT,
        transfer_latency_s=setup.transfer_latency_s,
        transfer_bandwidth=setup.transfer_bandwidth,
    )
    return DisaggregatedSimulator(config, split, router)


@dataclass(frozen=True, slots=True)
class Point:
    """A candidate at one load, with the figures the planner compares."""

    candidate: Candidate
    speedup: float
    offered_rps: float
    """Requests per second the workload offers at this load."""
    summary: Summary
    tokens_per_s_per_gpu: float
    tokens_per_s_per_mw: float
    """Output tokens/s over the fleet's mean modeled power (facility power with the PUE)."""
    tokens_per_s_per_user: float
    """1 / the median inter-token latency: the speed one stream sees."""
    goodput_rps: float
    goodput_rps_per_gpu: float
    slo_attainment: float
    usd_per_million_tokens: float
    joules_per_token: float
    provisioned_kw: float
    """The fleet's GPUs at TDP (times the PUE): what the budget must provision."""
    wall_s: float
    usage: TokenUsage = TokenUsage(0, 0, 0)
    """The finished requests' prompt, cached and output tokens (what tier prices apply to)."""
    tier_attainment: dict[str, float] = dataclasses.field(default_factory=dict)
    """Per tier of `Setup.tier_slos`: the share of requests meeting that tier's SLO."""


def measure(candidate: Candidate, speedup: float, workload: Workload, setup: Setup) -> Point:
    started = time.perf_counter()
    if isinstance(workload, DynamicWorkload):
        workload = copy.deepcopy(workload)  # it keeps the sessions' state: every run starts afresh
    result = build_simulator(candidate, setup).run(workload)
    summary, records = result.summary, result.records
    span = records[-1].arrival - records[0].arrival if len(records) > 1 else 0.0
    mean_power_w = setup.pue * summary.energy_j / summary.duration_s
    energy_usd = summary.joules_per_token * 1e6 / 3.6e6 * setup.pue * setup.usd_per_kwh
    per_user = 1.0 / summary.itl.p50 if summary.itl.p50 > 0 else float("nan")
    return Point(
        candidate=candidate,
        speedup=speedup,
        offered_rps=(len(records) - 1) / span if span > 0 else float("nan"),
        summary=summary,
        tokens_per_s_per_gpu=summary.output_tokens_per_s_per_gpu,
        tokens_per_s_per_mw=summary.output_tokens_per_s / (mean_power_w / 1e6) if mean_power_w else float("nan"),
        tokens_per_s_per_user=per_user,
        goodput_rps=summary.goodput_rps,
        goodput_rps_per_gpu=summary.goodput_rps / candidate.num_gpus,
        slo_attainment=summary.slo_attainment,
        usd_per_million_tokens=summary.dollars_per_million_tokens + energy_usd,
        joules_per_token=summary.joules_per_token,
        provisioned_kw=candidate.num_gpus * setup.hardware.tdp_w * setup.pue / 1e3,
        wall_s=time.perf_counter() - started,
        usage=token_usage(records),
        tier_attainment={tier: attainment(records, slo) for tier, slo in setup.tier_slos},
    )


def token_usage(records: Iterable[RequestRecord]) -> TokenUsage:
    finished = [r for r in records if r.finish >= 0]
    return TokenUsage(sum(r.num_prompt_tokens for r in finished), sum(r.num_cached_tokens for r in finished),
                      sum(r.num_output_tokens for r in finished))


def attainment(records: Sequence[RequestRecord], slo: SLO) -> float:
    """The share of finished requests within `slo` (the summary's rule, for another SLO)."""
    finished = [r for r in records if r.finish >= 0]
    good = sum(1 for r in finished if r.ttft <= slo.ttft_s and r.itl <= slo.itl_s)
    return good / len(finished) if finished else 0.0


# --- the search ---------------------------------------------------------------------------------


def gpu_budget(gpus: int | None, power_kw: float | None, hardware: Hardware, pue: float = 1.0) -> int:
    """GPUs the budget allows: the GPU count, or as many as the power budget feeds at TDP."""
    if gpus is None and power_kw is None:
        raise ValueError("give a GPU budget or a power budget")
    limit = gpus if gpus is not None else math.inf
    if power_kw is not None:
        limit = min(limit, math.floor(power_kw * 1e3 / (hardware.tdp_w * pue)))
    if limit < 1:
        raise ValueError(f"a budget of {power_kw} kW does not power one {hardware.name} at {hardware.tdp_w:.0f} W")
    return int(limit)


def candidates(
    num_gpus: int,
    tps: Iterable[int],
    prefill_fractions: Sequence[float] | None,
    max_num_seqs: Iterable[int],
    max_num_batched_tokens: Iterable[int],
    routers: Iterable[str],
    conditional: bool = False,
    aggregated: bool = True,
) -> list[Candidate]:
    """Every configuration of `num_gpus` GPUs in the grid. `prefill_fractions` None: every P:D
    split of the workers; else the splits nearest those fractions of prefill workers."""
    found: list[Candidate] = []
    for tp in tps:
        workers = num_gpus // tp
        if workers < 1:
            continue
        if prefill_fractions is None:
            prefills = list(range(1, workers))
        else:
            nearest = {min(workers - 1, max(1, round(f * workers))) for f in prefill_fractions}
            prefills = sorted(p for p in nearest if p > 0)  # one worker cannot be split
        layouts = ([(0, False)] if aggregated else []) + [(p, False) for p in prefills]
        if conditional:
            layouts += [(p, True) for p in prefills]
        for (p, cond) in layouts:
            for seqs in max_num_seqs:
                for tokens in max_num_batched_tokens:
                    for router in routers:
                        found.append(Candidate(tp, workers, p, cond, seqs, tokens, router))
    return found


def _measure_job(job: tuple[Candidate, float, Workload, Setup]) -> Point:
    return measure(*job)


def search(
    grid: list[Candidate],
    workloads: dict[float, Workload],
    setup: Setup,
    jobs: int = 1,
    on_point: Callable[[Point], None] | None = None,
) -> list[Point]:
    """Measure every candidate at every load (in `jobs` processes)."""
    work = [(c, speedup, workload, setup) for c in grid for speedup, workload in workloads.items()]
    points: list[Point] = []
    with ProcessPoolExecutor(jobs) if jobs > 1 else contextlib.nullcontext() as pool:
        for point in (pool or builtins).map(_measure_job, work):  # builtins.map: in this process
            points.append(point)
            if on_point:
                on_point(point)
    return points


def qualifying(points: Iterable[Point], min_attainment: float) -> list[Point]:
    return [p for p in points if p.slo_attainment >= min_attainment and p.summary.num_rejected == 0]


def best(points: Iterable[Point], min_attainment: float, top: int) -> list[Point]:
    """The qualifying points, most goodput per GPU first (then cheapest)."""
    ranked = sorted(qualifying(points, min_attainment),
                    key=lambda p: (-p.goodput_rps_per_gpu, p.usd_per_million_tokens))
    return ranked[:top]


def pareto_frontier(items: Iterable[T], x: Callable[[T], float], y: Callable[[T], float]) -> list[T]:
    """The items no other item beats on both `x` and `y` (higher is better), by rising `x`."""
    ordered = sorted((i for i in items if not math.isnan(x(i)) and not math.isnan(y(i))),
                     key=lambda i: (-x(i), -y(i)))
    frontier: list[T] = []
    for item in ordered:  # by falling x: keep each item that raises the best y so far
        if not frontier or y(item) > y(frontier[-1]):
            frontier.append(item)
    return frontier[::-1]


def per_user(point: Point) -> float:
    return point.tokens_per_s_per_user


Y_AXES: dict[str, tuple[str, Callable[[Point], float]]] = {
    "gpu": ("output tokens/s per GPU", lambda p: p.tokens_per_s_per_gpu),
    "mw": ("output tokens/s per MW", lambda p: p.tokens_per_s_per_mw),
}


@dataclass(frozen=True, slots=True)
class TierCost:
    """What serving one tier costs: the cheapest point where the tier's SLO holds."""

    tier: str
    slo: SLO
    point: Point | None
    """None: the SLO holds at no point searched."""
    price_usd_per_million: float
    """What the tier's prices charge for the point's token mix, per million output tokens."""

    @property
    def usd_per_million_tokens(self) -> float:
        return self.point.usd_per_million_tokens if self.point else math.nan


def tier_costs(points: Iterable[Point], tiers: FactoryConfig, names: Sequence[str], min_attainment: float
               ) -> list[TierCost]:
    """Per tier in `names`: its cheapest point by $ per million tokens among those (without
    rejections) where the tier's SLO holds for `min_attainment` of the requests."""
    points = list(points)
    costs = []
    for name in names:
        spec = tiers.tiers[name]
        meeting = [p for p in points if p.summary.num_rejected == 0 and not math.isnan(p.usd_per_million_tokens)
                   and p.tier_attainment.get(name, 0.0) >= min_attainment]
        cheapest = min(meeting, key=lambda p: p.usd_per_million_tokens, default=None)
        price = (price_usage(spec, PRICED_MODEL, cheapest.usage) * 1e6 / cheapest.usage.completion_tokens
                 if cheapest and cheapest.usage.completion_tokens else math.nan)
        costs.append(TierCost(name, SLO(spec.slo.ttft_s, spec.slo.itl_s), cheapest, price))
    return costs


# --- the command --------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=WORKLOADS, default="trace",
                      help="trace: replay --trace; poisson: arrivals at --rate (--input-len, --output-len); agentic: "
                           "agent tasks at --rate, multi-turn with sub-agents (--turns, --fanout-prob, --fanout, "
                           "--think, --task-prompt-len, --tool-output-len, --output-len)")
    work.add_argument("--trace", type=Path, default=AZURE_TRACE,
                      help="trace file (.jsonl Mooncake, .csv Azure; default: the Azure conversation trace)")
    work.add_argument("--rate", type=float, default=None,
                      help=f"at speedup 1: requests/s (poisson, default {DEFAULT_RATE['poisson']:g}) or agent tasks/s "
                           f"(agentic, default {DEFAULT_RATE['agentic']:g})")
    work.add_argument("--input-len", type=int, default=2000, help="poisson: mean prompt tokens (lognormal)")
    work.add_argument("--output-len", type=int, default=200,
                      help="poisson: mean output tokens; agentic: per turn (lognormal)")
    add_agentic_arguments(work)
    work.add_argument("--think", type=float, default=2.0, help="agentic: mean seconds between turns (exponential)")
    work.add_argument("--limit", type=int, default=None,
                      help=f"requests replayed per run (default {DEFAULT_LIMIT['trace']}), or agent tasks "
                           f"(agentic, default {DEFAULT_LIMIT['agentic']})")
    work.add_argument("--prompt-scale", type=float, default=1.0,
                      help="trace, poisson: multiply every prompt length by this")
    work.add_argument("--speedups", type=float, nargs="+", default=[4.0, 16.0, 48.0],
                      help="load levels: the trace's arrival times divided by each, or --rate times each (more "
                           "levels draw a fuller frontier)")
    hw = parser.add_argument_group("hardware and budget")
    hw.add_argument("--hardware", default="h200", help=f"catalog key ({', '.join(HARDWARE)}, or one from the file)")
    hw.add_argument("--hardware-file", type=Path, help="YAML overriding the catalog (prices, power, new chips)")
    hw.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    hw.add_argument("--gpus", type=int, help=f"GPU budget (default {DEFAULT_GPUS} without --power-kw)")
    hw.add_argument("--power-kw", type=float, help="power budget: GPUs at TDP (times --pue) must fit")
    hw.add_argument("--usd-per-kwh", type=float, default=0.0, help="electricity price added to $/Mtok")
    hw.add_argument("--pue", type=float, default=1.0, help="facility power / IT power")
    space = parser.add_argument_group("search space")
    space.add_argument("--tp", type=int, nargs="+", default=[1, 2], help="tensor-parallel degrees")
    space.add_argument("--prefill-fractions", type=float, nargs="*", default=[0.25, 0.5, 0.75],
                       help="P:D splits to try, as the prefill share of the workers (none given: every split)")
    space.add_argument("--no-disagg", action="store_true", help="aggregated layouts only")
    space.add_argument("--conditional", action="store_true", help="also try each split with conditional disaggregation")
    space.add_argument("--max-num-seqs", type=int, nargs="+", default=[256])
    space.add_argument("--max-num-batched-tokens", type=int, nargs="+", default=[8192])
    space.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=["kv"])
    slo = parser.add_argument_group("service level")
    slo.add_argument("--slo-ttft", type=float, default=2.0, help="time to first token (s)")
    slo.add_argument("--slo-itl", type=float, default=0.05, help="mean inter-token latency per request (s)")
    slo.add_argument("--min-attainment", type=float, default=0.9,
                     help="share of requests that must meet the SLO for a point to qualify")
    slo.add_argument("--tiers", nargs="+", metavar="TIER",
                     help="also report each tier's $ per million tokens where its own SLO holds (tiers of "
                          "--factory-config, default: flex default priority)")
    slo.add_argument("--factory-config", type=Path, metavar="YAML",
                     help="the tiers' SLOs and prices (default: the built-in tiers)")
    out = parser.add_argument_group("output")
    out.add_argument("--top", type=int, default=10, help="best configurations to print")
    out.add_argument("--frontier", choices=list(Y_AXES), default="gpu",
                     help="Pareto frontier of tokens/s per GPU or per MW against tokens/s per user")
    out.add_argument("--out", type=Path, default=Path("out/plan"), help="folder for plan.png and plan.html")
    out.add_argument("--jobs", type=int, default=1, help="simulations run in parallel processes")


def build_workloads(args: argparse.Namespace) -> dict[float, Workload]:
    """The workload at each load level, prompts scaled (ValueError for bad parameters)."""
    if any(s <= 0 for s in args.speedups):
        raise ValueError("--speedups must be positive")
    limit, rate = limit_and_rate(args)
    if limit < 1:
        raise ValueError("--limit must be at least 1")
    if args.prompt_scale <= 0:
        raise ValueError("--prompt-scale must be positive")
    if args.workload != "trace" and rate <= 0:
        raise ValueError("--rate must be positive")
    if args.workload == "agentic" and args.prompt_scale != 1.0:
        raise ValueError("--prompt-scale applies to trace and poisson workloads; agentic prompts grow with "
                         "--task-prompt-len and --tool-output-len")
    workloads: dict[float, Workload] = {}
    for speedup in args.speedups:
        if args.workload == "agentic":
            workloads[speedup] = agentic_workload(args, limit, rate * speedup, args.think, seed=0)
            continue
        if args.workload == "poisson":
            base = poisson_workload(rate * speedup, limit, LengthDistribution(args.input_len, 0.8),
                                    LengthDistribution(args.output_len, 0.8), seed=0)
        else:
            base = load_trace(args.trace, speedup=speedup, limit=limit)
        workloads[speedup] = scale_prompts(base, args.prompt_scale)
    return workloads


def limit_and_rate(args: argparse.Namespace) -> tuple[int, float]:
    """Requests (or tasks) per run and their rate at speedup 1, defaults filled in per workload."""
    limit = args.limit if args.limit is not None else DEFAULT_LIMIT[args.workload]
    return limit, args.rate if args.rate is not None else DEFAULT_RATE.get(args.workload, 0.0)


def load_tiers(args: argparse.Namespace) -> FactoryConfig:
    """The factory config's tiers (ValueError when a file or a --tiers name does not fit)."""
    if args.factory_config is None:
        tiers = builtin_config()
    else:
        try:
            tiers = parse_factory_config(args.factory_config.read_text(), str(args.factory_config))
        except OSError as e:
            raise ValueError(f"cannot read factory config {args.factory_config}: {e.strerror}") from None
        except ConfigError as e:
            raise ValueError(str(e)) from None
    unknown = [t for t in args.tiers or () if t not in tiers.tiers]
    if unknown:
        raise ValueError(f"--tiers: {', '.join(unknown)} not among the tiers {', '.join(tiers.tiers)}")
    return tiers


def scale_prompts(workload: list[TraceRequest], factor: float) -> list[TraceRequest]:
    if factor == 1.0:
        return workload
    return [dataclasses.replace(r, input_length=max(1, round(r.input_length * factor))) for r in workload]


def main(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 160))  # the tables are wide
    try:
        catalog = load_hardware_file(args.hardware_file) if args.hardware_file else HARDWARE
        hardware = catalog.get(args.hardware.lower())
        if hardware is None:
            raise ValueError(f"unknown hardware {args.hardware!r}; known: {', '.join(catalog)}")
        if args.workload == "trace" and not args.trace.is_file():
            raise ValueError(f"trace not found: {args.trace} (pass --trace FILE or --workload poisson|agentic)")
        if not 0 <= args.min_attainment <= 1:
            raise ValueError("--min-attainment must be in [0, 1]")
        if args.gpus is not None and args.gpus < 1 or any(tp < 1 for tp in args.tp) or args.pue < 1:
            raise ValueError("need --gpus >= 1, every --tp >= 1 and --pue >= 1")
        gpus = DEFAULT_GPUS if args.gpus is None and args.power_kw is None else args.gpus
        num_gpus = gpu_budget(gpus, args.power_kw, hardware, args.pue)
        workloads = build_workloads(args)
        tiers = load_tiers(args)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    tier_names = list(args.tiers or ())
    setup = Setup(hardware, args.precision, SLO(args.slo_ttft, args.slo_itl), usd_per_kwh=args.usd_per_kwh,
                  pue=args.pue, tier_slos=tuple((t, SLO(tiers.tiers[t].slo.ttft_s, tiers.tiers[t].slo.itl_s))
                                                for t in tier_names))
    grid = candidates(num_gpus, args.tp, args.prefill_fractions or None, args.max_num_seqs,
                      args.max_num_batched_tokens, args.routers, args.conditional, aggregated=True)
    if args.no_disagg:
        grid = [c for c in grid if not c.num_prefill]
    grid = [c for c in grid if fits(c, setup)]
    if not grid:
        console.print(f"[red]no configuration of {num_gpus} x {hardware.name} holds the model[/red]")
        return 2
    started = time.perf_counter()
    total = len(grid) * len(workloads)
    with Progress(TextColumn("simulating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.description}"),
                  TimeElapsedColumn(), console=console, transient=True) as progress:
        task = progress.add_task("", total=total)
        points = search(grid, workloads, setup, args.jobs,
                        lambda p: progress.update(task, advance=1, description=p.candidate.label))
    wall = time.perf_counter() - started
    label, y = Y_AXES[args.frontier]
    top = best(points, args.min_attainment, args.top)
    frontier = pareto_frontier(qualifying(points, args.min_attainment), per_user, y)
    title = (f"plan: {num_gpus} x {hardware.name} {args.precision}, {len(grid)} configurations x "
             f"{len(workloads)} loads, SLO TTFT {args.slo_ttft:g} s / ITL {1e3 * args.slo_itl:g} ms "
             f"at {args.min_attainment:.0%}")
    console.print(report.points_table(top, title + " - best by goodput per GPU"))
    if not top:
        console.print("[yellow]no configuration meets the SLO at any load: relax the SLO or add load levels[/yellow]")
    console.print(report.points_table(frontier, f"Pareto frontier: {label} against tokens/s per user"))
    costs = tier_costs(points, tiers, tier_names, args.min_attainment)
    if costs:
        console.print(report.tier_table(costs, args.min_attainment))
    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "plan.png"
    report.draw_frontier(points, frontier, args.min_attainment, y, label, png, title, costs)
    page = args.out / "plan.html"
    page.write_text(report.html_report(title, describe_inputs(args, hardware, num_gpus), points, top, frontier,
                                       args.min_attainment, png, costs))
    console.print(f"{total} simulations in {wall:.1f} s; wrote {png} and {page}", highlight=False)
    return 0


def fits(candidate: Candidate, setup: Setup) -> bool:
    """Whether the model's weights fit the candidate's tensor-parallel group."""
    try:
        CostModel(default_model(), setup.hardware, setup.precision, candidate.tp).kv_capacity_tokens()
    except ValueError:
        return False
    return True


def describe_inputs(args: argparse.Namespace, hardware: Hardware, num_gpus: int) -> list[tuple[str, str]]:
    limit, rate = limit_and_rate(args)
    workload = {
        "trace": f"{Path(args.trace).name}, first {limit} requests",
        "poisson": f"synthetic Poisson, {rate:g} req/s x speedup, {limit} requests, prompts ~{args.input_len}, "
                   f"outputs ~{args.output_len}",
        "agentic": f"{limit} agent tasks at {rate:g} tasks/s x speedup, ~{args.turns} turns, fan-out "
                   f"{args.fanout_prob:g} x ~{args.fanout} sub-agents, think ~{args.think:g} s, first prompt "
                   f"~{args.task_prompt_len} + 2048 shared, per turn ~{args.tool_output_len} tool tokens in and "
                   f"~{args.output_len} out",
    }[args.workload]
    return [
        ("workload", f"{workload}, prompts x{args.prompt_scale:g}, speedups {', '.join(f'{s:g}' for s in args.speedups)}"),
        ("model", "Llama-3.1-8B shape"),
        ("hardware", f"{hardware.name}: {hardware.peak_flops_bf16 / 1e12:.0f} BF16 TFLOP/s, "
                     f"{hardware.hbm_bandwidth / 1e12:.2f} TB/s, {hardware.hbm_capacity / 2**30:.0f} GiB, "
                     f"TDP {hardware.tdp_w:.0f} W, idle {hardware.idle_w:.0f} W, ${hardware.price_per_hour:.2f}/GPU-h"),
        ("budget", f"{num_gpus} GPUs ({num_gpus * hardware.tdp_w * args.pue / 1e3:.1f} kW provisioned at TDP, PUE {args.pue:g})"),
        ("SLO", f"TTFT <= {args.slo_ttft:g} s and mean ITL <= {1e3 * args.slo_itl:g} ms for "
                f"{args.min_attainment:.0%} of requests"),
    ]
