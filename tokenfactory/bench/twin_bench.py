"""`tokenfactory bench twin`: how fast the digital twin runs, and how close it comes to real GPUs.

- (default) speed: the whole Mooncake conversation trace (12,031 requests, about an hour) on 16
  simulated H200s serving Llama-3.1-8B behind the KV-aware router, the prompts hashed ahead in a
  second process (the goal allows 2 cores). Prints wall and CPU seconds (the simulation's and the
  hashing process's), simulated seconds per wall second, and PASS when the wall time is under 30 s. `--limit N`
  replays the first N requests only (PASS is then judged on the wall time scaled to the whole
  trace by simulated time).
- `--day`: a synthetic day of 1,000,000 requests (diurnal Poisson, 3x from trough to peak) on
  1,024 simulated H200s: 64 pods of 16 behind a round-robin front balancer, the KV-aware router
  inside each pod, `--jobs` pods at once (one process each; default 2, the machine's cores).
  PASS under 10 minutes. `--limit N` runs N requests on a fleet scaled down to the same load per
  GPU.
- `--calibration`: the twin's offline throughput (every request queued at once, fixed lengths,
  the batch limits `trtllm-bench throughput` sets, see `benchmark_scheduler`) beside NVIDIA's
  published TensorRT-LLM measurements for two model sizes and six length pairs (`--jobs` anchors
  at once), and the roofline's decode step time over its HBM-bandwidth bound across batch sizes.
"""

from __future__ import annotations

import argparse
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from tokenfactory.control.router import make_router
from tokenfactory.engine.config import ModelConfig, SchedulerConfig
from tokenfactory.twin.cost_model import LLAMA_3_8B, LLAMA_3_70B, CostModel, default_model
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.twin.simulator import Simulator, TwinConfig, simulate_pods
from tokenfactory.twin.workloads import (
    MOONCAKE_TRACE,
    LengthDistribution,
    TraceRequest,
    diurnal_workload,
    load_mooncake,
)

TRACE_GOAL_S = 30.0
DAY_GOAL_S = 600.0
DAY_REQUESTS = 1_000_000
DAY_PODS, POD_WORKERS = 64, 16


@dataclass(frozen=True)
class Anchor:
    """One published measurement of a real GPU, and the setup the twin reproduces."""

    name: str
    model: dict
    input_len: int
    output_len: int
    num_requests: int
    published_tokens_per_s: float
    source: str


# NVIDIA TensorRT-LLM documentation, "Performance Overview" (perf-overview.md, the v1.0 tables):
# `trtllm-bench throughput`, PyTorch backend, ModelOpt FP8 checkpoints (FP8 weights and KV cache),
# every request queued at once, "Total Output Throughput (tokens/sec)", one H200 SXM 141GB (TP1).
# The request counts are the ones that page lists per sequence-length pair. The two Llama-3.1-8B
# anchors marked "fit" set the cost model's two efficiency factors; every other row is a prediction.
TRTLLM = "NVIDIA TensorRT-LLM perf overview, H200 SXM TP1 FP8"
ANCHORS = [
    Anchor("Llama-3.1-8B 1000/1000 (fit)", LLAMA_3_8B, 1000, 1000, 3000, 17_744, TRTLLM),
    Anchor("Llama-3.1-8B 2048/128 (fit)", LLAMA_3_8B, 2048, 128, 3000, 3_538, TRTLLM),
    Anchor("Llama-3.1-8B 128/2048", LLAMA_3_8B, 128, 2048, 3000, 26_221, TRTLLM),
    Anchor("Llama-3.1-8B 2048/2048", LLAMA_3_8B, 2048, 2048, 1500, 12_194, TRTLLM),
    Anchor("Llama-3.1-8B 5000/500", LLAMA_3_8B, 5000, 500, 1500, 3_902, TRTLLM),
    Anchor("Llama-3.1-8B 20000/2000", LLAMA_3_8B, 20000, 2000, 1000, 1_804, TRTLLM),
    Anchor("Llama-3.3-70B 1000/1000", LLAMA_3_70B, 1000, 1000, 3000, 2_909, TRTLLM),
    Anchor("Llama-3.3-70B 2048/128", LLAMA_3_70B, 2048, 128, 3000, 442, TRTLLM),
    Anchor("Llama-3.3-70B 128/2048", LLAMA_3_70B, 128, 2048, 3000, 4_336, TRTLLM),
    Anchor("Llama-3.3-70B 2048/2048", LLAMA_3_70B, 2048, 2048, 1500, 2_003, TRTLLM),
    Anchor("Llama-3.3-70B 5000/500", LLAMA_3_70B, 5000, 500, 1500, 566, TRTLLM),
    Anchor("Llama-3.3-70B 20000/2000", LLAMA_3_70B, 20000, 2000, 1000, 283, TRTLLM),
]
KV_MEMORY_FRACTION = 0.95
"""Share of the memory left after the weights that the benchmark gives the KV cache: the perf
overview's runs set kv_cache_free_gpu_mem_fraction to 0.95 (falling back to 0.90 on OOM)."""
MAX_BATCH, MIN_BUDGET, MAX_BUDGET = 4096, 2048, 32768
"""trtllm-bench's bounds on the batch it sizes and on its tokens per step."""
GRAPH_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 384, 512, 1024, 2048, 4096, 8192)
"""The perf overview's llm_options.yml: CUDA graphs at these decode batch sizes, padding on."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--day", action="store_true", help="a million-request day on 1,024 simulated GPUs")
    mode.add_argument("--calibration", action="store_true", help="the twin beside published real-GPU figures")
    parser.add_argument("--limit", type=int, default=None, help="a quick run: N requests (see the module doc)")
    parser.add_argument("--trace", default=str(MOONCAKE_TRACE), help="the Mooncake trace (speed mode)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="--day: pods simulated at once, --calibration: anchors; one process each "
                             "(default: 2 cores)")


def main(args: argparse.Namespace) -> int:
    console = Console()
    if args.limit is not None and args.limit < 1:
        console.print("[red]--limit must be at least 1[/red]")
        return 2
    if args.calibration:
        return calibration(console, max(1, args.jobs))
    if args.day:
        if args.jobs < 1:
            console.print("[red]--jobs must be at least 1[/red]")
            return 2
        return day(console, args.limit or DAY_REQUESTS, args.jobs)
    return trace_speed(console, args.trace, args.limit)


def _verdict(wall_s: float, goal_s: float) -> str:
    return f"PASS (< {goal_s:.0f} s)" if wall_s < goal_s else f"MISS (>= {goal_s:.0f} s)"


def trace_speed(console: Console, path: str, limit: int | None) -> int:
    try:
        trace = load_mooncake(path)
    except FileNotFoundError:
        console.print(f"[red]trace not found: {path}[/red] (pass --trace FILE)")
        return 2
    workload = trace[:limit]  # the trace's times start at its first request, so a prefix keeps them
    config = TwinConfig(CostModel(default_model(), get_hardware("h200")), num_workers=16, hash_ahead=True)
    simulator = Simulator(config, make_router("kv"))
    wall, before = time.perf_counter(), os.times()
    result = simulator.run(workload)
    wall, after = time.perf_counter() - wall, os.times()
    cpu = after.user + after.system - before.user - before.system
    hashing = after.children_user + after.children_system - before.children_user - before.children_system
    simulated = result.summary.duration_s
    console.print(
        f"Mooncake trace: {len(workload)} requests, 16 x H200, kv router: {simulated:.0f} simulated s in "
        f"{wall:.1f} wall s ({cpu:.1f} CPU s simulating, {hashing:.1f} hashing prompts ahead in a second "
        f"process): {simulated / wall:.0f} simulated s per wall s; prefix hit rate {result.summary.prefix_hit_rate:.1%}"
    )
    whole = wall
    if len(workload) < len(trace):
        whole = wall * trace[-1].arrival_time / max(workload[-1].arrival_time, 1e-9)
        console.print(f"scaled to the whole trace by simulated time: about {whole:.0f} wall s")
    console.print(_verdict(whole, TRACE_GOAL_S))
    return 0


def day(console: Console, num_requests: int, jobs: int = 1) -> int:
    pods = max(1, round(DAY_PODS * num_requests / DAY_REQUESTS))
    gpus = pods * POD_WORKERS
    started, before = time.perf_counter(), os.times()
    workload = diurnal_workload(
        num_requests, LengthDistribution(1024, 1.0, maximum=32_000), LengthDistribution(256, 1.0, maximum=4096)
    )
    generated = time.perf_counter() - started
    console.print(f"generated {num_requests:,} requests over a day in {generated:.1f} s; "
                  f"simulating {gpus:,} H200s ({pods} pods of {POD_WORKERS}, kv router in each, "
                  f"{min(jobs, pods)} at once)")
    config = TwinConfig(CostModel(default_model(), get_hardware("h200")), num_workers=POD_WORKERS,
                        power_interval_s=600.0)
    with Progress(TextColumn("pods"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"),
                  TimeRemainingColumn(), console=console, disable=not console.is_terminal) as progress:
        task = progress.add_task("pods", total=pods)

        def pod_done(done: int) -> None:
            progress.update(task, completed=done + 1)
            if not console.is_terminal and (done + 1) % max(1, pods // 8) == 0:  # a log: a line now and then
                console.print(f"  {done + 1}/{pods} pods done at {time.perf_counter() - started:.0f} s")

        result = simulate_pods(config, lambda: make_router("kv"), workload, pods, pod_done, jobs)
    wall, after = time.perf_counter() - started, os.times()
    cpu = sum(after[:4]) - sum(before[:4])  # this process and the pods' (user, system, children's)
    s = result.summary
    console.print(
        f"day: {s.num_finished:,} of {num_requests:,} requests finished ({s.num_rejected} rejected), "
        f"{s.output_tokens:,} output tokens, TTFT p50/p99 {s.ttft.p50 * 1e3:.0f}/{s.ttft.p99 * 1e3:.0f} ms, "
        f"fleet power {min(result.power_w) / 1e3:.0f}-{max(result.power_w) / 1e3:.0f} kW (10-min means)"
    )
    console.print(
        f"{s.duration_s:,.0f} simulated s in {wall:.0f} wall s ({cpu:.0f} CPU s, {cpu / pods:.1f} per pod): "
        f"{s.duration_s / wall:.0f} simulated s per wall s"
    )
    console.print(_verdict(wall, DAY_GOAL_S) if num_requests == DAY_REQUESTS else "(a scaled-down run: no verdict)")
    return 0


def benchmark_scheduler(model: CostModel, input_len: int, output_len: int,
                        block_size: int = TwinConfig.block_size) -> SchedulerConfig:
    """The batch limits the published runs had. TensorRT-LLM's default capacity policy admits a
    request only when its whole KV (prompt and every output token) fits, so it never evicts;
    trtllm-bench sizes the batch from the requests whose whole sequence fits the KV cache (rounded
    up; the policy then runs only those), and the tokens per step as that batch x (1 + input /
    output), the prefill rate that keeps pace with the batch's decodes. Our scheduler admits on a prompt's blocks and preempts by recompute when
    the cache runs short; capping it at the requests whose blocks fit whole gives the same batch
    and no preemption (uncapped, a 70B on one H200 admits twice what it can finish and recomputes)."""
    fits_whole = model.kv_num_blocks(block_size) // math.ceil((input_len + output_len) / block_size)
    if fits_whole < 1:
        raise ValueError(f"one {input_len}+{output_len} token sequence does not fit the KV cache")
    batch = min(fits_whole, MAX_BATCH)
    budget = min(max(math.ceil(batch * (1 + input_len / output_len)), MIN_BUDGET), MAX_BUDGET)
    return SchedulerConfig(max_num_batched_tokens=budget, max_num_seqs=batch)


def offline_throughput(model: CostModel, anchor: Anchor) -> float:
    """Output tokens/s of one worker given every request at once (fixed lengths), with the
    published runs' batch limits (`benchmark_scheduler`)."""
    config = TwinConfig(model, num_workers=1, scheduler=benchmark_scheduler(model, anchor.input_len, anchor.output_len))
    workload = [TraceRequest(0.0, anchor.input_len, anchor.output_len, uid=i) for i in range(anchor.num_requests)]
    return Simulator(config).run(workload).summary.output_tokens_per_s


def anchor_model(anchor: Anchor) -> CostModel:
    """The roofline of the published setup: one H200, FP8 weights and KV, the benchmark's KV share
    and CUDA graphs."""
    return CostModel(ModelConfig.from_dict(anchor.model), get_hardware("h200"), "fp8",
                     activation_reserve=1 - KV_MEMORY_FRACTION, graph_batch_sizes=GRAPH_BATCH_SIZES)


def _twin_throughput(anchor: Anchor) -> float:
    return offline_throughput(anchor_model(anchor), anchor)


def calibration(console: Console, jobs: int = 1) -> int:
    table = Table(title="twin (roofline) vs published real-GPU throughput, offline, output tokens/s")
    for column in ("setup", "published", "twin", "twin / published", "source"):
        table.add_column(column, justify="left" if column in ("setup", "source") else "right")
    h200 = get_hardware("h200")
    with ProcessPoolExecutor(max_workers=jobs) as pool:  # the anchors share nothing
        ratios = []
        for anchor, twin in zip(ANCHORS, pool.map(_twin_throughput, ANCHORS)):
            ratios.append(twin / anchor.published_tokens_per_s)
            table.add_row(f"{anchor.name} ({anchor.num_requests} req.)", f"{anchor.published_tokens_per_s:,.0f}",
                          f"{twin:,.0f}", f"{ratios[-1]:.2f}", anchor.source)
    console.print(table)
    console.print(f"twin / published over {len(ratios)} anchors: {min(ratios):.2f}-{max(ratios):.2f}, "
                  f"geometric mean {math.prod(ratios) ** (1 / len(ratios)):.2f}")
    bound = Table(title="Llama-3-8B bf16 on H200, decode step (context 2048) over the HBM-bandwidth bound (goal 1x-2x)")
    for column in ("batch", "step (ms)", "bound (ms)", "ratio"):
        bound.add_column(column, justify="right")
    model = CostModel(default_model(), h200)
    for batch in (1, 8, 32, 64, 128, 256, 512):
        context = 2048
        step = model.batch_cost(decodes=[context] * batch).duration_s
        bytes_moved = model.weight_bytes + model.kv_bytes_per_token * batch * (context + 2)
        floor = bytes_moved / h200.hbm_bandwidth
        bound.add_row(str(batch), f"{step * 1e3:.2f}", f"{floor * 1e3:.2f}", f"{step / floor:.2f}")
    console.print(bound)
    return 0
