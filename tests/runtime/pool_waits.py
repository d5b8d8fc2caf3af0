"""Waiting on a live pool's load reports, which lag its engines by up to a step."""

from __future__ import annotations

import asyncio
import time

from tokenfactory.runtime.pool import WorkerPool


async def all_blocks_free(pool: WorkerPool, timeout_s: float = 10.0) -> bool:
    """Whether every worker reports all its KV blocks free within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if all(w.load.num_free_blocks == w.load.num_total_blocks for w in pool.workers):
            return True
        await asyncio.sleep(0.02)
    return False
