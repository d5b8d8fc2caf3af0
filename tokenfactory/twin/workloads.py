"""Workloads for the twin: trace replays (Mooncake, Azure) and synthetic Poisson arrivals.

A workload is a list of `TraceRequest`s sorted by arrival, in simulated seconds. Prompts are
synthesised from them only when a request arrives (`prompt_token_ids`), so a 12k-request trace
with 145M prompt tokens never sits in memory at once.

Token synthesis keeps prefix reuse physical: a Mooncake hash_id names one 512-token block; its
tokens are two ids encoding the hash_id followed by a shared filler, so equal hash_ids give
equal blocks, different ones differ in their first KV block, and the real KV cache's chained
block hashes find exactly the reuse the trace records. Prompts without hash_ids (Azure,
synthetic) start with two ids unique to the request, so nothing is shared.
"""

from __future__ import annotations

import csv
import json
import math
import random
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake hash_id."""
VOCAB = 128000
"""Token ids are drawn below this (fits the Llama-3 vocabulary)."""
_FILLER = [(7919 * i) % VOCAB for i in range(2, 2 * MOONCAKE_BLOCK_TOKENS)]
"""Shared tail of every synthetic block; one list, so building a prompt copies pointers only."""

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data"
"""../shared/data from the repository root."""
MOONCAKE_TRACE = DATA_DIR / "mooncake_conversation_trace.jsonl"
AZURE_TRACE = DATA_DIR / "AzureLLMInferenceTrace_conv.csv"


@dataclass(frozen=True, slots=True)
class TraceRequest:
    arrival_time: float
    """Simulated seconds from the start of the workload."""
    input_length: int
    output_length: int
    hash_ids: tuple[int, ...] = ()
    """One id per 512-token prompt block (Mooncake); empty means a unique prompt."""
    uid: int = 0
    """Distinguishes unique prompts."""


def _leading_ids(value: int) -> list[int]:
    return [value % VOCAB, value // VOCAB % VOCAB]


def block_tokens(hash_id: int, length: int = MOONCAKE_BLOCK_TOKENS) -> list[int]:
    """The first `length` tokens of the block named `hash_id`."""
    return (_leading_ids(hash_id) + _FILLER)[:length]


def prompt_token_ids(request: TraceRequest) -> list[int]:
    """The request's prompt: its hash_id blocks (the last one partial), or a unique prompt."""
    if not request.hash_ids:
        unique = _leading_ids(request.uid)
        while len(unique) < request.input_length:
            unique.extend(_FILLER)
        return unique[: request.input_length]
    tokens: list[int] = []
    for hash_id in request.hash_ids[:-1]:
        tokens.extend(block_tokens(hash_id))
    last_length = request.input_length - MOONCAKE_BLOCK_TOKENS * (len(request.hash_ids) - 1)
    tokens.extend(block_tokens(request.hash_ids[-1], last_length))
    return tokens


@dataclass(frozen=True, slots=True)
class BlockReuse:
    """How much of a trace's prompts an unlimited shared cache would serve, from its hash_ids."""

    block_fraction: float
    """Prompt blocks whose hash_id appeared before (the Mooncake data's own "about 37%")."""
    token_fraction: float
    """The same weighted by each block's tokens (the last block of a prompt is partial)."""


def block_reuse(requests: list[TraceRequest]) -> BlockReuse:
    """The reuse an infinitely large shared prefix cache would see, straight from the trace."""
    seen: set[int] = set()
    blocks = reused_blocks = tokens = reused_tokens = 0
    for request in requests:
        last = len(request.hash_ids) - 1
        for i, hash_id in enumerate(request.hash_ids):
            size = MOONCAKE_BLOCK_TOKENS if i < last else request.input_length - MOONCAKE_BLOCK_TOKENS * last
            blocks += 1
            tokens += size
            if hash_id in seen:
                reused_blocks += 1
                reused_tokens += size
            else:
                seen.add(hash_id)
    return BlockReuse(reused_blocks / blocks if blocks else 0.0, reused_tokens / tokens if tokens else 0.0)


def load_mooncake(
    path: str | Path = MOONCAKE_TRACE, speedup: float = 1.0, limit: int | None = None
) -> list[TraceRequest]:
    """Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids."""
    requests: list[TraceRequest] = []
    with open(path) as f:
        for uid, line in enumerate(f):
            if limit is not None and uid >= limit:
                break
            row = json.loads(line)
            requests.append(
                TraceRequest(
                    arrival_time=row["timestamp"] / 1000.0,
                    input_length=max(1, int(row["input_length"])),
                    output_length=max(1, int(row["output_length"])),
                    hash_ids=tuple(row["hash_ids"]),
                    uid=uid,
                )
            )
    return _rebase(requests, speedup)


def load_azure(path: str | Path = AZURE_TRACE, speedup: float = 1.0, limit: int | None = None) -> list[TraceRequest]:
    """Azure LLM inference CSV: TIMESTAMP, ContextTokens, GeneratedTokens; unique prompts."""
    requests: list[TraceRequest] = []
    with open(path, newline="") as f:
        for uid, row in enumerate(csv.DictReader(f)):
            if limit is not None and uid >= limit:
                break
            stamp = datetime.fromisoformat(row["TIMESTAMP"][:26])  # 7 fractional digits -> 6
            requests.append(
                TraceRequest(
                    arrival_time=stamp.timestamp(),
                    input_length=max(1, int(row["ContextTokens"])),
                    output_length=max(1, int(row["GeneratedTokens"])),
                    uid=uid,
                )
            )
    return _rebase(requests, speedup)


def load_trace(
    path: str | Path, fmt: str = "auto", speedup: float = 1.0, limit: int | None = None
) -> list[TraceRequest]:
    """Load a trace file; `fmt` auto picks by extension (.jsonl Mooncake, .csv Azure)."""
    path = Path(path)
    if fmt == "auto":
        fmt = "azure" if path.suffix == ".csv" else "mooncake"
    if fmt == "mooncake":
        return load_mooncake(path, speedup, limit)
    if fmt == "azure":
        return load_azure(path, speedup, limit)
    raise ValueError(f"trace format must be auto, mooncake or azure, got {fmt!r}")


def _rebase(requests: list[TraceRequest], speedup: float) -> list[TraceRequest]:
    """Sort by arrival, start at 0 and compress time by `speedup`."""
    if speedup <= 0:
        raise ValueError(f"speedup must be positive, got {speedup}")
    requests.sort(key=lambda r: r.arrival_time)
    start = requests[0].arrival_time if requests else 0.0
    return [
        TraceRequest((r.arrival_time - start) / speedup, r.input_length, r.output_length, r.hash_ids, r.uid)
        for r in requests
    ]


@dataclass(frozen=True, slots=True)
class LengthDistribution:
    """A fixed length (sigma 0) or a lognormal one with the given mean."""

    mean: int
    sigma: float = 0.0
    maximum: int = 1 << 20

    def sample(self, rng: random.Random) -> int:
        if self.sigma == 0:
            return self.mean
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[length] = mean
        return max(1, min(self.maximum, round(rng.lognormvariate(mu, self.sigma))))


def poisson_workload(
    rate: float,
    num_requests: int,
    input_length: LengthDistribution,
    output_length: LengthDistribution,
    seed: int = 0,
) -> list[TraceRequest]:
    """`num_requests` unique prompts arriving as a Poisson process of `rate` requests/s."""
    rng = random.Random(seed)
    now, requests = 0.0, []
    for uid in range(num_requests):
        requests.append(TraceRequest(now, input_length.sample(rng), output_length.sample(rng), uid=uid))
        now += rng.expovariate(rate)
    return requests
