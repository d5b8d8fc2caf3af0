"""`tokenfactory bench routing`: the routing policies side by side in the digital twin.

Every policy in `control.router.ROUTERS` replays the same Mooncake requests on the same simulated
fleet (default 16 H200 workers with their physical KV capacity), in this process, through the real
router objects, schedulers and KV caches. The table gives each policy's prefix hit rate, that rate
over round robin's and over the shared-LRU bound, the busiest worker's computed tokens (prefill +
decode, the whole run: the goal's load measure) and busy time over the fleet's mean, and TTFT
p50 / p99. For the kv policy it also says where hits were lost: prompt tokens it sent away from
the worker caching them (for load), and how many workers hold each cached block at the end
(duplicated prefixes take room the bound's single cache would use for others).

The bound is one LRU prefix cache holding the whole fleet's blocks, fed every prompt in arrival
order: what routing could at best reach if the fleet's caches were one. It is measured on the
same block hashes the engines use, with the engine's rules (only full blocks, never a prompt's
last token, a request's tail blocks evicted before its head).

Issue 4's goals are checked at the end, each marked PASS or MISS.
"""

from __future__ import annotations

import argparse
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenfactory.control.router import ROUTERS, make_router
from tokenfactory.engine.kv_cache import prompt_block_hashes
from tokenfactory.twin.cost_model import CostModel, default_model
from tokenfactory.twin.hardware import HARDWARE, get_hardware
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import MOONCAKE_TRACE, TraceRequest, block_reuse, load_mooncake, prompt_token_ids

DEFAULT_LIMIT = 2000
"""Requests replayed without --full: all policies together take about a minute on 2 cores."""
BASELINE = "round_robin"


@dataclass(frozen=True, slots=True)
class RouterRun:
    name: str
    prefix_hit_rate: float
    busiest_over_mean: float
    """The most tokens one worker computed (prefill + decode) over the fleet's mean."""
    ttft_p50: float
    ttft_p99: float
    num_finished: int
    wall_s: float
    busiest_time_over_mean: float = 1.0
    """The same for the time each worker spent stepping (a decode token costs more than a
    prefill token, so this can differ from the token measure)."""
    forgone_fraction: float = 0.0
    """Prompt tokens the index saw cached on another worker than the chosen one, over all
    prompt tokens: what the policy gave up for load."""
    copies_per_block: float = 0.0
    """Workers holding each cached block at the end (1.0: no prefix cached twice); 0 without an index."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trace", type=Path, default=MOONCAKE_TRACE, help="Mooncake JSONL trace")
    parser.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="replay the first N requests")
    parser.add_argument("--full", action="store_true", help="replay the whole trace (ignores --limit)")
    parser.add_argument("--workers", type=int, default=16, help="simulated workers")
    parser.add_argument("--hardware", choices=sorted(HARDWARE), default="h200")
    parser.add_argument("--kv-tokens-per-worker", type=int, default=None,
                        help="shrink each worker's KV cache to this many tokens (default: physical)")
    parser.add_argument("--speedup", type=float, default=1.0, help="divide inter-arrival times by this")
    parser.add_argument("--block-size", type=int, default=16, help="KV block size in tokens")
    parser.add_argument("--routers", nargs="+", choices=list(ROUTERS), default=list(ROUTERS))
    parser.add_argument("--kv-work-weight", type=float, default=None,
                        help="the kv policy's work_weight (its default if omitted): higher keeps more hits")
    parser.add_argument("--kv-balance-weight", type=float, default=None,
                        help="the kv policy's balance_weight (its default if omitted): higher evens load")


def shared_lru_hit_rate(workload: list[TraceRequest], num_blocks: int, block_size: int) -> float:
    """Prompt tokens served from one LRU prefix cache of `num_blocks` blocks fed every prompt in
    order, over all prompt tokens."""
    lru: OrderedDict[int, None] = OrderedDict()
    hit_tokens = prompt_tokens = 0
    for trace in workload:
        hashes = prompt_block_hashes(prompt_token_ids(trace), block_size)
        usable = (trace.input_length - 1) // block_size  # the last token is always computed
        num_hits = 0
        while num_hits < usable and hashes[num_hits] in lru:
            num_hits += 1
        hit_tokens += num_hits * block_size
        prompt_tokens += trace.input_length
        for block_hash in reversed(hashes):  # the head ends most recent: the tail goes first
            lru[block_hash] = None
            lru.move_to_end(block_hash)
        while len(lru) > num_blocks:
            lru.popitem(last=False)
    return hit_tokens / prompt_tokens if prompt_tokens else 0.0


def run_router(name: str, config: TwinConfig, workload: list[TraceRequest], **router_kwargs) -> RouterRun:
    started = time.perf_counter()
    router = make_router(name, **router_kwargs)
    simulator = Simulator(config, router)
    result = simulator.run(workload)
    s = result.summary
    prompt_tokens = sum(r.input_length for r in workload)
    return RouterRun(
        name, s.prefix_hit_rate, _busiest_over_mean([w.num_tokens_computed for w in result.workers]),
        s.ttft.p50, s.ttft.p99, s.num_finished, time.perf_counter() - started,
        busiest_time_over_mean=_busiest_over_mean([w.busy_s for w in result.workers]),
        forgone_fraction=router.metrics.forgone_overlap_tokens / prompt_tokens if prompt_tokens else 0.0,
        copies_per_block=simulator.index.copies_per_block() if simulator.index is not None else 0.0,
    )


def _busiest_over_mean(loads: list[float]) -> float:
    mean = sum(loads) / len(loads)
    return max(loads) / mean if mean else 1.0


def servable(workload: list[TraceRequest], max_model_len: int, capacity_tokens: int) -> list[TraceRequest]:
    """The requests a worker accepts (the scheduler rejects the rest), so that every policy and
    the bound see the same prompts."""
    return [
        r for r in workload
        if r.input_length <= max_model_len and min(r.input_length + r.output_length, max_model_len) <= capacity_tokens
    ]


def main(args: argparse.Namespace) -> int:
    console = Console(width=max(Console().width, 120))
    if not args.trace.is_file():
        console.print(f"[red]trace not found: {args.trace}[/red] (pass --trace FILE)")
        return 2
    kv_weights = {"work_weight": args.kv_work_weight, "balance_weight": args.kv_balance_weight}
    kv_kwargs = {key: value for key, value in kv_weights.items() if value is not None}
    if any(value < 0 for value in kv_kwargs.values()):
        console.print(f"[red]the kv weights must be >= 0, got {kv_kwargs}[/red]")
        return 2
    cost = CostModel(default_model(), get_hardware(args.hardware))
    num_blocks = (
        args.kv_tokens_per_worker // args.block_size if args.kv_tokens_per_worker else cost.kv_num_blocks(args.block_size)
    )
    config = TwinConfig(cost, num_workers=args.workers, block_size=args.block_size, num_blocks=num_blocks)
    loaded = load_mooncake(args.trace, args.speedup, None if args.full else args.limit)
    workload = servable(loaded, cost.model.max_position_embeddings, num_blocks * args.block_size)
    if not workload:
        console.print("[red]no servable requests in the trace[/red]")
        return 2
    bound = shared_lru_hit_rate(workload, num_blocks * args.workers, args.block_size)
    runs = {}
    for name in args.routers:
        runs[name] = run_router(name, config, workload, **(kv_kwargs if name == "kv" else {}))
        console.print(f"  {name}: {runs[name].wall_s:.1f} s", highlight=False)
    console.print(_table(runs, bound, args, len(workload), len(loaded) - len(workload), num_blocks))
    for line in goal_lines(runs, bound):
        console.print(line, highlight=False)
    if "kv" in runs:
        kv = runs["kv"]
        console.print(f"kv: prompt tokens cached elsewhere but routed away for load {kv.forgone_fraction:.2%}; "
                      f"cached copies per block at the end {kv.copies_per_block:.2f}", highlight=False)
    reuse = block_reuse(workload)
    unlimited = shared_lru_hit_rate(workload, 10**15, args.block_size)
    console.print(f"sanity, unlimited shared cache: {reuse.block_fraction:.1%} of these prompts' blocks are reuses "
                  f"by the trace's hash_ids ({reuse.token_fraction:.1%} of tokens); through the real KV block "
                  f"hashes {unlimited:.1%} of tokens", highlight=False)
    return 0


def _table(runs: dict[str, RouterRun], bound: float, args, num_requests: int, num_dropped: int, num_blocks: int) -> Table:
    title = (
        f"routing: {num_requests} Mooncake requests ({num_dropped} unservable dropped), {args.workers} x "
        f"{args.hardware}, {num_blocks * args.block_size} KV tokens per worker"
    )
    table = Table(title=title)
    columns = ("router", "hit rate", "vs RR", "vs bound", "max/mean load", "max/mean busy", "TTFT p50 s",
               "TTFT p99 s", "done")
    for column in columns:
        table.add_column(column, justify="left" if column == "router" else "right")
    baseline = runs.get(BASELINE)
    for run in runs.values():
        versus = f"{run.prefix_hit_rate / baseline.prefix_hit_rate:.2f}x" if baseline and baseline.prefix_hit_rate else "-"
        table.add_row(
            run.name, f"{run.prefix_hit_rate:.1%}", versus, f"{run.prefix_hit_rate / bound:.1%}" if bound else "-",
            f"{run.busiest_over_mean:.2f}", f"{run.busiest_time_over_mean:.2f}", f"{run.ttft_p50:.3f}",
            f"{run.ttft_p99:.3f}", str(run.num_finished),
        )
    table.add_row("shared LRU (bound)", f"{bound:.1%}", "", "100%", "", "", "", "", "")
    return table


def goal_lines(runs: dict[str, RouterRun], bound: float) -> list[str]:
    """Issue 4's goals for the kv policy, one line each with PASS or MISS (empty without it)."""
    kv = runs.get("kv")
    if kv is None:
        return []
    baselines = [r for name, r in runs.items() if name != "kv"]
    lines = []

    def check(goal: str, passed: bool, measured: str) -> None:
        lines.append(f"{'PASS' if passed else 'MISS'}  {goal}: {measured}")

    if BASELINE in runs and runs[BASELINE].prefix_hit_rate > 0:
        ratio = kv.prefix_hit_rate / runs[BASELINE].prefix_hit_rate
        check("kv hit rate >= 3x round robin's", ratio >= 3.0, f"{ratio:.2f}x")
    if bound > 0:
        check("kv hit rate >= 95% of the shared-LRU bound", kv.prefix_hit_rate >= 0.95 * bound,
              f"{kv.prefix_hit_rate / bound:.1%}")
    check("busiest worker <= 1.15x mean load", kv.busiest_over_mean <= 1.15, f"{kv.busiest_over_mean:.2f}x")
    if baselines:
        best_p50 = min(r.ttft_p50 for r in baselines)
        best_p99 = min(r.ttft_p99 for r in baselines)
        check("TTFT p50 below every baseline", kv.ttft_p50 < best_p50, f"{kv.ttft_p50:.3f} vs best {best_p50:.3f} s")
        check("TTFT p99 below every baseline", kv.ttft_p99 < best_p99, f"{kv.ttft_p99:.3f} vs best {best_p99:.3f} s")
    return lines
