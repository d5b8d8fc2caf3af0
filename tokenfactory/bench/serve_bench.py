"""`tokenfactory bench serve`: does HTTP work starve the engine? Same run, two ways.

Baseline: the engine alone, in this process, runs N requests (fixed prompt and output lengths,
greedy, EOS ignored). Served: a real `tokenfactory serve` subprocess (gateway and engine
processes) gets the same N requests as N concurrent streaming HTTP clients. If parsing, chat
rendering, detokenization and SSE writes for N streams delayed the engine's steps, the served
throughput would fall below the baseline's; the last line prints the ratio, served over alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import httpx

from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import LLMEngine
from tokenfactory.engine.request import SamplingParams
from tokenfactory.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model


@dataclass
class StreamTiming:
    sent_s: float
    chunk_times: list[float] = field(default_factory=list)
    """Arrival of each SSE chunk with text (a chunk may carry several tokens when the gateway
    catches up on several steps at once)."""
    completion_tokens: int = 0


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--concurrency", type=int, default=64, help="concurrent streams")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)


def main(args: argparse.Namespace) -> int:
    model_dir = args.model or str(ensure_tiny_model())
    name = TINY_MODEL_NAME if not args.model else ""
    config = EngineConfig.from_pretrained(
        model_dir, served_model_name=name,
        cache=CacheConfig(memory_bytes=256 * 2**20),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=max(args.concurrency, 1)),
    )
    rng = random.Random(args.seed)
    vocab = min(config.model.vocab_size, 4000)  # ordinary tokens of the built-in tokenizer
    prompts = [[rng.randrange(300, vocab) for _ in range(args.prompt_len)] for _ in range(args.concurrency)]
    print(f"workload: {args.concurrency} requests x ({args.prompt_len} prompt + {args.output_len} "
          f"output tokens), greedy; model {config.name} on {config.device}", flush=True)

    alone_s, alone_steps, alone_step_s = run_alone(config, prompts, args.output_len)
    total = args.concurrency * args.output_len
    print(f"engine alone: {total} tokens in {alone_s:.2f} s = {total / alone_s:,.0f} tokens/s "
          f"({alone_steps} steps, {1000 * alone_step_s / alone_steps:.1f} ms/step)", flush=True)

    port = free_port()
    server = start_server(model_dir, name, port, args.concurrency, args.max_num_batched_tokens)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        served_s, timings, steps, step_s = asyncio.run(run_served(url, config.name, prompts, args.output_len))
    finally:
        server.terminate()
        server.wait(30)
    got = sum(t.completion_tokens for t in timings)
    ttft = [t.chunk_times[0] - t.sent_s for t in timings if t.chunk_times]
    gaps = [b - a for t in timings for a, b in zip(t.chunk_times, t.chunk_times[1:])]
    print(f"served ({args.concurrency} concurrent streams): {got} tokens in {served_s:.2f} s = "
          f"{got / served_s:,.0f} tokens/s ({steps} steps, {1000 * step_s / max(steps, 1):.1f} ms/step; "
          f"the engine was stepping {step_s / served_s:.0%} of the time)")
    print(f"  TTFT p50 {_ms(ttft, 50)} ms, p99 {_ms(ttft, 99)} ms; between chunks p50 {_ms(gaps, 50)} ms, "
          f"p99 {_ms(gaps, 99)} ms")
    if got != total:
        print(f"error: {total - got} tokens missing from the streams", file=sys.stderr)
        return 1
    print(f"engine step rate under HTTP load vs alone: "
          f"{(steps / step_s) / (alone_steps / alone_step_s):.2f}")
    print(f"ratio (served / engine alone, tokens/s): {(got / served_s) / (total / alone_s):.2f}")
    return 0


def run_alone(config: EngineConfig, prompts: list[list[int]], output_len: int) -> tuple[float, int, float]:
    """-> wall seconds, steps, seconds inside steps."""
    engine = LLMEngine(config)
    engine.generate([prompts[0][:8]], SamplingParams(max_tokens=2, temperature=0.0))  # warm-up
    engine.steps.clear()
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    t0 = time.perf_counter()
    engine.generate(prompts, params)
    return time.perf_counter() - t0, len(engine.steps), sum(s.duration_s for s in engine.steps)


async def run_served(url: str, model: str, prompts: list[list[int]], output_len: int):
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await _stream_one(client, model, prompts[0][:8], 2)  # warm-up
        before = (await client.get("/health")).json()["engine"]
        t0 = time.perf_counter()
        timings = await asyncio.gather(*(_stream_one(client, model, p, output_len) for p in prompts))
        wall = time.perf_counter() - t0
        after = (await client.get("/health")).json()["engine"]
        steps = after["num_steps"] - before["num_steps"]
        return wall, timings, steps, after["step_seconds"] - before["step_seconds"]


async def _stream_one(client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int) -> StreamTiming:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    timing = StreamTiming(time.perf_counter())
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                timing.chunk_times.append(time.perf_counter())
            if chunk.get("usage"):
                timing.completion_tokens = chunk["usage"]["completion_tokens"]
    return timing


def start_server(model_dir: str, name: str, port: int, max_num_seqs: int, max_num_batched_tokens: int,
                 extra: list[str] | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "tokenfactory.cli", "serve", "--model", model_dir, "--port", str(port),
           "--max-num-seqs", str(max(max_num_seqs, 1)),
           "--max-num-batched-tokens", str(max_num_batched_tokens)]
    if name:
        cmd += ["--served-model-name", name]
    cmd += extra or []
    # The ledger stays on (it is part of the gateway's work), in a home of its own: benchmark traffic
    # is nobody's bill.
    env = os.environ | {"TOKENFACTORY_HOME": tempfile.mkdtemp(prefix="tokenfactory-bench-")}
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)


def wait_healthy(url: str, server: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with {server.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become healthy")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ms(values: list[float], pct: int) -> str:
    if not values:
        return "n/a"
    return f"{1000 * statistics.quantiles(values, n=100)[pct - 1]:.1f}" if len(values) > 1 else f"{1000 * values[0]:.1f}"
