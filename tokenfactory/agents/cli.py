"""`tokenfactory agents`: a swarm of agents against an OpenAI-compatible endpoint, with progress
and a per-task report (turns, tool calls, tokens, prefix-cache hits, latency, cost, energy)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokenfactory.agents.swarm import (
    DEFAULT_BASE_URL,
    TOOL_NAMES,
    AgentConfig,
    AgentReport,
    EndpointError,
    Endpoint,
    RequestRecord,
    Swarm,
    SwarmReport,
    Totals,
    endpoint_client,
    first_model,
)

DEFAULT_TASKS = (
    "What is 1234 * 5678 - 91? Use the calculator.",
    "Find the lines that mention 'error' in the working folder and count them.",
    "Split this into sub-tasks for helpers: the sum of 1..100, the product 12*13*14, and 2**20.",
    "Work out (17 + 25) * 3 / 7 and check the result twice.",
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base-url", default=DEFAULT_BASE_URL,
                   help=f"OpenAI-compatible endpoint (default: {DEFAULT_BASE_URL})")
    p.add_argument("--api-key", help="bearer key for the endpoint")
    p.add_argument("--model", help="model name (default: the endpoint's first model)")
    p.add_argument("--agents", type=int, default=8, help="agents working at once")
    p.add_argument("--task", action="append", default=[], metavar="TEXT",
                   help="a task (repeat for several; agents take them in turn; default: built-in tasks)")
    p.add_argument("--turns", type=int, default=AgentConfig.max_turns,
                   help="chat requests per agent, the structured answer included")
    p.add_argument("--subagent-turns", type=int, default=AgentConfig.subagent_turns)
    p.add_argument("--max-subagents", type=int, default=AgentConfig.max_subagents,
                   help="sub-agents one spawn call may start")
    p.add_argument("--max-tokens", type=int, default=AgentConfig.max_tokens, help="output tokens per turn")
    p.add_argument("--tool-choice", choices=["auto", "required"], default=AgentConfig.tool_choice,
                   help="required: every tool turn calls a tool; auto: the model may answer early")
    p.add_argument("--first-tool", choices=TOOL_NAMES,
                   help="a tool every task's first turn must call (spawn_subagents: each task fans out at once)")
    p.add_argument("--parallel-tool-calls", action=argparse.BooleanOptionalAction, default=False)
    p.add_argument("--temperature", type=float, default=AgentConfig.temperature)
    p.add_argument("--service-tier", help="the tier to buy (default: the key's default tier)")
    p.add_argument("--files", type=Path, metavar="DIR", help="the folder the search_files tool searches")


def main(args: argparse.Namespace) -> int:
    if args.agents < 1:
        raise SystemExit(f"--agents must be >= 1, got {args.agents}")
    if args.files is not None and not args.files.is_dir():
        raise SystemExit(f"--files: {args.files} is not a folder")
    console = Console()
    if not console.is_terminal:  # a log file: keep the report's rows on one line each
        console = Console(width=160)
    try:
        report = asyncio.run(run(args, console))
    except EndpointError as e:
        console.print(f"[red]error:[/red] {e}")
        return 1
    print_report(console, report)
    return 0 if all(agent.error is None for agent in report.agents) else 1


async def run(args: argparse.Namespace, console: Console) -> SwarmReport:
    tasks = args.task or list(DEFAULT_TASKS)
    async with endpoint_client(args.base_url, args.api_key, max_connections=4 * args.agents) as client:
        model = args.model or await first_model(client)
        config = AgentConfig(model=model, max_turns=args.turns, subagent_turns=args.subagent_turns,
                             max_subagents=args.max_subagents,
                             max_tokens=args.max_tokens, tool_choice=args.tool_choice, first_tool=args.first_tool,
                             parallel_tool_calls=args.parallel_tool_calls, temperature=args.temperature,
                             service_tier=args.service_tier, files=args.files)
        console.print(f"{args.agents} agents on {model} at {args.base_url}, up to {args.turns} turns each")
        with swarm_progress(console) as progress:
            turns = progress.add_task("agent turns", total=args.agents * args.turns)
            sub_turns = progress.add_task("sub-agent turns", total=None)

            def on_request(agent: AgentReport, record: RequestRecord) -> None:
                progress.advance(sub_turns if agent.is_subagent else turns)

            swarm = Swarm(Endpoint(client), config, on_request)
            return await swarm.run([tasks[i % len(tasks)] for i in range(args.agents)])


def swarm_progress(console: Console) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


def print_report(console: Console, report: SwarmReport) -> None:
    table = Table(title=f"swarm: {len(report.agents)} tasks in {report.wall_s:.1f} s")
    for column in ("task", "turns", "tool calls", "sub-agents", "prompt tok", "cached", "output tok",
                   "latency s", "cost $", "energy J", "result"):
        table.add_column(column, justify="left" if column in ("task", "result") else "right", no_wrap=True)
    for agent in report.agents:
        t = Totals.of(agent.all_requests())
        result = agent.error or (str(agent.result.get("answer"))[:32] if agent.result else "-")
        table.add_row(_short(agent.task, 32), str(t.requests), str(agent.all_tool_calls()), str(len(agent.subagents)),
                      str(t.prompt_tokens), f"{t.cached_fraction:.0%}", str(t.completion_tokens),
                      f"{agent.latency_s:.1f}", _maybe(t.cost_usd, "{:.6f}"), _maybe(t.energy_j, "{:.1f}"),
                      _short(result, 40))
    console.print(table)
    t = report.totals()
    console.print(f"all tasks: {t.requests} requests, {t.prompt_tokens} prompt tokens of which {t.cached_tokens} "
                  f"({t.cached_fraction:.1%}) from the prefix cache, {t.completion_tokens} output tokens, "
                  f"cost {_maybe(t.cost_usd, '${:.6f}')}, energy {_maybe(t.energy_j, '{:.1f} J')}; "
                  f"{report.retries} requests retried after a 429/503")


def _short(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _maybe(value: float | None, fmt: str) -> str:
    return "n/a" if value is None else fmt.format(value)
