"""`tokenfactory bench overhead`: what the factory floor adds to one request, measured in one run.

1. Gateway plus router: TTFT of two-token requests sent one at a time through `tokenfactory serve
   --workers 2` (HTTP, tokenization, the KV-aware router, SSE) against the same requests sent straight
   to one engine process from this process (the baseline). The difference of the medians is what
   the gateway and the router add.
2. The router alone: microseconds per routing decision (hashing the prompt's blocks, the index lookup
   and the policy) for prompts of several lengths over 16 workers.
3. KV transfer for disaggregated serving: bytes and milliseconds to copy a prompt's KV out of one
   engine, encode and decode it, and write it into another, against that prompt's prefill time.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

import httpx
import msgspec

from tokenfactory.bench.serve_bench import free_port, start_server, wait_healthy
from tokenfactory.control.kv_index import KVIndex
from tokenfactory.control.router import KVAwareRouter, RouteRequest, WorkerState
from tokenfactory.engine.config import CacheConfig, EngineConfig
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
    p.add_argument("--requests", type=int, default=100, help="sequential requests per side")
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--route-lens", type=int, nargs="+", default=[512, 4096, 32768],
                   help="prompt lengths for the router timing")
    p.add_argument("--transfer-lens", type=int, nargs="+", default=[128, 512, 2048],
                   help="prompt lengths for the KV transfer timing")


def main(args: argparse.Namespace) -> int:
    model_dir = args.model or str(ensure_tiny_model())
    name = "" if args.model else TINY_MODEL_NAME
    config = EngineConfig.from_pretrained(model_dir, served_model_name=name, cache=CacheConfig(num_blocks=2048))
    rng = random.Random(0)
    prompts = [[rng.randrange(300, 4000) for _ in range(args.prompt_len)] for _ in range(args.requests)]
    direct = asyncio.run(ttft_direct(config, prompts))
    served = ttft_served(model_dir, name, config.name, prompts)
    d50, s50 = statistics.median(direct), statistics.median(served)
    print(f"TTFT p50, {args.requests} two-token requests of {args.prompt_len} tokens, one at a time: "
          f"engine process direct {1000 * d50:.2f} ms, through gateway + kv router (2 workers) {1000 * s50:.2f} ms")
    for length in args.route_lens:
        print(f"router decision, {length}-token prompt, 16 workers: {route_decision_us(length):.0f} us")
    for length in args.transfer_lens:
        t = kv_transfer(config, length)
        print(f"KV transfer, {length}-token prompt: {t['bytes'] / 1e6:.2f} MB; copy out {t['export_ms']:.2f} ms, "
              f"encode+decode {t['wire_ms']:.2f} ms, import {t['import_ms']:.2f} ms; "
              f"prefill itself {t['prefill_ms']:.1f} ms")
    print(f"gateway + router overhead at p50: {1000 * (s50 - d50):.2f} ms")
    return 0


async def ttft_direct(config: EngineConfig, prompts: list[list[int]]) -> list[float]:
    client = AsyncEngineClient(config)
    await client.start()
    try:
        times = []
        for i, prompt in enumerate([prompts[0]] + prompts):  # the first one warms up
            t0 = time.perf_counter()
            async for _ in client.generate(f"direct-{i}", prompt, TWO_TOKENS):
                break
            times.append(time.perf_counter() - t0)
        return times[1:]
    finally:
        await client.shutdown()


def ttft_served(model_dir: str, name: str, model: str, prompts: list[list[int]]) -> list[float]:
    port = free_port()
    server = start_server(model_dir, name, port, max_num_seqs=1, max_num_batched_tokens=2048,
                          extra=["--workers", "2", "--router", "kv"])
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, server)
        times = []
        with httpx.Client(base_url=url, timeout=60) as client:
            for prompt in [prompts[0]] + prompts:
                body = {"model": model, "prompt": prompt, "max_tokens": 2, "temperature": 0,
                        "ignore_eos": True, "stream": True}
                t0 = time.perf_counter()
                with client.stream("POST", "/v1/completions", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: {") and '"choices":[{' in line:
                            times.append(time.perf_counter() - t0)
                            break
        return times[1:]
    finally:
        server.terminate()
        server.wait(30)


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
