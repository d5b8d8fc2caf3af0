"""`tokenfactory bench transport`: workers over ZMQ against workers as Ray actors, in one run.

Both transports get engines built from the same `serve` flags and the same requests: one stream at
a time, then N concurrent streams (time to first token, inter-token latency, output tokens/s), and
split requests, prefilled on one worker and decoded on another with their KV moved in between
(`InlineTransport` through this process over ZMQ; the object store between Ray actors). For a
split the hand-off is timed from asking the decode worker to take the KV until its first token:
the same import and decode step on both sides, so what differs is the transport.

The two sides take turns round by round (which goes first alternates), so the machine's load
drifts over both alike. Each figure is taken over all the rounds' samples; each Ray/ZMQ ratio is
the median over rounds of that round's ratio, so a busy spell that hits one round of one side
moves one pair, not the result. Without Ray installed, only the ZMQ side runs.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import random
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from tokenfactory.cli import build_parser, serve_config
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.request import SamplingParams
from tokenfactory.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model
from tokenfactory.runtime.client import AsyncEngineClient

TRANSPORTS = ("zmq", "ray")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--concurrency", type=int, default=8, help="N: concurrent streams of the second phase")
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--split-prompt-len", type=int, default=512, help="prompt tokens of each split request")
    p.add_argument("--rounds", type=int, default=5, help="turns each transport takes")
    p.add_argument("--singles", type=int, default=3, help="one-at-a-time streams per round")
    p.add_argument("--splits", type=int, default=2, help="split requests per round")
    p.add_argument("--seed", type=int, default=0)


@dataclass(slots=True, frozen=True)
class StreamTiming:
    """One request's stream as its caller saw it."""

    ttft_s: float
    itl_s: tuple[float, ...]
    """Per token after the first: the gap before its output, over the tokens that output carried."""
    tokens: tuple[int, ...]


@dataclass(slots=True, frozen=True)
class SplitTiming:
    prefill_s: float
    """Prompt and first token on the prefill worker, its KV copied out and handed to the transport."""
    handoff_s: float
    """From asking the decode worker to take the KV to its first token there."""
    kv_bytes: int
    tokens: tuple[int, ...]


@dataclass(slots=True)
class Samples:
    """One transport's measurements in one round (or, merged, in all)."""

    singles: list[StreamTiming] = field(default_factory=list)
    bursts: list[tuple[list[StreamTiming], float]] = field(default_factory=list)
    """Each burst's N streams and its wall time."""
    splits: list[SplitTiming] = field(default_factory=list)
    num_steps: int = 0
    step_s: float = 0.0
    """The engines' own time in their steps (from their load reports): a slower step, not the
    transport, would slow everything above."""

    @classmethod
    def merged(cls, rounds: Sequence[Samples]) -> Samples:
        return cls([s for r in rounds for s in r.singles], [b for r in rounds for b in r.bursts],
                   [s for r in rounds for s in r.splits], sum(r.num_steps for r in rounds),
                   sum(r.step_s for r in rounds))


@dataclass(slots=True, frozen=True)
class Workload:
    singles: list[list[list[int]]]
    """Per round, the prompts sent one at a time."""
    bursts: list[list[list[int]]]
    """Per round, the prompts sent at once."""
    splits: list[list[list[int]]]
    params: SamplingParams


def make_workload(args: argparse.Namespace, vocab: int) -> Workload:
    """Fresh prompts for every request (no prefix-cache hits), the same for both transports."""
    rng = random.Random(args.seed)

    def prompts(count: int, length: int) -> list[list[int]]:
        return [[rng.randrange(300, vocab) for _ in range(length)] for _ in range(count)]

    rounds = range(args.rounds)
    return Workload(
        singles=[prompts(args.singles, args.prompt_len) for _ in rounds],
        bursts=[prompts(args.concurrency, args.prompt_len) for _ in rounds],
        splits=[prompts(args.splits, args.split_prompt_len) for _ in rounds],
        params=SamplingParams(max_tokens=args.output_len, temperature=0.0, ignore_eos=True),
    )


async def timed_stream(worker: AsyncEngineClient, request_id: str, prompt: list[int],
                       params: SamplingParams) -> StreamTiming:
    t0 = time.perf_counter()
    last = t0
    ttft = None
    itl: list[float] = []
    tokens: list[int] = []
    async for out in worker.generate(request_id, prompt, params):
        now = time.perf_counter()
        if not out.new_token_ids:
            continue
        if ttft is None:
            ttft = now - t0
        else:
            itl.extend([(now - last) / len(out.new_token_ids)] * len(out.new_token_ids))
        last = now
        tokens.extend(out.new_token_ids)
    if ttft is None:
        raise RuntimeError(f"request {request_id} ended without a token")
    return StreamTiming(ttft, tuple(itl), tuple(tokens))


async def burst(worker: AsyncEngineClient, tag: str, prompts: list[list[int]],
                params: SamplingParams) -> tuple[list[StreamTiming], float]:
    """All `prompts` at once: their streams and the wall time until the last ends."""
    t0 = time.perf_counter()
    streams = await asyncio.gather(*(timed_stream(worker, f"{tag}-{i}", p, params) for i, p in enumerate(prompts)))
    return list(streams), time.perf_counter() - t0


async def split(prefill: AsyncEngineClient, decode: AsyncEngineClient, request_id: str, prompt: list[int],
                params: SamplingParams) -> SplitTiming:
    """Prefill on one worker, decode on the other from the moved KV."""
    t0 = time.perf_counter()
    first, handle = await prefill.prefill(request_id, prompt, params)
    t1 = time.perf_counter()
    if handle is None:
        raise RuntimeError(f"split request {request_id} ended at its first token")
    kv_bytes = len(handle) if isinstance(handle, bytes) else 0  # a Ray handle names the object, not its size
    tokens = list(first.new_token_ids)
    handoff = None
    async for out in decode.generate_from_kv(request_id, prompt, handle, params):
        if handoff is None and out.new_token_ids:
            handoff = time.perf_counter() - t1
        tokens.extend(out.new_token_ids)
    if handoff is None:
        raise RuntimeError(f"split request {request_id} decoded no token")
    return SplitTiming(t1 - t0, handoff, kv_bytes, tuple(tokens))


async def take_turn(workers: Sequence[AsyncEngineClient], name: str, round_: int, workload: Workload) -> Samples:
    """One round of the workload on one transport's two workers."""
    params = workload.params
    samples = Samples()
    before = [(w.load.num_steps, w.load.step_seconds) for w in workers]
    for i, prompt in enumerate(workload.singles[round_]):
        samples.singles.append(await timed_stream(workers[0], f"{name}-{round_}-single-{i}", prompt, params))
    samples.bursts.append(await burst(workers[0], f"{name}-{round_}-burst", workload.bursts[round_], params))
    for i, prompt in enumerate(workload.splits[round_]):
        samples.splits.append(await split(workers[0], workers[1], f"{name}-{round_}-split-{i}", prompt, params))
    for worker, (steps, seconds) in zip(workers, before, strict=True):  # the last report may lag a step
        samples.num_steps += worker.load.num_steps - steps
        samples.step_s += worker.load.step_seconds - seconds
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-quantile (0..1) by linear interpolation between the nearest ranks."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no samples")
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples: Samples) -> dict[str, float]:
    """The figures the report prints, by name: latencies in seconds, throughputs in tokens/s."""
    burst_streams = [s for streams, _ in samples.bursts for s in streams]
    summary = {}
    for label, streams in (("1 stream", samples.singles), ("N streams", burst_streams)):
        summary[f"TTFT p50, {label}"] = percentile([s.ttft_s for s in streams], 0.5)
        summary[f"TTFT p90, {label}"] = percentile([s.ttft_s for s in streams], 0.9)
        summary[f"ITL p50, {label}"] = percentile([g for s in streams for g in s.itl_s], 0.5)
    summary["tokens/s, 1 stream"] = statistics.median(len(s.tokens) / (s.ttft_s + sum(s.itl_s))
                                                      for s in samples.singles)
    summary["tokens/s, N streams"] = statistics.median(sum(len(s.tokens) for s in streams) / wall
                                                       for streams, wall in samples.bursts)
    summary["split: prefill + KV out, p50"] = percentile([s.prefill_s for s in samples.splits], 0.5)
    summary["split: KV hand-off to first decode token, p50"] = percentile([s.handoff_s for s in samples.splits], 0.5)
    summary["engine step, mean"] = samples.step_s / max(samples.num_steps, 1)
    return summary


def outputs_of(samples: Samples) -> list[tuple[int, ...]]:
    """Every request's tokens, in workload order."""
    return ([s.tokens for s in samples.singles] + [s.tokens for streams, _ in samples.bursts for s in streams]
            + [s.tokens for s in samples.splits])


def paired_ratios(ray_rounds: Sequence[Samples], zmq_rounds: Sequence[Samples]) -> dict[str, float]:
    """Per figure, the median over rounds of Ray's figure over ZMQ's in the same round."""
    pairs = [(summarize(r), summarize(z)) for r, z in zip(ray_rounds, zmq_rounds, strict=True)]
    return {figure: statistics.median(r[figure] / z[figure] for r, z in pairs) for figure in pairs[0][0]}


def report(summaries: dict[str, dict[str, float]], ratios: dict[str, float] | None = None) -> list[str]:
    """A table line per figure, with the Ray/ZMQ ratios when both ran."""
    names = list(summaries)
    lines = [f"{'':46}" + "".join(f"{n:>12}" for n in names) + ("    ray/zmq" if ratios else "")]
    for figure in summaries[names[0]]:
        cells = "".join(f"{v:>12,.0f}" if figure.startswith("tokens/s") else f"{1000 * v:>9.2f} ms"
                        for v in (summaries[n][figure] for n in names))
        lines.append(f"{figure:46}{cells}" + (f"{ratios[figure]:>11.2f}" if ratios else ""))
    return lines


def ray_available() -> bool:
    """Whether the optional `ray` extra is installed (imported only when it is: slow, and optional)."""
    return importlib.util.find_spec("ray") is not None


async def run(config: EngineConfig, workload: Workload, transports: list[str]) -> dict[str, list[Samples]]:
    """Start two workers per transport, then the rounds, the transports taking turns; per
    transport, each round's samples."""
    clients = {"zmq": AsyncEngineClient}
    if "ray" in transports:
        from tokenfactory.runtime.ray_worker import RayEngineClient

        clients["ray"] = RayEngineClient
    workers = {name: [clients[name](config) for _ in range(2)] for name in transports}
    try:
        await asyncio.gather(*(w.start() for pair in workers.values() for w in pair))
        rounds: dict[str, list[Samples]] = {name: [] for name in transports}
        for round_ in range(len(workload.singles)):
            order = transports if round_ % 2 == 0 else transports[::-1]
            for name in order:
                rounds[name].append(await take_turn(workers[name], name, round_, workload))
        return rounds
    finally:
        await asyncio.gather(*(w.shutdown() for pair in workers.values() for w in pair), return_exceptions=True)


def main(args: argparse.Namespace) -> int:
    if min(args.concurrency, args.rounds, args.singles, args.splits, args.prompt_len, args.output_len) < 1:
        raise SystemExit("tokenfactory: --concurrency, --rounds, --singles, --splits and the lengths must be >= 1")
    if args.output_len < 2:
        raise SystemExit("tokenfactory: --output-len must be >= 2 (a split request decodes after its first token)")
    model_dir = args.model or str(ensure_tiny_model())
    flags = ["--model", model_dir, *(["--served-model-name", TINY_MODEL_NAME] if not args.model else []),
             "--max-num-seqs", str(max(args.concurrency, 8)), "--num-blocks", "2048", "--seed", str(args.seed)]
    config = serve_config(build_parser(["serve"]).parse_args(["serve", *flags]))
    workload = make_workload(args, min(config.model.vocab_size, 4000))
    transports = list(TRANSPORTS)
    started_ray = False
    if not ray_available():
        transports = ["zmq"]
        print("ray is not installed (pip install 'tokenfactory[ray]'): measuring the ZMQ transport only")
    else:
        import ray

        if not ray.is_initialized():  # joins RAY_ADDRESS's cluster if set, else a local Ray
            ray.init(include_dashboard=False, log_to_driver=False)
            started_ray = True
    print(f"engine: {config.name} on {config.device}, serve flags {' '.join(flags[2:])}; two workers per "
          f"transport; {args.rounds} rounds, transports taking turns", flush=True)
    print(f"per round: {args.singles} streams one at a time and {args.concurrency} at once "
          f"({args.prompt_len}-token prompts, {args.output_len} output tokens, greedy), {args.splits} split "
          f"requests of {args.split_prompt_len} prompt tokens", flush=True)
    try:
        rounds = asyncio.run(run(config, workload, transports))
    finally:
        if started_ray:
            ray.shutdown()
    samples = {name: Samples.merged(r) for name, r in rounds.items()}
    summaries = {name: summarize(s) for name, s in samples.items()}
    ratios = paired_ratios(rounds["ray"], rounds["zmq"]) if "ray" in rounds else None
    for line in report(summaries, ratios):
        print(line)
    kv_mb = statistics.median(s.kv_bytes for s in samples["zmq"].splits) / 1e6
    print(f"KV moved per split request: {kv_mb:.2f} MB")
    if ratios:
        outputs = [outputs_of(s) for s in samples.values()]
        same = sum(a == b for a, b in zip(*outputs, strict=True))
        print(f"greedy outputs identical across transports: {same}/{len(outputs[0])} requests")
        print(f"ratio (ray / zmq, median of {args.rounds} paired rounds): " + ", ".join(
            f"{figure} {ratios[figure]:.2f}" for figure in
            ("TTFT p50, 1 stream", "ITL p50, N streams", "tokens/s, N streams",
             "split: KV hand-off to first decode token, p50")))
    return 0
