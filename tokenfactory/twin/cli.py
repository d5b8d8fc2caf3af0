"""`tokenfactory twin replay`: run a trace through the digital twin and print what the factory did."""

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
from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import MOONCAKE_TRACE, load_trace


def add_replay_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="trace file (default: the Mooncake trace)")
    parser.add_argument("--format", choices=["auto", "mooncake", "azure"], default="auto")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h200")
    parser.add_argument("--workers", type=int, default=16, help="simulated workers (each a TP group)")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel degree of each worker")
    parser.add_argument("--precision", choices=["bf16", "fp8"], default="bf16")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide trace inter-arrival times by this")
    parser.add_argument("--limit", type=int, default=None, help="replay only the first N requests")
    parser.add_argument("--router", choices=list(ROUTERS), default="round_robin",
                        help="routing policy (control.router; kv reads the workers' KV events)")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    parser.add_argument("--max-num-batched-tokens", type=int, default=8192)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--slo-ttft", type=float, default=2.0, help="TTFT SLO for goodput (s)")
    parser.add_argument("--slo-itl", type=float, default=0.1, help="inter-token latency SLO for goodput (s)")


def replay_main(args: argparse.Namespace) -> int:
    console = Console()
    if not args.trace.is_file():
        console.print(f"[red]trace not found: {args.trace}[/red] (pass --trace FILE)")
        return 2
    workload = load_trace(args.trace, args.format, args.speedup, args.limit)
    if not workload:
        console.print("[red]the trace holds no requests[/red]")
        return 2
    config = TwinConfig(
        cost=CostModel(default_model(), get_hardware(args.hardware), args.precision, args.tp),
        num_workers=args.workers,
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens, max_num_seqs=args.max_num_seqs),
        block_size=args.block_size,
        slo=SLO(args.slo_ttft, args.slo_itl),
    )
    simulator = Simulator(config, make_router(args.router))
    last_arrival = workload[-1].arrival_time
    started = time.perf_counter()
    with Progress(
        TextColumn("simulated"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s"),
        TimeElapsedColumn(), console=console, transient=True,
    ) as progress:
        task = progress.add_task("replay", total=max(last_arrival, 1e-9))
        result = simulator.run(workload, lambda now: progress.update(task, completed=min(now, last_arrival)))
    wall = time.perf_counter() - started
    console.print(_table(result.summary, args))
    console.print(
        f"{len(workload)} requests, {result.summary.duration_s:.1f} simulated s in {wall:.1f} wall s "
        f"({result.summary.duration_s / max(wall, 1e-9):.1f} simulated s per wall s)"
    )
    return 0


def _table(s: Summary, args: argparse.Namespace) -> Table:
    table = Table(title=f"replay: {args.workers} x {args.hardware} TP{args.tp} {args.precision}, {args.router}")
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
