"""`tokenfactory bench decode`: decode speed as a fraction of the memory-bandwidth bound.

A decode step must read every weight once and each running request's whole KV context, so
`bytes read / memory bandwidth` is a floor on its time. For each concurrency this runs real
engine decode steps (dummy weights of the chosen shape, prompts of a fixed context length) and
prints tokens/s and the fraction of that bound reached. The bound uses two bandwidths measured
or known in the same run: the device's large-copy bandwidth (measured here, the practical bound)
and, on a known GPU, its datasheet peak.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

import torch

from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.bench.shapes import SHAPES, write_shape
from tokenfactory.engine.tiny import ensure_tiny_model

PEAK_BANDWIDTH_GBS = {"H200": 4800.0, "H100": 3350.0, "B200": 8000.0, "A100": 2039.0}
"""Datasheet HBM bandwidth by GPU name fragment (GB/s)."""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--shape", choices=sorted(SHAPES), help="a known model shape with dummy weights")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64, 256])
    p.add_argument("--context", type=int, default=1024, help="prompt tokens per request")
    p.add_argument("--steps", type=int, default=32, help="decode steps timed per concurrency")


def main(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = _model_dir(args, Path(tmp))
        dtype = args.dtype or ("float32" if args.device == "cpu" else "bfloat16")
        base = EngineConfig.from_pretrained(model_dir, device=args.device, dtype=dtype,
                                            load_format="dummy" if args.shape else "auto")
        itemsize = torch.empty((), dtype=base.torch_dtype).element_size()
        kv_per_token = base.model.kv_bytes_per_token // 2 * itemsize
        max_conc = max(args.concurrency)
        tokens = max_conc * (args.context + args.steps + 8)
        config = EngineConfig.from_pretrained(
            model_dir, device=args.device, dtype=dtype, load_format=base.load_format,
            max_model_len=args.context + args.steps + 8,
            cache=CacheConfig(memory_bytes=int(tokens * kv_per_token * 1.1) + 2**20),
            scheduler=SchedulerConfig(max_num_seqs=max_conc, max_num_batched_tokens=max(8192, args.context)),
        )
        core = EngineCore(config)
        weight_bytes = sum(p.numel() * p.element_size() for p in core.runner.model.parameters())
        copy_gbs = measure_copy_bandwidth(args.device)
        peak = _datasheet_peak(args.device)
        print(f"model {config.name} ({weight_bytes / 1e9:.2f} GB of weights, {kv_per_token} KV bytes/token) "
              f"on {args.device} {dtype}; context {args.context}; measured copy bandwidth "
              f"{copy_gbs:,.0f} GB/s" + (f", datasheet {peak:,.0f} GB/s" if peak else ""), flush=True)
        for conc in args.concurrency:
            step_s = time_decode(core, conc, args.context, args.steps, config.model.vocab_size)
            ctx = args.context + args.steps / 2
            step_bytes = weight_bytes + conc * ctx * kv_per_token
            bound_s = step_bytes / (copy_gbs * 1e9)
            line = (f"concurrency {conc:>4}: {conc / step_s:>10,.0f} tokens/s, {1000 * step_s:7.2f} ms/step, "
                    f"{step_bytes / step_s / 1e9:8,.0f} GB/s = {bound_s / step_s:.0%} of measured copy bandwidth")
            if peak:
                line += f", {step_bytes / (peak * 1e9) / step_s:.0%} of datasheet"
            print(line, flush=True)
    return 0


def time_decode(core: EngineCore, conc: int, context: int, steps: int, vocab: int) -> float:
    """Seconds per decode step with `conc` requests of `context` tokens decoding together."""
    rng = random.Random(conc)
    params = SamplingParams(max_tokens=steps + 4, temperature=0.0, ignore_eos=True)
    for i in range(conc):
        prompt = [rng.randrange(10, vocab) for _ in range(context)]
        core.add_request(Request(f"decode-{conc}-{i}", prompt, params))
    started: set[str] = set()
    while len(started) < conc:  # prefill until every request has its first token
        started.update(out.request_id for out in core.step())
    for _ in range(2):
        core.step()
    _sync(core)
    t0 = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync(core)
    elapsed = time.perf_counter() - t0
    while core.has_work():
        core.step()
    return elapsed / steps


def measure_copy_bandwidth(device: str, nbytes: int = 2**30) -> float:
    """GB/s of a large device-to-device copy (reads plus writes), best of five."""
    n = nbytes // 4 if device.startswith("cuda") else nbytes // 16
    src = torch.ones(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(5):
        _sync_device(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync_device(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * src.numel() * 4 / best / 1e9


def _model_dir(args: argparse.Namespace, tmp: Path) -> str:
    if args.shape:
        return str(write_shape(args.shape, tmp))
    return args.model or str(ensure_tiny_model())


def _datasheet_peak(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(torch.device(device))
    return next((bw for key, bw in PEAK_BANDWIDTH_GBS.items() if key in name), None)


def _sync(core: EngineCore) -> None:
    _sync_device(core.config.device)


def _sync_device(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
