"""`tokenfactory bench power` and `bench energy`: the power governor and energy-aware clocks in the twin.

`bench power` replays the Azure conversation trace with service tiers (flex / default / priority
by fractions, by seed) on a fleet whose static power cap binds near the trace's peak, twice in
one run: without a grid event, and with a cut (25% for 3 h, ramped in over 15 min before its
start and out after its end). The default fleet is 2 workers of Llama-3.1-70B on 4 H100s each,
at the trace's own rate (speedup 1): the uncut run's peak 1-second fleet power comes close to
the static cap (its maximum: 2 x 4 x 700 W), so the load needs the full budget, and the cut
must cost something. The trace spans about an hour, so it is tiled (repeated back to back, each
copy's prompts unique) to cover the lead, the ramps, the cut and a tail; the tiling is printed.
The cut run is made with each of the governor's levers (`--levers`): token budgets per step,
pacing (`GovernorConfig.pacing`, the default live too: whole steps started when a bucket of energy
credit allows, idle rests between them, `--pace-burst` seconds of full-power steps kept for the
protected tier's prompts) and GPU power caps (`GovernorConfig.gpu_power_caps`, NVML caps, off by
default live), all with the same tier shedding. It checks: fleet power / budget at every
1-second sample from the end of the ramp-in to the start of the ramp-out (PASS if never above
1.0), `priority` SLO attainment in the cut run (PASS if >= 99%), and prints what each tier lost in
tokens and revenue against the uncut run. (With token budgets alone the power holds but
`priority` TTFT falls short of 99%. The scheduler spends a short budget on the highest tier
first, yet in the default setup the cut leaves each worker about 54 tokens a step, and a step of
few tokens still reads all the weights (about 14 ms): a prompt longer than about 2,000 tokens
needs more steps than fit in `priority`'s 0.5 s TTFT target, whatever the order. A cap lowers
the clock instead and keeps the steps whole; pacing keeps them whole and idles between them. The
trace has many prompts of 4,000-4,200 tokens, about a third of a second of full-power steps:
paced with a rest after every step they take close to `priority`'s 0.5 s, so pacing keeps
credit for them and runs their chunks back to back, paying for it with a lower pace for the
lower tiers.)

`bench energy` replays the trace on the same fleet twice: every worker at its maximum SM clock,
and energy-aware (each worker's clock re-picked every second by `twin.clocks.pick_clock`, the
lowest level whose predicted step keeps the SLO). It compares joules per output token at SLO
attainment within 1 point (PASS if >= 25% lower). Power in both comes from `twin.clocks`'s
activity model, whose assumptions that module states.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenfactory.control.governor import PACE_BURST_S, GovernorConfig, GridEvent
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.control.tiers import builtin_config
from tokenfactory.engine.config import ModelConfig, SchedulerConfig
from tokenfactory.twin.clocks import CLOCK_LEVELS, ClockedCostModel
from tokenfactory.twin.cost_model import LLAMA_3_8B, LLAMA_3_70B, CostModel
from tokenfactory.twin.hardware import HARDWARE, get_hardware
from tokenfactory.twin.metrics import SLO
from tokenfactory.twin.power_sim import ClockPolicy, PowerRun, PowerSimulator, assign_tiers, worker_power
from tokenfactory.twin.simulator import TwinConfig
from tokenfactory.twin.workloads import AZURE_TRACE, TraceRequest, load_azure

MODELS = {"8b": LLAMA_3_8B, "70b": LLAMA_3_70B}
LEVERS = {"tokens": "token budgets", "pace": "pacing", "caps": "GPU caps"}
TIER_FRACTIONS = {"flex": 0.3, "default": 0.5, "priority": 0.2}


def add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=AZURE_TRACE, help="Azure conversation trace (CSV)")
    parser.add_argument("--limit", type=int, default=None, help="requests of the trace per tile (quick runs)")
    parser.add_argument("--model", choices=sorted(MODELS), default="70b")
    parser.add_argument("--tp", type=int, default=4, help="GPUs per worker (tensor parallel)")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h100")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--speedup", type=float, default=1.0, help="the trace's arrival times divided by this")
    parser.add_argument("--router", choices=list(ROUTERS), default="kv")
    parser.add_argument("--seed", type=int, default=0, help="seed of the tier assignment")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--hours", type=float, default=3.0, help="how long the cut holds")
    parser.add_argument("--cut", type=float, default=0.25, help="share of the static cap the grid event removes")
    parser.add_argument("--ramp-min", type=float, default=15.0, help="ramp in before the cut and out after it")
    parser.add_argument("--lead-min", type=float, default=15.0, help="simulated minutes before the ramp starts")
    parser.add_argument("--cap-w", type=float, default=None, help="static cap, watts (default: the fleet's maximum)")
    parser.add_argument("--levers", choices=(*LEVERS, "all"), default="all",
                        help="the cut run's levers: token budgets per step, pacing (whole steps and idle rests, "
                             "no NVML needed; the default live), GPU power caps (NVML, off by default live), "
                             "or one run of each")
    parser.add_argument("--pace-burst", type=float, default=PACE_BURST_S,
                        help="pacing: credit kept for the protected tier's prompts, seconds of full-power steps")


def add_energy_arguments(parser: argparse.ArgumentParser) -> None:
    add_common(parser)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT target (s) the clock policy keeps")
    parser.add_argument("--slo-itl", type=float, default=0.1, help="inter-token latency target (s)")
    parser.add_argument("--headroom", type=float, default=0.5,
                        help="the policy's predicted step must fit in this share of the targets")


def tile(trace: list[TraceRequest], until_s: float) -> list[TraceRequest]:
    """The trace repeated back to back until `until_s` (one mean gap between copies); every copy's
    prompts stay unique."""
    if not trace:
        raise ValueError("an empty trace cannot be tiled")
    span = trace[-1].arrival_time - trace[0].arrival_time
    period = span + (span / max(1, len(trace) - 1) if len(trace) > 1 else 1.0)
    out: list[TraceRequest] = []
    for copy in range(max(1, math.ceil(until_s / period))):
        out += [replace(r, arrival_time=r.arrival_time + copy * period, uid=r.uid + copy * len(trace))
                for r in trace if r.arrival_time + copy * period < until_s or r is trace[0]]
    return out


def _cost(args: argparse.Namespace) -> ClockedCostModel:
    return ClockedCostModel(CostModel(ModelConfig.from_dict(MODELS[args.model]), get_hardware(args.hardware),
                                      tp=args.tp))


def _twin(args: argparse.Namespace, cost: ClockedCostModel) -> TwinConfig:
    return TwinConfig(cost, num_workers=args.workers,
                      scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=256))


def _check(args: argparse.Namespace, console: Console) -> bool:
    if not args.trace.is_file():
        console.print(f"[yellow]skipped: the Azure conversation trace is not at {args.trace}[/yellow] (pass --trace)")
        return False
    if args.workers < 1 or args.tp < 1 or args.speedup <= 0 or (args.limit is not None and args.limit < 2):
        raise SystemExit("need --workers >= 1, --tp >= 1, --speedup > 0 and --limit >= 2")
    return True


def _verdict(ok: bool) -> str:
    return "[green]PASS[/green]" if ok else "[red]MISS[/red]"


def main(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 120))
    if not _check(args, console):
        return 0
    if args.hours <= 0 or not 0 < args.cut < 1 or args.ramp_min < 0 or args.lead_min < 0 or args.pace_burst < 0:
        console.print("[red]need --hours > 0, --cut in (0, 1), --ramp-min >= 0, --lead-min >= 0 "
                      "and --pace-burst >= 0[/red]")
        return 2
    cost = _cost(args)
    twin = _twin(args, cost)
    fleet_max = args.workers * worker_power(cost, twin.scheduler.max_num_batched_tokens).max_w
    cap = args.cap_w or fleet_max
    ramp, hold = args.ramp_min * 60, args.hours * 3600
    start = args.lead_min * 60 + ramp
    event = GridEvent(start, hold, args.cut, ramp_s=ramp, name="grid cut")
    trace = load_azure(args.trace, args.speedup, args.limit)
    workload = tile(trace, start + hold + ramp + args.lead_min * 60)
    tiers = assign_tiers(len(workload), TIER_FRACTIONS, args.seed)
    console.print(f"{len(trace)} trace requests over {trace[-1].arrival_time / 60:.1f} min (speedup {args.speedup:g}), "
                  f"tiled {math.ceil(len(workload) / len(trace))}x to {len(workload)} requests over "
                  f"{workload[-1].arrival_time / 3600:.2f} h; {args.workers} workers x {args.tp} {cost.hardware.name} "
                  f"({args.model}); static cap {cap:.0f} W; cut {args.cut:.0%} for {args.hours:g} h from "
                  f"{start / 60:.0f} min, ramps {args.ramp_min:g} min")
    levers = list(LEVERS.values()) if args.levers == "all" else [LEVERS[args.levers]]
    runs: dict[str, PowerRun] = {}
    for name in ["no cut", *levers]:
        started = time.perf_counter()
        governor = GovernorConfig(cap, gpu_power_caps=name == "GPU caps", pacing=name == "pacing",
                                  pace_burst_s=args.pace_burst)
        simulator = PowerSimulator(twin, make_router(args.router), builtin_config(), governor,
                                   () if name == "no cut" else (event,), tiers)
        runs[name] = simulator.run_power(workload)
        console.print(f"  {name}: simulated in {time.perf_counter() - started:.0f} s")
    base = runs["no cut"]
    peak = max(s.power_w for s in base.samples) / cap
    console.print(f"uncut run: peak 1-s fleet power {peak:.1%} of the static cap; "
                  f"p50 {_median([s.power_w for s in base.samples]) / cap:.1%}")
    for name in levers:
        cut = runs[name]
        console.print(_tier_table(base, cut, name))
        held = cut.max_power_over_budget(start, start + hold)
        after_ramp = [s for s in cut.samples if start <= s.at < start + hold]
        priority = cut.tiers["priority"].slo_attainment
        console.print(f"{_verdict(held <= 1.0 + 1e-9)} ({name}) fleet power / budget, max over {len(after_ramp)} "
                      f"1-s samples during the cut after the ramp: {held:.3f} (<= 1.0)")
        console.print(f"{_verdict(priority >= 0.99)} ({name}) priority SLO attainment with the cut: {priority:.2%} "
                      f"(>= 99%; {base.tiers['priority'].slo_attainment:.2%} without it)")
    return 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2] if ordered else math.nan


def _tier_table(base: PowerRun, cut: PowerRun, levers: str) -> Table:
    table = Table(title=f"by tier: without the cut -> with it ({levers})")
    for column in ("tier", "requests", "shed", "SLO attainment", "output tokens", "tokens lost (in + out)", "revenue $",
                   "revenue lost $"):
        table.add_column(column, justify="right")
    for name in base.tiers:
        b, c = base.tiers[name], cut.tiers[name]
        lost = (b.prompt_tokens + b.output_tokens) - (c.prompt_tokens + c.output_tokens)
        table.add_row(name, str(b.requests), f"{b.shed} -> {c.shed}",
                      f"{b.slo_attainment:.2%} -> {c.slo_attainment:.2%}", f"{b.output_tokens:,} -> {c.output_tokens:,}",
                      f"{lost:,}", f"{b.revenue_usd:.2f} -> {c.revenue_usd:.2f}", f"{b.revenue_usd - c.revenue_usd:.2f}")
    return table


def main_energy(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 120))
    if not _check(args, console):
        return 0
    if args.slo_ttft <= 0 or args.slo_itl <= 0 or not 0 < args.headroom <= 1:
        console.print("[red]need positive SLO targets and --headroom in (0, 1][/red]")
        return 2
    cost = _cost(args)
    slo = SLO(args.slo_ttft, args.slo_itl)
    twin = replace(_twin(args, cost), slo=slo)
    workload = load_azure(args.trace, args.speedup, args.limit)
    tiers = ["default"] * len(workload)
    policies = {"max clock": None, "energy-aware": ClockPolicy(args.slo_itl, args.slo_ttft, CLOCK_LEVELS, args.headroom)}
    runs: dict[str, PowerRun] = {}
    for name, policy in policies.items():
        started = time.perf_counter()
        simulator = PowerSimulator(twin, make_router(args.router), builtin_config(), GovernorConfig(math.inf), (),
                                   tiers, clocks=policy, use_governor=False)
        runs[name] = simulator.run_power(workload)
        console.print(f"  {name}: simulated in {time.perf_counter() - started:.0f} s")
    table = Table(title=f"{len(workload)} requests, {args.workers} workers x {args.tp} {cost.hardware.name} ({args.model}), "
                        f"SLO TTFT {slo.ttft_s:g} s, ITL {slo.itl_s:g} s")
    for column in ("policy", "J / output token", "mean power W", "SLO attainment", "TTFT p99 s", "ITL p99 s",
                   "worker time by clock"):
        table.add_column(column, justify="right")
    for name, run in runs.items():
        s = run.result.summary
        total = sum(run.clock_seconds.values()) or 1.0
        clocks = " ".join(f"{c:g}:{t / total:.0%}" for c, t in sorted(run.clock_seconds.items()) if t > 0)
        table.add_row(name, f"{run.joules_per_token:.3f}", f"{s.energy_j / s.duration_s:.0f}",
                      f"{s.slo_attainment:.2%}", f"{s.ttft.p99:.3f}", f"{s.itl.p99:.4f}", clocks)
    console.print(table)
    top, aware = runs["max clock"], runs["energy-aware"]
    saving = 1 - aware.joules_per_token / top.joules_per_token
    gap = top.result.summary.slo_attainment - aware.result.summary.slo_attainment
    console.print(f"{_verdict(gap <= 0.01)} SLO attainment within 1 point of always-maximum: {gap * 100:+.2f} points lost")
    console.print(f"{_verdict(saving >= 0.25 and gap <= 0.01)} joules per token {saving:.1%} lower than always-maximum (>= 25%)")
    return 0
