"""Workloads for the twin: trace replays (Mooncake, Azure), synthetic open-loop arrivals
(Poisson, gamma for burstiness, a diurnal day), closed-loop clients and agentic sessions.

An open-loop workload is a list of `TraceRequest`s sorted by arrival, in simulated seconds. A
closed-loop one (`ClosedLoop`, `AgenticSessions`) is a `DynamicWorkload`: it starts some requests
and, told when one finishes, returns the requests that follow it (a client's next request after its
think time, a session's next turn once all its sub-agents are done). Prompts are synthesised only
when a request arrives (`prompt_token_ids`), so a 12k-request trace with 145M prompt tokens never
sits in memory at once.

Token synthesis keeps prefix reuse physical: a Mooncake hash_id names one 512-token block; its
tokens are two ids encoding the hash_id followed by a shared filler, so equal hash_ids give
equal blocks, different ones differ in their first KV block, and the real KV cache's chained
block hashes find exactly the reuse the trace records. Prompts without hash_ids (Azure,
synthetic) start with two ids unique to the request, so nothing is shared.
"""

from __future__ import annotations

import array
import csv
import itertools
import json
import math
import multiprocessing
import queue
import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np

from tokenfactory.engine.kv_cache import ROOT_HASH, prompt_block_hashes

MOONCAKE_BLOCK_TOKENS = 512
"""Tokens per Mooncake hash_id."""
VOCAB = 128000
"""Token ids are drawn below this (fits the Llama-3 vocabulary)."""
_FILLER = [(7919 * i) % VOCAB for i in range(2, 2 * MOONCAKE_BLOCK_TOKENS)]
"""Shared tail of every synthetic block; one list, so building a prompt copies pointers only."""
_BLOCK_FILLER = _FILLER[: MOONCAKE_BLOCK_TOKENS - 2]
"""The tail of a whole block (after its two leading ids)."""

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
    session_id: str | None = None
    """The conversation, client or agent it belongs to (reaches the router as RouteRequest.session_id)."""


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
    for hash_id in request.hash_ids[:-1]:  # block_tokens(hash_id), without copying the filler twice
        tokens += _leading_ids(hash_id)
        tokens += _BLOCK_FILLER
    last_length = request.input_length - MOONCAKE_BLOCK_TOKENS * (len(request.hash_ids) - 1)
    tokens.extend(block_tokens(request.hash_ids[-1], last_length))
    return tokens


class PromptHasher:
    """`prompt_block_hashes(prompt_token_ids(request), block_size)`, hashing each distinct
    512-token hash_id block once: a block's chained hashes follow from its parent's hash and its
    hash_id alone, and a trace repeats blocks (the Mooncake conversation trace: 288,500 block
    references, 182,790 distinct). Prompts without hash_ids are hashed from their tokens."""

    def __init__(self, block_size: int) -> None:
        self.block_size = block_size
        self._blocks: dict[tuple[int, int], array.array] = {}
        """(parent hash, hash_id) -> the block's chained hashes (machine words: a third of a list's memory)."""
        self._ahead: _HashAhead | None = None

    def __call__(self, request: TraceRequest, tokens: list[int] | None = None) -> list[int]:
        if self._ahead is not None:
            hashes = self._ahead.take(request)
            if hashes is not None:
                return hashes
        bs = self.block_size
        if not request.hash_ids or MOONCAKE_BLOCK_TOKENS % bs:
            return prompt_block_hashes(tokens if tokens is not None else prompt_token_ids(request), bs)
        hashes = []
        parent = ROOT_HASH
        for hash_id in request.hash_ids:
            block = self._blocks.get((parent, hash_id))
            if block is None:
                block = array.array("Q", prompt_block_hashes(block_tokens(hash_id), bs, parent))
                self._blocks[parent, hash_id] = block
            hashes.extend(block)
            parent = block[-1]
        del hashes[request.input_length // bs :]  # the last hash_id block may be partial
        return hashes

    def hash_ahead(self, requests: Sequence[TraceRequest]) -> None:
        """Hash the prompts of `requests` in a second (forked) process while this one simulates:
        calls for these requests, in this order, then just read the results, the same hashes.
        Hashing is a sixth of a Mooncake replay's time and its prompts are known from the start.
        Does nothing inside a daemon process (a pool's worker may not fork)."""
        self.close()
        if requests and not multiprocessing.current_process().daemon:
            self._ahead = _HashAhead(self.block_size, requests)

    def close(self) -> None:
        """Stop hashing ahead (a no-op when not started); later calls hash in this process."""
        if self._ahead is not None:
            self._ahead.close()
            self._ahead = None


class _HashAhead:
    """A forked process hashing a request list's prompts in order, in batches; the parent takes
    each request's hashes as it arrives. Its CPU time counts as a child's (`os.times`)."""

    def __init__(self, block_size: int, requests: Sequence[TraceRequest]) -> None:
        context = multiprocessing.get_context("fork")
        self._requests = requests
        self._position = 0
        """Index of the next request whose hashes come from the child."""
        self._ready: list[list[int]] = []
        """The current batch's hashes, reversed (taken from the end)."""
        self._queue = context.Queue()
        self._process = context.Process(target=_hash_requests, args=(block_size, requests, self._queue), daemon=True)
        self._process.start()

    def take(self, request: TraceRequest) -> list[int] | None:
        """The hashes of `request` if it is the next of the list, else None (hash it yourself)."""
        if self._position >= len(self._requests) or self._requests[self._position] is not request:
            return None
        if not self._ready:
            self._ready = self._next_batch()
        self._position += 1
        return self._ready.pop()

    def _next_batch(self) -> list[list[int]]:
        while True:
            try:
                lengths, data = self._queue.get(timeout=1.0)
                break
            except queue.Empty:
                if not self._process.is_alive():
                    raise RuntimeError(f"the prompt-hashing process ended early (exit code {self._process.exitcode})")
        flat = array.array("Q", data).tolist()
        batch, end = [], len(flat)
        for length in reversed(lengths):
            batch.append(flat[end - length : end])
            end -= length
        return batch

    def close(self) -> None:
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._queue.close()


def _hash_requests(block_size: int, requests: Sequence[TraceRequest], out: multiprocessing.Queue) -> None:
    """The hashing process: every request's prompt hashes, in order, in growing batches (the
    first small, so the simulation starts at once)."""
    hasher = PromptHasher(block_size)
    start, size = 0, 16
    while start < len(requests):
        batch = [hasher(r) for r in requests[start : start + size]]
        out.put(([len(h) for h in batch], array.array("Q", itertools.chain.from_iterable(batch)).tobytes()))
        start, size = start + size, min(2 * size, 512)


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

    def __post_init__(self) -> None:
        if self.mean < 1 or self.sigma < 0:
            raise ValueError(f"a length needs mean >= 1 and sigma >= 0, got {self.mean}, {self.sigma}")

    def sample(self, rng: random.Random) -> int:
        if self.sigma == 0:
            return self.mean
        mu = math.log(self.mean) - self.sigma**2 / 2  # so that E[length] = mean
        return max(1, min(self.maximum, round(rng.lognormvariate(mu, self.sigma))))

    def sample_many(self, rng: np.random.Generator, count: int) -> np.ndarray:
        """`count` lengths at once (numpy: a million in milliseconds)."""
        if self.sigma == 0:
            return np.full(count, self.mean, dtype=np.int64)
        mu = math.log(self.mean) - self.sigma**2 / 2
        return np.clip(np.rint(rng.lognormal(mu, self.sigma, count)), 1, self.maximum).astype(np.int64)


def synthetic_workload(
    rate: float,
    num_requests: int,
    input_length: LengthDistribution,
    output_length: LengthDistribution,
    burstiness: float = 1.0,
    seed: int = 0,
) -> list[TraceRequest]:
    """`num_requests` unique prompts at `rate` requests/s on average. Gaps between arrivals are
    gamma distributed with coefficient of variation `burstiness`: 1 is a Poisson process, above 1
    bursts and lulls (shape 1/burstiness^2), below 1 more regular than Poisson."""
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate}, {burstiness}")
    rng = random.Random(seed)
    shape = 1 / burstiness**2
    now, requests = 0.0, []
    for uid in range(num_requests):
        requests.append(TraceRequest(now, input_length.sample(rng), output_length.sample(rng), uid=uid))
        now += rng.expovariate(rate) if burstiness == 1 else rng.gammavariate(shape, 1 / (rate * shape))
    return requests


def poisson_workload(
    rate: float,
    num_requests: int,
    input_length: LengthDistribution,
    output_length: LengthDistribution,
    seed: int = 0,
) -> list[TraceRequest]:
    """`num_requests` unique prompts arriving as a Poisson process of `rate` requests/s."""
    return synthetic_workload(rate, num_requests, input_length, output_length, 1.0, seed)


def diurnal_workload(
    num_requests: int,
    input_length: LengthDistribution,
    output_length: LengthDistribution,
    duration_s: float = 86400.0,
    peak_to_trough: float = 3.0,
    seed: int = 0,
) -> list[TraceRequest]:
    """A day of traffic: a Poisson process whose rate follows one cosine cycle over `duration_s`,
    lowest at the start (midnight) and `peak_to_trough` times higher halfway (noon).

    Given the count, the arrival times are independent draws from rate(t) / total, sorted, and
    drawn by inverting the cumulative rate on a grid: a million requests in about a second."""
    if num_requests < 1 or duration_s <= 0 or peak_to_trough < 1:
        raise ValueError("need num_requests >= 1, duration_s > 0 and peak_to_trough >= 1")
    depth = (peak_to_trough - 1) / (peak_to_trough + 1)  # rate ~ 1 - depth cos(2 pi t / duration)
    grid = np.linspace(0.0, duration_s, 1 << 16)
    cumulative = grid - depth * duration_s / (2 * math.pi) * np.sin(2 * math.pi * grid / duration_s)
    rng = np.random.default_rng(seed)
    arrivals = np.interp(np.sort(rng.uniform(0.0, duration_s, num_requests)), cumulative, grid)
    inputs = input_length.sample_many(rng, num_requests)
    outputs = output_length.sample_many(rng, num_requests)
    return [
        TraceRequest(t, i, o, uid=uid)
        for uid, (t, i, o) in enumerate(zip(arrivals.tolist(), inputs.tolist(), outputs.tolist()))
    ]


class DynamicWorkload(ABC):
    """Arrivals that depend on the run: some requests come only after others finish."""

    min_think_s: float = 0.0
    """No follow-up arrives sooner than this after the finish that released it (the simulator
    skips ahead through decode steps no further than the earliest possible follow-up)."""

    @abstractmethod
    def start(self) -> list[TraceRequest]:
        """The requests known from the outset, sorted by arrival."""

    @abstractmethod
    def on_finish(self, request: TraceRequest, now: float) -> list[TraceRequest]:
        """`request` finished (or was rejected) at `now`: the requests it releases, arriving at
        `now + min_think_s` or later."""


class ClosedLoop(DynamicWorkload):
    """`concurrency` clients, each sending its next request `think_s` after its previous one
    finished, `num_requests` in all: the load of a benchmark client such as AIPerf or an MLPerf
    offline run (fixed lengths: sigma 0). Prompts are unique."""

    def __init__(
        self,
        concurrency: int,
        num_requests: int,
        input_length: LengthDistribution,
        output_length: LengthDistribution,
        think_s: float = 0.0,
        seed: int = 0,
    ) -> None:
        if concurrency < 1 or num_requests < 1 or think_s < 0:
            raise ValueError("need concurrency >= 1, num_requests >= 1 and think_s >= 0")
        self.concurrency, self.num_requests = concurrency, num_requests
        self.input_length, self.output_length = input_length, output_length
        self.min_think_s = think_s
        self._rng = random.Random(seed)
        self._sent = 0

    def _next(self, client: int, now: float) -> list[TraceRequest]:
        if self._sent >= self.num_requests:
            return []
        self._sent += 1
        length, output = self.input_length.sample(self._rng), self.output_length.sample(self._rng)
        return [TraceRequest(now, length, output, uid=self._sent - 1, session_id=f"client-{client}")]

    def start(self) -> list[TraceRequest]:
        return [r for client in range(self.concurrency) for r in self._next(client, 0.0)]

    def on_finish(self, request: TraceRequest, now: float) -> list[TraceRequest]:
        assert request.session_id is not None
        return self._next(int(request.session_id.removeprefix("client-")), now + self.min_think_s)


@dataclass(slots=True)
class _Session:
    """One agent's conversation: its context as 512-token blocks, and what is left to do."""

    context: list[int]
    """hash_ids of the context's blocks (the last one possibly partial)."""
    length: int
    """Context tokens so far."""
    turns_left: int
    parent: str | None = None
    waiting_for: int = 0
    """Sub-agents still running (the session resumes when this reaches 0)."""
    results: int = 0
    """Tokens the finished sub-agents return into this context."""
    fanouts: int = 0
    """Fan-outs so far (each names its sub-agents apart: "task-3.0-1" is fan-out 0's second)."""


@dataclass
class AgenticSessions(DynamicWorkload):
    """Agent tasks: each a session of turns over one growing context (the previous prompt, the
    model's answer and the new tool output or message), so every turn re-reads the last one's
    prefix; after a turn a task may fan out sub-agents, which start from its context (rounded up
    to a whole 512-token block) plus their own instruction, run their own turns, and return a
    result into the task's context; the task's next turn waits for all of them. Tasks arrive as a Poisson process;
    every turn follows a think time (tool calls, the user). All tasks share a system prompt.

    Prefix reuse is physical: contexts are hash_id blocks like the Mooncake trace's, and a turn's
    prompt extends the previous turn's (the model's answer counts as context tokens; the KV
    cache reuses the previous prompt, not the simulated answer tokens)."""

    num_tasks: int
    task_rate: float
    """Tasks per second."""
    turns: LengthDistribution = field(default_factory=lambda: LengthDistribution(6, 0.5, maximum=50))
    system_prompt_tokens: int = 2048
    first_prompt: LengthDistribution = field(default_factory=lambda: LengthDistribution(1500, 0.8))
    tool_output: LengthDistribution = field(default_factory=lambda: LengthDistribution(600, 1.0))
    """New tokens entering the context before each later turn (tool results, user messages)."""
    output: LengthDistribution = field(default_factory=lambda: LengthDistribution(250, 0.8))
    fanout_probability: float = 0.2
    """Chance that a turn fans out sub-agents."""
    fanout: LengthDistribution = field(default_factory=lambda: LengthDistribution(3, 0.5, maximum=16))
    sub_turns: LengthDistribution = field(default_factory=lambda: LengthDistribution(2, 0.5, maximum=20))
    think_s: float = 2.0
    """Mean think time between turns (exponential)."""
    max_context: int = 120_000
    """A session ends early rather than outgrow the model's context window."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.num_tasks < 1 or self.task_rate <= 0 or self.think_s < 0:
            raise ValueError("need num_tasks >= 1, task_rate > 0 and think_s >= 0")
        if not 0 <= self.fanout_probability <= 1:
            raise ValueError(f"fanout_probability must be in [0, 1], got {self.fanout_probability}")
        self._rng = random.Random(self.seed)
        self._sessions: dict[str, _Session] = {}
        self._uids = iter(range(1 << 62))
        self._block_ids = iter(range(1 << 24, 1 << 62))  # past the shared system-prompt blocks

    def _grow(self, session: _Session, tokens: int) -> None:
        session.length += tokens
        while len(session.context) * MOONCAKE_BLOCK_TOKENS < session.length:
            session.context.append(next(self._block_ids))

    def _turn(self, session_id: str, now: float) -> TraceRequest:
        session = self._sessions[session_id]
        session.turns_left -= 1
        blocks = tuple(session.context[: -(-session.length // MOONCAKE_BLOCK_TOKENS)])
        output = self.output.sample(self._rng)
        return TraceRequest(now, session.length, output, blocks, next(self._uids), session_id)

    def _new_session(self, session_id: str, parent: str | None, turns: int) -> None:
        if parent is None:  # a task: the shared system prompt, then its own first message
            blocks = -(-self.system_prompt_tokens // MOONCAKE_BLOCK_TOKENS)
            session = _Session(list(range(blocks)), self.system_prompt_tokens, turns)
            self._grow(session, self.first_prompt.sample(self._rng))
        else:  # a sub-agent: the parent's context (to a whole block), then its own instruction
            context = self._sessions[parent]
            blocks = -(-context.length // MOONCAKE_BLOCK_TOKENS)
            session = _Session(context.context[:blocks], blocks * MOONCAKE_BLOCK_TOKENS, turns, parent)
            self._grow(session, self.tool_output.sample(self._rng))
        self._sessions[session_id] = session

    def start(self) -> list[TraceRequest]:
        now, requests = 0.0, []
        for task in range(self.num_tasks):
            session_id = f"task-{task}"
            self._new_session(session_id, None, max(1, self.turns.sample(self._rng)))
            requests.append(self._turn(session_id, now))
            now += self._rng.expovariate(self.task_rate)
        return requests

    def _think(self) -> float:
        return self._rng.expovariate(1 / self.think_s) if self.think_s else 0.0

    def on_finish(self, request: TraceRequest, now: float) -> list[TraceRequest]:
        session_id = request.session_id
        assert session_id is not None
        session = self._sessions[session_id]
        self._grow(session, request.output_length)
        # Only tasks fan out (sub-agents of sub-agents would grow without bound).
        if session.parent is None and session.turns_left > 0 and self._rng.random() < self.fanout_probability:
            children = max(1, self.fanout.sample(self._rng))
            session.waiting_for = children
            session.fanouts += 1
            released = []
            for i in range(children):
                child = f"{session_id}.{session.fanouts - 1}-{i}"
                self._new_session(child, session_id, max(1, self.sub_turns.sample(self._rng)))
                released.append(self._turn(child, now + self._think()))
            return released
        return self._after_turn(session_id, now)

    def _after_turn(self, session_id: str, now: float) -> list[TraceRequest]:
        """The session's next turn, or its end (which may resume its parent)."""
        session = self._sessions[session_id]
        if session.turns_left > 0 and session.length < self.max_context:
            self._grow(session, session.results + self.tool_output.sample(self._rng))
            session.results = 0
            return [self._turn(session_id, now + self._think())]
        del self._sessions[session_id]
        if session.parent is None:
            return []
        parent = self._sessions[session.parent]
        parent.results += min(session.length, self.output.sample(self._rng))  # the sub-agent's report
        parent.waiting_for -= 1
        return self._after_turn(session.parent, now) if parent.waiting_for == 0 else []
