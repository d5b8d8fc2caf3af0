"""`tokenfactory bench agents`: do a swarm's sessions find their context in the prefix cache?

Live on this machine: `tokenfactory serve --workers 4` (the built-in tiny model) and a swarm of 32
agents x 6 turns (`agents.swarm`, forced tool calls, a structured last turn), run twice in the same
run against fresh servers: once with the KV-aware router and session affinity, once with round
robin and no affinity. Each agent's task carries its own working document (a shipping manifest,
also in the folder its search tool searches), so a prompt is the shared system prompt and tools,
then the agent's own document, history and tool results, growing every turn. Every agent's first
turn must call `spawn_subagents` (a `tool_choice` naming it: the grammar makes even the random
model's arguments fit the tool's schema), so each fans out into 1 to `--subagents` sub-agents of
2 turns whose prompts extend the agent's own conversation; their requests count with the agents'.

What decides the outcome is KV capacity: a worker can keep the contexts of the sessions routed to
it, but not of every session. Round robin spreads each session over all 4 workers, so every worker
needs the whole swarm's contexts; with affinity it needs a quarter of them. The bench sizes each
worker's cache (`--num-blocks`) for its quarter of the swarm's in-flight contexts with some room,
prints the working set against that capacity, and reports the fraction of prompt tokens served
from the prefix cache (`usage.prompt_tokens_details.cached_tokens`) for each router and their
ratio. Goals: >= 70% cached with kv + affinity, >= 2x round robin.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import httpx

from tokenfactory.agents.swarm import AgentConfig, Endpoint, Swarm, SwarmReport, Totals, endpoint_client
from tokenfactory.bench.serve_bench import free_port, wait_healthy
from tokenfactory.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model

CITIES = ("Lyon", "Porto", "Gdansk", "Ghent", "Turin", "Bergen", "Cork", "Brno", "Split", "Tartu")
GOODS = ("copper wire", "oak planks", "glass jars", "wool bales", "steel bolts", "olive oil", "rice sacks",
         "paper rolls", "tin cans", "cork stoppers")
GOAL_CACHED = 0.70
GOAL_RATIO = 2.0
REQUEST_TIMEOUT_S = 3600.0


@dataclass(frozen=True, slots=True)
class RunResult:
    label: str
    report: SwarmReport
    routed: list[int]
    """Requests each worker served."""

    @property
    def totals(self) -> Totals:
        return self.report.totals()


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--agents", type=int, default=32)
    p.add_argument("--turns", type=int, default=6, help="chat requests per agent, the structured answer included")
    p.add_argument("--max-tokens", type=int, default=64, help="output tokens per turn")
    p.add_argument("--subagents", type=int, default=2,
                   help="at most this many sub-agents per agent (its first turn spawns them)")
    p.add_argument("--manifest-lines", type=int, default=96,
                   help="lines of each agent's working document (about 21 tokens each)")
    p.add_argument("--num-blocks", type=int, default=1856,
                   help="KV blocks of 16 tokens per worker (default: a quarter of the swarm's last-turn contexts, "
                        "8 x ~3,400 tokens, plus the shared prefix, with about 5%% to spare)")
    p.add_argument("--max-num-batched-tokens", type=int, default=32768,
                   help="each engine's tokens per step; large, so that the live governor, which compares the "
                        "queued prompt tokens with the workers' tokens per step, does not shed the swarm's burst")
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    args.model_dir = args.model or str(ensure_tiny_model())
    args.model_name = Path(args.model).name if args.model else TINY_MODEL_NAME
    with tempfile.TemporaryDirectory(prefix="tokenfactory-agents-") as tmp:
        folder = Path(tmp) / "manifests"
        tasks = write_manifests(folder, args.agents, args.manifest_lines, args.seed)
        print(f"workload: {args.agents} agents x {args.turns} turns, {args.max_tokens} output tokens per turn, "
              f"{args.manifest_lines}-line working document each; {args.workers} workers of {args.model_name} "
              f"(CPU), {args.num_blocks} KV blocks x 16 tokens = {16 * args.num_blocks:,} tokens per worker",
              flush=True)
        runs = []
        for label, router, affinity in (("kv + session affinity", "kv", True), ("round robin", "round_robin", False)):
            runs.append(run_factory(label, router, affinity, args, tasks, folder, Path(tmp)))
            print_run(runs[-1], args)
    kv, rr = runs[0].totals.cached_fraction, runs[1].totals.cached_fraction
    ratio = kv / rr if rr else float("inf")
    spawned = ", ".join(f"{run.label} {sum(len(a.subagents) for a in run.report.agents)}" for run in runs)
    print(f"sub-agents spawned: {spawned}")
    print(f"prefix-cache hits, kv + affinity / round robin: {ratio:.2f}x")
    print(f"goal >= {GOAL_CACHED:.0%} of prompt tokens cached with kv + affinity: "
          f"{'PASS' if kv >= GOAL_CACHED else 'MISS'} ({kv:.1%})")
    print(f"goal >= {GOAL_RATIO:.0f}x round robin: {'PASS' if ratio >= GOAL_RATIO else 'MISS'} ({ratio:.2f}x)")
    failed = [a for run in runs for a in run.report.agents if a.error is not None]
    for agent in failed[:5]:
        print(f"error: an agent failed: {agent.error}", file=sys.stderr)
    return 1 if failed else 0


def write_manifests(folder: Path, num_agents: int, num_lines: int, seed: int) -> list[str]:
    """One shipping manifest per agent, written into `folder` (what search_files searches), and the
    agent's task: its manifest in full, then questions about it."""
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    tasks = []
    for i in range(num_agents):
        lines = [f"crate {rng.randrange(10000):04d}: {rng.randrange(5, 900)} kg of {rng.choice(GOODS)} "
                 f"to {rng.choice(CITIES)}" for _ in range(num_lines)]
        manifest = "\n".join(lines)
        (folder / f"manifest-{i:03d}.txt").write_text(manifest + "\n")
        city = rng.choice(CITIES)
        tasks.append(f"Here is shipping manifest {i:03d}:\n{manifest}\n\nHow many kilograms go to {city} in total, "
                     f"and which other manifests ship the same goods there? Check the sums with the calculator "
                     f"and search the other manifests.")
    return tasks


def run_factory(label: str, router: str, affinity: bool, args: argparse.Namespace, tasks: list[str],
                folder: Path, tmp: Path) -> RunResult:
    """Start a fresh `tokenfactory serve --workers N` with `router`, run the swarm, stop it."""
    port = free_port()
    cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--model", args.model_dir, "--served-model-name",
           args.model_name, "--port", str(port), "--workers", str(args.workers), "--router", router,
           "--session-affinity" if affinity else "--no-session-affinity", "--num-blocks", str(args.num_blocks),
           "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--seed", str(args.seed),
           # The ledger stays on (the swarm reports the cost and energy it recorded), in a file of its own.
           "--db", str(tmp / f"factory-{router}.db")]
    env = os.environ | {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # engines share the cores
    log = tmp / f"serve-{router}.log"
    with log.open("wb") as out:
        server = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        try:
            wait_healthy(url, server, timeout_s=300)
        except RuntimeError as e:
            raise RuntimeError(f"{e}; its output ends:\n{log.read_text()[-2000:]}") from None
        print(f"{label}: swarm running ...", flush=True)
        report = asyncio.run(run_swarm(f"{url}/v1", tasks, folder, args))
        health = httpx.get(f"{url}/health", timeout=10).json()
        routed = [w["num_routed"] for w in health.get("workers", [])]
    finally:
        server.terminate()
        server.wait(60)
    return RunResult(label, report, routed)


async def run_swarm(base_url: str, tasks: list[str], folder: Path, args: argparse.Namespace) -> SwarmReport:
    # The priority tier, which no load or power shedding refuses: this measures routing, not admission.
    config = AgentConfig(model=args.model_name, max_turns=args.turns, max_tokens=args.max_tokens,
                         tool_choice="required", first_tool="spawn_subagents", max_subagents=args.subagents,
                         service_tier="priority", files=folder)
    # This measures cache hits, not latency: on a loaded machine a request may wait long behind others.
    async with endpoint_client(base_url, None, timeout_s=REQUEST_TIMEOUT_S, max_connections=4 * len(tasks)) as client:
        return await Swarm(Endpoint(client, max_retries=10), config).run(tasks)


def print_run(run: RunResult, args: argparse.Namespace) -> None:
    t = run.totals
    agents = run.report.agents
    contexts = [agent.requests[-1].prompt_tokens for agent in agents if agent.requests]
    subagents = sum(len(a.subagents) for a in agents)
    tool_calls = sum(a.all_tool_calls() for a in agents)
    cost = f"${t.cost_usd:.6f}" if t.cost_usd is not None else "n/a"
    energy = f"{t.energy_j:,.0f} J (modeled on CPU)" if t.energy_j is not None else "n/a"
    print(f"{run.label}: {t.requests} requests ({subagents} sub-agents), {tool_calls} tool calls, "
          f"{run.report.wall_s:.1f} s, {run.report.retries} retried after a 429/503; requests per worker "
          f"{run.routed}")
    print(f"  prompt tokens {t.prompt_tokens:,}, from the prefix cache {t.cached_tokens:,} = {t.cached_fraction:.1%}; "
          f"output tokens {t.completion_tokens:,}; cost {cost}; energy {energy}", flush=True)
    if contexts:
        working_set = sum(contexts)
        print(f"  last-turn contexts: mean {working_set / len(contexts):,.0f} tokens, all sessions {working_set:,} "
              f"tokens = {working_set / (16 * args.num_blocks):.1f}x one worker's KV capacity", flush=True)
