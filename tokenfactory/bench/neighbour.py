"""A noisy neighbour on demand: another process loading the machine in random bursts, so that a
benchmark's figures can be checked on a noisy machine, reproducibly (`--neighbour SEED` of
`bench fidelity` and `bench overhead`)."""

from __future__ import annotations

import contextlib
import multiprocessing
import random
import time
from collections.abc import Iterator
from multiprocessing.synchronize import Event as StopEvent

import torch


def noisy_neighbour(seed: int, stop: StopEvent) -> None:
    """Another tenant of the machine, the kind that makes a shared 2-core machine noisy: bursts of
    0.5-5 s, each of matrix products (compute and the last-level cache) or of sweeps over 16 MB
    (memory bandwidth), with pauses as long, until `stop`."""
    torch.set_num_threads(1)
    rng = random.Random(seed)
    square, sweep = torch.rand(1500, 1500), torch.rand(4_000_000)
    while not stop.is_set():
        burst, pause, compute = rng.uniform(0.5, 5), rng.uniform(0.5, 5), rng.random() < 0.5
        until = time.monotonic() + burst
        while time.monotonic() < until and not stop.is_set():
            if compute:
                square @ square
            else:
                sweep.mul(1.0001).sum()
        stop.wait(pause)


@contextlib.contextmanager
def neighbour(seed: int | None) -> Iterator[None]:
    """A `noisy_neighbour` process for the block's length (none when `seed` is None): a
    reproducible noisy machine, to see how a benchmark's figure holds up on one."""
    if seed is None:
        yield
        return
    context = multiprocessing.get_context("spawn")
    stop = context.Event()
    process = context.Process(target=noisy_neighbour, args=(seed, stop), daemon=True)
    process.start()
    try:
        yield
    finally:
        stop.set()
        process.join(timeout=10)
        if process.is_alive():
            process.kill()
