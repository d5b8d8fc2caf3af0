"""`tokenfactory bench overhead`: what the factory floor adds to one request, measured in one run.

1. Gateway plus router: TTFT of two-token requests sent one at a time through `tokenfactory serve
   --workers 2` (HTTP, auth, tiers and ledger, the KV-aware router, SSE) against the same requests
   sent straight to an engine process from this process with the engine's own client (the
   baseline). The two sides take turns, request by request (which goes first alternates), so the
   machine's load drifts over both alike; the HTTP client is the standard library's, which adds
   little of its own. The baseline has as many engine processes as the served pool and takes
   them in turn, as the router spreads the served requests over its two: on a CPU the engines'
   weights share one last-level cache, and an engine used every other request (one engine against
   a pool of two) finds more of its weights still there, which made the baseline's steps 0.5-0.9 ms
   quicker than the served engines' for the same work in most runs. Both sides' step times are printed, so
   that premise is checked in every run. The difference of the medians is what the gateway and the router add; the
   median of the request-by-request differences is printed beside it. On a busy machine the
   engine's own step time varies most, so each side's TTFT is also reported less the engine's
   time in the request's two steps (prefill and decode, from the engine's load reports read
   after the stream ended, by the same rule on both sides and for every request: the served
   side cannot read its prefill step alone without racing the decode step), and the overhead
   again as their difference. `--neighbour SEED` makes this comparison beside a noisy neighbour
   (`bench/neighbour.py`), the same one `bench fidelity --neighbour` runs beside.
2. The router alone: microseconds per routing decision (hashing the prompt's blocks, the index lookup
   and the policy) for prompts of several lengths over 16 workers.
3. KV transfer for disaggregated serving: bytes and milliseconds to copy a prompt's KV out of one
   engine, encode and decode it, and write it into another, against that prompt's prefill time.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import statistics
import time
from dataclasses import dataclass
from http.client import HTTPConnection

import msgspec

from tokenfactory.bench.neighbour import neighbour
from tokenfactory.bench.serve_bench import free_port, start_server, wait_healthy
from tokenfactory.cli import build_parser, serve_config
from tokenfactory.control.kv_index import KVIndex
from tokenfactory.control.router import KVAwareRouter, RouteRequest, WorkerState
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.kv_cache import prompt_block_hashes
from tokenfactory.engine.outputs import KVTransfer
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model
from tokenfactory.runtime.client import AsyncEngineClient

TWO_TOKENS = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)
"""Two, so the first token is not also the last: the gateway commits a request's ledger row
before its final chunk, and that durable write is no part of the time to first token."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--requests", type=int, default=300, help="sequential requests per side")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--route-lens", type=int, nargs="+", default=[512, 4096, 32768],
                   help="prompt lengths for the router timing")
    p.add_argument("--transfer-lens", type=int, nargs="+", default=[128, 512, 2048],
                   help="prompt lengths for the KV transfer timing")
    p.add_argument("--neighbour", type=int, metavar="SEED",
                   help="run beside a noisy neighbour: another process loading the machine in random bursts "
                        "(this seed's), to see how the overhead holds up on a noisy machine")


def main(args: argparse.Namespace) -> int:
    model_dir = args.model or str(ensure_tiny_model())
    name = "" if args.model else TINY_MODEL_NAME
    flags = ["--model", model_dir, *(["--served-model-name", name] if name else []),
             "--max-num-seqs", "1", "--max-num-batched-tokens", "2048", *ENGINE_FLAGS]
    config = serve_config(build_parser(["serve"]).parse_args(["serve", *flags]))  # the served workers' own
    rng = random.Random(0)
    prompts = [[rng.randrange(300, 4000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    with neighbour(args.neighbour):
        if args.neighbour is not None:
            print(f"with a noisy neighbour (seed {args.neighbour}) for the TTFT comparison")
        direct, served = ttft_both(config, model_dir, name, prompts)
    d50, s50 = (statistics.median(t.ttft_s for t in side) for side in (direct, served))
    print(f"TTFT p50, {args.requests} two-token requests of {args.prompt_len} tokens, one at a time: "
          f"engine processes direct ({NUM_WORKERS}, in turn) {1000 * d50:.2f} ms, through gateway + kv router "
          f"({NUM_WORKERS} workers; uvicorn on {http_stack()}) {1000 * s50:.2f} ms")
    d_steps, s_steps = (_median_steps(side) for side in (direct, served))
    print(f"  the engine's own time in the request's two steps (the same work on both sides): direct {_ms(d_steps)}, "
          f"served {_ms(s_steps)}")
    d_net, s_net = (_median_steps(side, less_from_ttft=True) for side in (direct, served))
    print(f"  the same less the engine's own time in the request's two steps: direct {_ms(d_net)}, "
          f"through gateway + router {_ms(s_net)}")
    paired = statistics.median(b.ttft_s - a.ttft_s for a, b in zip(direct, served, strict=True))
    for length in args.route_lens:
        print(f"router decision, {length}-token prompt, 16 workers: {route_decision_us(length):.0f} us")
    for length in args.transfer_lens:
        t = kv_transfer(config, length)
        print(f"KV transfer, {length}-token prompt: {t['bytes'] / 1e6:.2f} MB; copy out {t['export_ms']:.2f} ms, "
              f"encode+decode {t['wire_ms']:.2f} ms, import {t['import_ms']:.2f} ms; "
              f"prefill itself {t['prefill_ms']:.1f} ms")
    net = s_net - d_net if s_net is not None and d_net is not None else None
    print(f"gateway + router overhead at p50: {1000 * (s50 - d50):.2f} ms "
          f"(median of the request-by-request differences {1000 * paired:.2f} ms; less each request's own "
          f"engine steps, the machine's noise in them gone: {_ms(net)})")
    return 0


def http_stack() -> str:
    """The event loop and HTTP parser uvicorn serves with here: it takes uvloop and httptools when
    they are installed (`pip install tokenfactory[fast]`), else asyncio's loop and h11."""
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    parser = "httptools" if importlib.util.find_spec("httptools") else "h11"
    return f"{loop} + {parser}"


def _median_steps(side: list[FirstToken], less_from_ttft: bool = False) -> float | None:
    """Median of the requests' engine step time (or of their TTFT less it), over the requests
    whose step time is known."""
    known = [t.ttft_s - t.step_s if less_from_ttft else t.step_s for t in side if t.step_s is not None]
    return statistics.median(known) if known else None


def _ms(seconds: float | None) -> str:
    return "n/a" if seconds is None else f"{1000 * seconds:.2f} ms"


@dataclass(slots=True, frozen=True)
class FirstToken:
    ttft_s: float
    step_s: float | None
    """The engine's own time in the request's two steps: the one that computed the prompt and
    sampled the first token, and the one that sampled the second (None: some other step ran
    meanwhile, so the two cannot be told apart from it)."""


ENGINE_FLAGS = ["--num-blocks", "2048"]
"""`serve` flags of every engine in the run, with one sequence at a time and 2048 tokens per step
(`start_server`'s own): the direct engine is configured from the same flags."""

NUM_WORKERS = 2
"""The served pool's workers (the fewest with a routing decision to make), and the baseline's engines."""

WARMUP_REQUESTS = 4
"""Per side, before timing: enough for the router to have sent work to both workers."""


def ttft_both(config: EngineConfig, model_dir: str, name: str, prompts: list[list[int]]
              ) -> tuple[list[FirstToken], list[FirstToken]]:
    """Each prompt straight to an engine process (each in turn) and through a served gateway, the two
    sides taking turns (which one goes first alternates), so both see the same machine."""
    port = free_port()
    server = start_server(model_dir, name, port, max_num_seqs=1, max_num_batched_tokens=2048,
                          extra=[*ENGINE_FLAGS, "--workers", str(NUM_WORKERS), "--router", "kv"])
    loop = asyncio.new_event_loop()
    clients = [AsyncEngineClient(config) for _ in range(NUM_WORKERS)]
    http, health = HTTPConnection("127.0.0.1", port, timeout=60), HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        for client in clients:  # while the server starts
            loop.run_until_complete(client.start())
        wait_healthy(f"http://127.0.0.1:{port}", server)
        warmup = [prompts[i % len(prompts)][::-1] for i in range(WARMUP_REQUESTS)]
        direct: list[FirstToken] = []
        served: list[FirstToken] = []
        for i, prompt in enumerate(warmup + prompts):
            client = clients[i % NUM_WORKERS]
            sides = [lambda: loop.run_until_complete(first_token_direct(client, f"direct-{i}", prompt)),
                     lambda: first_token_served(http, health, config.name, prompt)]
            first, second = sides if i % 2 == 0 else sides[::-1]
            a, b = first(), second()
            if i >= len(warmup):
                direct.append(a if i % 2 == 0 else b)
                served.append(b if i % 2 == 0 else a)
        return direct, served
    finally:
        http.close()
        health.close()
        for client in clients:
            loop.run_until_complete(client.shutdown())
        loop.close()
        server.terminate()
        server.wait(30)


async def first_token_direct(client: AsyncEngineClient, request_id: str, prompt: list[int]) -> FirstToken:
    """The first token's timing; the request is then read to its end, so both sides end idle."""
    before = client.load
    t0 = time.perf_counter()
    ttft = None
    async for _ in client.generate(request_id, prompt, TWO_TOKENS):
        if ttft is None:
            ttft = time.perf_counter() - t0
    after = client.load  # as of the step that sampled the last token
    return FirstToken(ttft, _two_steps_s([(before.num_steps, before.step_seconds)],
                                         [(after.num_steps, after.step_seconds)]))


def first_token_served(http: HTTPConnection, health: HTTPConnection, model: str, prompt: list[int]) -> FirstToken:
    """The first SSE chunk's timing over a kept-alive connection; the stream is then read to its end.
    The body is encoded before the clock starts (the direct side's request is built before it too)."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                       "ignore_eos": True, "stream": True}).encode()
    before = _steps(health)
    t0 = time.perf_counter()
    http.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    response = http.getresponse()
    if response.status != 200:
        raise RuntimeError(f"the gateway answered {response.status}: {response.read().decode()}")
    ttft = None
    while line := response.readline():
        if ttft is None and line.startswith(b"data: {") and b'"choices":[{' in line:
            ttft = time.perf_counter() - t0
    if ttft is None:
        raise RuntimeError("the stream ended without a token")
    return FirstToken(ttft, _two_steps_s(before, _steps(health)))


def _steps(health: HTTPConnection) -> list[tuple[int, float]]:
    """(steps, seconds in steps) of each worker, as the gateway's /health reports them."""
    health.request("GET", "/health")
    workers = json.loads(health.getresponse().read())["workers"]
    return [(w["num_steps"], w["step_seconds"]) for w in workers]


def _two_steps_s(before: list[tuple[int, float]], after: list[tuple[int, float]]) -> float | None:
    """The time of a two-token request's two steps, from (steps, seconds) readings of each engine
    around it; None when some other step ran meanwhile."""
    steps = sum(a[0] - b[0] for a, b in zip(after, before, strict=True))
    seconds = sum(a[1] - b[1] for a, b in zip(after, before, strict=True))
    return seconds if steps == 2 else None


def route_decision_us(prompt_len: int, block_size: int = 16, num_workers: int = 16, repeats: int = 200) -> float:
    """Mean microseconds to hash a prompt's blocks and route it with the KV-aware policy."""
    rng = random.Random(prompt_len)
    prompt = [rng.randrange(1, 100_000) for _ in range(prompt_len)]
    index = KVIndex()
    router = KVAwareRouter()
    workers = [WorkerState(w, block_size=block_size, num_free_blocks=10**6) for w in range(num_workers)]
    t0 = time.perf_counter()
    for i in range(repeats):
        hashes = prompt_block_hashes(prompt, block_size)
        router.route(RouteRequest(hashes, prompt_len, now=float(i)), workers, index)
    return (time.perf_counter() - t0) / repeats * 1e6


def kv_transfer(config: EngineConfig, prompt_len: int, repeats: int = 3) -> dict[str, float]:
    """Median timings of moving one prompt's KV between two in-process engines."""
    prefill, decode = EngineCore(config), EngineCore(config)
    rng = random.Random(prompt_len)
    samples: list[dict[str, float]] = []
    for i in range(repeats):
        prompt = [rng.randrange(300, 4000) for _ in range(prompt_len)]
        params = SamplingParams(max_tokens=8, temperature=0.0)
        prefill.prefill_only(Request(f"p-{i}", prompt, params))
        prefill_s = _timed(lambda: _drain(prefill))  # includes the copy-out, done inside the step
        transfer = prefill.export_kv(f"p-{i}")
        # The copy-out again on its own (same number of blocks), to split it from the prefill.
        copy_s = _timed(lambda: prefill.runner.read_blocks(list(range(transfer.shape[0]))))
        wire: list[KVTransfer] = []
        wire_s = _timed(lambda: wire.append(msgspec.msgpack.decode(msgspec.msgpack.encode(transfer), type=KVTransfer)))
        import_s = _timed(lambda: decode.import_kv(Request(f"p-{i}", prompt, params), wire[0]))
        decode.abort([f"p-{i}"])
        samples.append({"bytes": transfer.num_bytes, "prefill_ms": 1000 * (prefill_s - copy_s),
                        "export_ms": 1000 * copy_s, "wire_ms": 1000 * wire_s, "import_ms": 1000 * import_s})
    return {k: statistics.median(s[k] for s in samples) for k in samples[0]}


def _drain(core: EngineCore) -> None:
    while core.has_work():
        core.step()


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
