"""`tokenfactory bench disagg`: aggregated against disaggregated serving, same GPUs, in the twin.

The workload is long-prompt traffic: the Azure conversation trace with every prompt scaled up
(4x by default). Every layout of the same GPUs serves it: aggregated (every worker prefills and
decodes, chunked prefill mixing both in one step), each P:D split with every request split, and
conditional disaggregation (`control.disagg` default thresholds) at the best split.

The baseline is aggregated serving at the best of a few step token budgets (a smaller chunk
stalls the running decodes less; a larger one prefills more per step), so the split is compared
with a tuned aggregated fleet, not a strawman.

Goodput is measured DistServe-style, at the load where it differs: each layout replays the
workload at rising load (arrival times divided by each `--speedups` value) until fewer than
`--min-attainment` of its requests meet the SLO (TTFT and mean inter-token latency), then bisects
between the last load met and the first missed (`--refine` times). Its goodput
is the highest load it sustained: the offered requests/s there times the fraction meeting the
SLO. The twin's own goodput (requests meeting the SLO over the simulated time to the last
finish) is printed beside it; over a few hundred requests the drain after the last arrival
weighs on that one, the more so the higher the load, so it understates the gaps between layouts.
Issue 4's goals close the output: best split >= 1.5x aggregated, conditional >= aggregated.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenfactory.control.router import ROUTERS
from tokenfactory.twin.hardware import HARDWARE, get_hardware
from tokenfactory.twin.metrics import SLO
from tokenfactory.twin.plan import Candidate, Setup, build_simulator, scale_prompts
from tokenfactory.twin.workloads import AZURE_TRACE, TraceRequest, load_trace

GOODPUT_GOAL = 1.5
"""Issue 4: the best split gives at least this times aggregated goodput."""


@dataclass(frozen=True, slots=True)
class LoadRun:
    speedup: float
    offered_rps: float
    attainment: float
    twin_goodput_rps: float
    """The twin's `Summary.goodput_rps`: requests meeting the SLO / simulated time to the last finish."""
    ttft_p90: float
    itl_p90: float
    split_fraction: float

    @property
    def goodput_rps(self) -> float:
        """Offered requests/s that meet the SLO."""
        return self.offered_rps * self.attainment


@dataclass(frozen=True, slots=True)
class Sweep:
    """One layout at rising load; `sustained` is the highest load meeting the attainment target."""

    candidate: Candidate
    runs: list[LoadRun]
    """In the order run: the grid until the first miss, then the refinements."""
    sustained: LoadRun | None
    missed: LoadRun | None
    """The lowest load that missed (None: every load tried met the target)."""
    wall_s: float

    @property
    def goodput(self) -> float:
        return self.sustained.goodput_rps if self.sustained else 0.0

    @property
    def capped(self) -> bool:
        """It met the target at every load tried: its goodput is a lower bound."""
        return self.sustained is not None and self.missed is None

    def rank(self) -> tuple[float, float]:
        """Goodput, then the twin's goodput at that load (ties at the top of the load grid)."""
        return (self.goodput, self.sustained.twin_goodput_rps if self.sustained else 0.0)


@dataclass(frozen=True, slots=True)
class LoadSpec:
    """How to build the workload at any load (built in the process that runs it)."""

    trace: Path
    limit: int
    prompt_scale: float

    def at(self, speedup: float) -> list[TraceRequest]:
        return scale_prompts(load_trace(self.trace, speedup=speedup, limit=self.limit), self.prompt_scale)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=AZURE_TRACE, help="trace (default: Azure conversation)")
    parser.add_argument("--limit", type=int, default=400, help="requests replayed per run")
    parser.add_argument("--prompt-scale", type=float, default=4.0, help="multiply every prompt length by this")
    parser.add_argument("--gpus", type=int, default=8, help="GPUs in every layout")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h200")
    parser.add_argument("--router", choices=list(ROUTERS), default="kv",
                        help="policy of every pool (kv, the serving default: with unique prompts it balances the "
                             "queued prefill tokens, which keeps long prompts from piling up on one worker)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192,
                        help="token budget of a step in the split layouts")
    parser.add_argument("--aggregated-budgets", type=int, nargs="+", default=[2048, 8192],
                        help="step token budgets tried for aggregated serving; the best is the baseline (a smaller "
                             "chunk stalls decodes less, a larger one prefills more per step)")
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="time to first token SLO (s)")
    parser.add_argument("--slo-itl", type=float, default=0.02, help="mean inter-token latency SLO (s)")
    parser.add_argument("--min-attainment", type=float, default=0.9, help="SLO attainment a load must keep")
    parser.add_argument("--speedups", type=float, nargs="+", default=[4, 6, 8, 10, 12, 14, 16, 19, 22],
                        help="load levels: the trace's arrival times divided by each")
    parser.add_argument("--refine", type=int, default=2,
                        help="bisections between the highest load met and the lowest missed")
    parser.add_argument("--transfer-bandwidth", type=float, default=None,
                        help="KV link bytes/s per GPU (default: the hardware's interconnect)")
    parser.add_argument("--jobs", type=int, default=1, help="layouts swept in parallel processes")


def measure(candidate: Candidate, workloads: LoadSpec, speedup: float, setup: Setup) -> LoadRun:
    workload = workloads.at(speedup)
    simulator = build_simulator(candidate, setup)
    s = simulator.run(workload).summary
    span = workload[-1].arrival_time - workload[0].arrival_time
    num_split = getattr(simulator, "num_split", 0)  # the aggregated simulator splits nothing
    return LoadRun(speedup, (len(workload) - 1) / span, s.slo_attainment, s.goodput_rps, s.ttft.p90, s.itl.p90,
                   num_split / len(workload))


def sweep(candidate: Candidate, workloads: LoadSpec, speedups: list[float], refine: int, setup: Setup,
          min_attainment: float) -> Sweep:
    """Replay at each load, rising, until attainment drops below the target; then bisect
    (geometrically) between the highest load met and the lowest missed."""
    started = time.perf_counter()
    runs: list[LoadRun] = []
    sustained = missed = None
    for speedup in sorted(speedups):
        run = measure(candidate, workloads, speedup, setup)
        runs.append(run)
        if run.attainment < min_attainment:
            missed = run
            break
        sustained = run
    for _ in range(refine):
        if sustained is None or missed is None:
            break
        run = measure(candidate, workloads, math.sqrt(sustained.speedup * missed.speedup), setup)
        runs.append(run)
        if run.attainment < min_attainment:
            missed = run
        else:
            sustained = run
    return Sweep(candidate, runs, sustained, missed, time.perf_counter() - started)


def _sweep_job(job) -> Sweep:
    return sweep(*job)


def main(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 180))  # the table is wide
    if not args.trace.is_file():
        console.print(f"[red]trace not found: {args.trace}[/red] (pass --trace FILE)")
        return 2
    if (args.gpus < 2 or args.limit < 2 or args.prompt_scale <= 0 or any(s <= 0 for s in args.speedups)
            or args.refine < 0 or any(b < 1 for b in args.aggregated_budgets)):
        console.print("[red]need --gpus >= 2, --limit >= 2, a positive --prompt-scale, positive --speedups and "
                      "--aggregated-budgets, and --refine >= 0[/red]")
        return 2
    setup = Setup(get_hardware(args.hardware), slo=SLO(args.slo_ttft, args.slo_itl),
                  transfer_bandwidth=args.transfer_bandwidth)
    workloads = LoadSpec(args.trace, args.limit, args.prompt_scale)
    base = dict(tp=1, num_workers=args.gpus, router=args.router)
    aggregated = [Candidate(**base, max_num_batched_tokens=b) for b in args.aggregated_budgets]
    splits = [Candidate(**base, max_num_batched_tokens=args.max_num_batched_tokens, num_prefill=p)
              for p in range(1, args.gpus)]
    started = time.perf_counter()
    sweeps = _run(aggregated + splits, workloads, setup, args, console)
    baseline = max(sweeps[: len(aggregated)], key=Sweep.rank)
    best = max(sweeps[len(aggregated):], key=Sweep.rank)
    conditional = _run([dataclasses.replace(best.candidate, conditional=True)], workloads, setup, args, console)[0]
    sweeps.append(conditional)
    wall = time.perf_counter() - started
    console.print(_table(sweeps, baseline, args))
    console.print(
        f"goodput (DistServe-style) = offered req/s x SLO attainment at the highest load whose attainment "
        f"stays >= {args.min_attainment:.0%}; SLO: TTFT <= {args.slo_ttft:g} s and mean ITL <= "
        f"{1e3 * args.slo_itl:g} ms per request. twin goodput = requests meeting the SLO / simulated time "
        f"to the last finish, at that load. Baseline: aggregated at its best step budget "
        f"({baseline.candidate.max_num_batched_tokens} tokens). {wall:.0f} s wall", highlight=False)
    if any(s.capped for s in sweeps):
        console.print("'>=': met the target at the highest load tried (add --speedups to find its limit); "
                      "ratios against it are bounds", highlight=False)
    for line in goal_lines(baseline, best, conditional):
        console.print(line, highlight=False)
    return 0


def _run(layouts: list[Candidate], workloads: LoadSpec, setup: Setup, args, console: Console) -> list[Sweep]:
    jobs = [(c, workloads, list(args.speedups), args.refine, setup, args.min_attainment) for c in layouts]
    if args.jobs <= 1:
        results = []
        for job in jobs:
            results.append(_sweep_job(job))
            console.print(f"  {_name(job[0])}: {results[-1].wall_s:.1f} s", highlight=False)
        return results
    with ProcessPoolExecutor(args.jobs) as pool:
        return list(pool.map(_sweep_job, jobs))


def _name(candidate: Candidate) -> str:
    if candidate.num_prefill:
        return candidate.layout
    return f"aggregated, {candidate.max_num_batched_tokens}-token steps"


def _table(sweeps: list[Sweep], baseline: Sweep, args) -> Table:
    table = Table(title=(f"disaggregation: {args.limit} Azure conversation requests, prompts x{args.prompt_scale:g}, "
                         f"{args.gpus} x {args.hardware}, {args.router} router, split layouts with "
                         f"{args.max_num_batched_tokens}-token steps"))
    for column in ("layout", "sustained load", "goodput req/s", "vs agg", "SLO met", "twin goodput",
                   "TTFT p90 s", "ITL p90 ms", "split", "lowest miss: SLO met"):
        table.add_column(column, justify="left" if column == "layout" else "right", no_wrap=True)
    for s in sweeps:
        run, missed = s.sustained, s.missed
        table.add_row(
            _name(s.candidate),
            f"{'>= ' if s.capped else ''}x{run.speedup:.3g} ({run.offered_rps:.1f} req/s)" if run else "none",
            f"{s.goodput:.2f}",
            f"{s.goodput / baseline.goodput:.2f}x" if baseline.goodput else "-",
            f"{run.attainment:.1%}" if run else "-",
            f"{run.twin_goodput_rps:.2f}" if run else "-",
            f"{run.ttft_p90:.2f}" if run else "-",
            f"{1e3 * run.itl_p90:.1f}" if run else "-",
            f"{run.split_fraction:.0%}" if run else "-",
            f"x{missed.speedup:.3g}: {missed.attainment:.1%}" if missed else "none",
        )
    return table


def goal_lines(aggregated: Sweep, best: Sweep, conditional: Sweep) -> list[str]:
    def mark(ok: bool) -> str:
        return "PASS" if ok else "MISS"

    base = aggregated.goodput
    best_ratio = best.goodput / base if base else float("inf")
    cond_ratio = conditional.goodput / base if base else float("inf")
    return [
        f"{mark(best_ratio >= GOODPUT_GOAL)} best split {best.candidate.layout}: {best_ratio:.2f}x aggregated "
        f"goodput (goal >= {GOODPUT_GOAL}x)",
        f"{mark(cond_ratio >= 1.0)} conditional {conditional.candidate.layout}: {cond_ratio:.2f}x aggregated "
        "goodput (goal >= 1x)",
    ]
