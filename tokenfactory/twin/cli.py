"""`tokenfactory twin replay`: run a trace or a synthetic workload through the digital twin and
print what the factory did (and, with --plots, draw latency CDFs and power over time)."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.twin.cost_model import CostModel, default_model
from tokenfactory.twin.hardware import HARDWARE, get_hardware
from tokenfactory.twin.metrics import SLO, Summary
from tokenfactory.twin.profile import Profile, ProfiledCostModel
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import (
    MOONCAKE_TRACE,
    AgenticSessions,
    ClosedLoop,
    DynamicWorkload,
    LengthDistribution,
    TraceRequest,
    load_trace,
    synthetic_workload,
)

WORKLOADS = ("trace", "poisson", "gamma", "closed-loop", "agentic")
BLOCK_SIZE = 16
"""KV block size in tokens unless --block-size (or a profile) says otherwise."""


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="trace file (default: the Mooncake trace)")
    parser.add_argument("--format", choices=["auto", "mooncake", "azure"], default="auto")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default=None,
                        help="simulated accelerator (default h200; with --profile, the power model of the "
                             "profiled machine, cpu by default)")
    parser.add_argument("--profile", type=Path, default=None, metavar="FILE",
                        help="price steps from a `tokenfactory twin profile` file of a live engine instead of the "
                             "roofline: its model, KV capacity and block size, one engine per worker (TP 1)")
    parser.add_argument("--workers", type=int, default=16, help="simulated workers (each a TP group)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each worker")
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide trace inter-arrival times by this")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--router", choices=list(ROUTERS), default="round_robin",
                        help="routing policy (control.router; kv reads the workers' KV events)")
    parser.add_argument("--block-size", type=int, default=None,
                        help="KV block size in tokens (default 16; with --profile, the profiled engine's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO for goodput (s)")
    parser.add_argument("--slo-itl", type=float, default=0.1, help="inter-token latency SLO for goodput (s)")
    parser.add_argument("--plots", type=Path, default=None, metavar="DIR",
                        help="write latency_cdf.png and power.png into DIR")
    parser.add_argument("--power-interval", type=float, default=None,
                        help="simulated seconds per fleet power sample (default: 1/240 of the arrivals' span)")
    synthetic = parser.add_argument_group("synthetic workloads (--workload other than trace)")
    synthetic.add_argument("--workload", choices=WORKLOADS, default="trace",
                           help="trace: replay --trace; poisson/gamma: open-loop arrivals at --rate; closed-loop: "
                                "--concurrency clients; agentic: multi-turn agent tasks with sub-agents")
    synthetic.add_argument("--num-requests", type=int, default=1000,
                           help="requests (poisson, gamma, closed-loop) or agent tasks (agentic)")
    synthetic.add_argument("--rate", type=float, default=10.0, help="requests/s (poisson, gamma) or tasks/s (agentic)")
    synthetic.add_argument("--burstiness", type=float, default=2.0,
                           help="gamma: coefficient of variation of the gaps between arrivals (1 = Poisson)")
    synthetic.add_argument("--input-len", type=int, default=1000, help="mean prompt tokens")
    synthetic.add_argument("--output-len", type=int, default=200, help="mean output tokens")
    synthetic.add_argument("--length-sigma", type=float, default=0.0,
                           help="lognormal sigma of the lengths (0: fixed, as benchmark clients send)")
    synthetic.add_argument("--concurrency", type=int, default=64, help="closed-loop clients")
    synthetic.add_argument("--think", type=float, default=0.0,
                           help="closed-loop: seconds between a finish and the next request; agentic: mean think time")
    add_agentic_arguments(synthetic)
    synthetic.add_argument("--seed", type=int, default=0)


def add_agentic_arguments(group: argparse._ArgumentGroup) -> None:
    """The agentic workload's shape, shared by `twin replay` and `plan` (`agentic_workload`)."""
    group.add_argument("--turns", type=int, default=6, help="agentic: mean turns per task")
    group.add_argument("--fanout-prob", type=float, default=0.2, help="agentic: chance a turn fans out sub-agents")
    group.add_argument("--fanout", type=int, default=3, help="agentic: mean sub-agents per fan-out")
    group.add_argument("--task-prompt-len", type=int, default=1500,
                       help="agentic: mean tokens of a task's own first message (after a shared 2,048-token system "
                            "prompt)")
    group.add_argument("--tool-output-len", type=int, default=600,
                       help="agentic: mean tokens entering a context before each later turn (tool results)")


def agentic_workload(args: argparse.Namespace, num_tasks: int, task_rate: float, think_s: float,
                     seed: int) -> AgenticSessions:
    """Agent tasks shaped by `add_agentic_arguments`; outputs of about --output-len per turn."""
    return AgenticSessions(
        num_tasks, task_rate,
        turns=LengthDistribution(args.turns, 0.5, maximum=10 * args.turns),
        first_prompt=LengthDistribution(args.task_prompt_len, 0.8),
        tool_output=LengthDistribution(args.tool_output_len, 1.0),
        output=LengthDistribution(args.output_len, 0.8),
        fanout_probability=args.fanout_prob,
        fanout=LengthDistribution(args.fanout, 0.5, maximum=8 * args.fanout),
        think_s=think_s,
        seed=seed,
    )


def build_workload(args: argparse.Namespace) -> list[TraceRequest] | DynamicWorkload:
    """The workload the arguments ask for (ValueError for bad parameters)."""
    sigma = args.length_sigma
    inputs, outputs = LengthDistribution(args.input_len, sigma), LengthDistribution(args.output_len, sigma)
    if args.workload == "trace":
        return load_trace(args.trace, args.format, args.speedup, args.limit)
    if args.workload in ("poisson", "gamma"):
        burstiness = 1.0 if args.workload == "poisson" else args.burstiness
        return synthetic_workload(args.rate, args.num_requests, inputs, outputs, burstiness, args.seed)
    if args.workload == "closed-loop":
        return ClosedLoop(args.concurrency, args.num_requests, inputs, outputs, args.think, args.seed)
    return agentic_workload(args, args.num_requests, args.rate, args.think if args.think else 2.0, args.seed)


def cost_model(args: argparse.Namespace) -> tuple[CostModel | ProfiledCostModel, int]:
    """The step prices the arguments ask for, and the KV block size they hold for (ValueError if
    they contradict each other or the profile cannot be read)."""
    hardware = get_hardware(_hardware_name(args))
    if args.profile is None:
        return CostModel(default_model(), hardware, args.precision, args.tp), args.block_size or BLOCK_SIZE
    if args.tp != 1:
        raise ValueError("a profile measures one engine: --tp must be 1 with --profile")
    profile = Profile.load(args.profile)
    block_size = int(profile.engine.get("block_size", BLOCK_SIZE))
    if args.block_size not in (None, block_size):
        raise ValueError(f"the profile was measured with {block_size}-token KV blocks, not {args.block_size}")
    return ProfiledCostModel.from_profile(profile, hardware), block_size


def _hardware_name(args: argparse.Namespace) -> str:
    """--hardware, or by default an H200 (the profiled machine, a CPU, with --profile)."""
    return args.hardware or ("cpu" if args.profile is not None else "h200")


def replay_main(args: argparse.Namespace) -> int:
    console = Console()
    if args.workload == "trace" and not args.trace.is_file():
        console.print(f"[red]trace not found: {args.trace}[/red] (pass --trace FILE)")
        return 2
    try:
        workload = build_workload(args)
        cost, block_size = cost_model(args)
        config = TwinConfig(
            cost=cost,
            num_workers=args.workers,
            scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                      max_num_seqs=args.max_num_seqs),
            block_size=block_size,
            slo=SLO(args.slo_ttft, args.slo_itl),
            power_interval_s=args.power_interval or _power_interval(workload),
        )
    except (OSError, ValueError) as error:
        console.print(f"[red]{error}[/red]")
        return 2
    if not isinstance(workload, DynamicWorkload) and not workload:
        console.print("[red]the workload holds no requests[/red]")
        return 2
    simulator = Simulator(config, make_router(args.router))
    # A closed-loop run's length is not known up front: its bar just counts simulated seconds.
    last_arrival = None if isinstance(workload, DynamicWorkload) else max(workload[-1].arrival_time, 1e-9)
    started = time.perf_counter()
    with Progress(
        TextColumn("simulated"), BarColumn(),
        TextColumn("{task.completed:.0f} s" if last_arrival is None else "{task.completed:.0f}/{task.total:.0f} s"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task("replay", total=last_arrival)
        advance = (lambda now: progress.update(task, completed=now)) if last_arrival is None else (
            lambda now: progress.update(task, completed=min(now, last_arrival)))
        result = simulator.run(workload, advance)
    wall = time.perf_counter() - started
    console.print(_table(result.summary, args))
    console.print(
        f"{len(result.records)} requests, {result.summary.duration_s:.1f} simulated s in {wall:.1f} wall s "
        f"({result.summary.duration_s / max(wall, 1e-9):.1f} simulated s per wall s)"
    )
    if args.plots is not None:
        from tokenfactory.twin.plots import write_replay_plots

        title = f"{args.workload}: {_setup(args)}, {len(result.records)} requests"
        for path in write_replay_plots(result, args.plots, title):
            console.print(f"wrote {path}")
    return 0


def _power_interval(workload: list[TraceRequest] | DynamicWorkload) -> float:
    """About 240 power samples over the arrivals (10 s when they are not known up front)."""
    if isinstance(workload, DynamicWorkload) or not workload:
        return 10.0
    return max(1.0, workload[-1].arrival_time / 240)


def _setup(args: argparse.Namespace) -> str:
    if args.profile is not None:
        return f"{args.workers} x the engine profiled in {args.profile.name}, {args.router}"
    return f"{args.workers} x {_hardware_name(args)} TP{args.tp} {args.precision}, {args.router}"


def _table(s: Summary, args: argparse.Namespace) -> Table:
    table = Table(title=f"replay: {_setup(args)}")
    table.add_column("metric")
    table.add_column("p50 / value", justify="right")
    table.add_column("p90", justify="right")
    table.add_column("p99", justify="right")
    for name, p in (("TTFT (s)", s.ttft), ("inter-token latency (ms)", None), ("end-to-end (s)", s.e2e)):
        if p is None:
            table.add_row(name, *(f"{1000 * v:.1f}" for v in (s.itl.p50, s.itl.p90, s.itl.p99)))
        else:
            table.add_row(name, *(f"{v:.3f}" for v in (p.p50, p.p90, p.p99)))
    rows = [
        ("requests finished / rejected", f"{s.num_finished} / {s.num_rejected}"),
        ("simulated duration (s)", f"{s.duration_s:.1f}"),
        ("output tokens/s (per GPU)", f"{s.output_tokens_per_s:.0f} ({s.output_tokens_per_s_per_gpu:.0f})"),
        ("prefix hit rate", f"{s.prefix_hit_rate:.1%}"),
        ("goodput (req/s) / SLO attainment", f"{s.goodput_rps:.2f} / {s.slo_attainment:.1%}"),
        ("energy (kJ, modeled) / J per token", f"{s.energy_j / 1e3:.0f} / {s.joules_per_token:.2f}"),
        ("$ per million tokens", f"{s.dollars_per_million_tokens:.3f}"),
        ("preemptions", str(s.num_preemptions)),
    ]
    for name, value in rows:
        table.add_row(name, value, "", "")
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tokenfactory replay", description=__doc__)
    add_replay_arguments(parser)
    return replay_main(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
