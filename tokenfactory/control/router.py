"""Routing policies: which worker serves a request. Pure: state in, decision out.

A router sees each worker only as a `WorkerState` and the workers' caches only through a
`PrefixIndex`; it never reads a clock (the driver passes `now` in `RouteRequest`) and never does
I/O, so the live pool and the digital twin run the very same objects.

`KVAwareRouter` picks the worker with the least cost, in units of one block of prefill:

    cost(w) = prefill_weight * (queued prefill of w + (1 + work_weight) * blocks w must compute)
            + decode_weight * w.num_running + waiting_weight * w.num_waiting
            + balance_weight * (prefill this router sent w - the least it sent any candidate)

The first line is this request's own wait on w (the prefill queued ahead of it plus its own) and,
weighted by `work_weight`, the work it adds to the fleet. That work counts twice by default: a
prefix recomputed elsewhere costs that worker's later requests the same time again, and its
second copy takes cache room, evicting another prefix that some later request must recompute.
(Tuned in the twin on the Mooncake trace: a higher weight keeps more hits, at some TTFT p99.)
The last line balances the work each worker was given over the whole run (the router's own
ledger of the prefill tokens it routed, net of predicted hits): among otherwise equal workers,
a new conversation goes to the one given least so far, not to the lowest id. So a cached
prefix holds its requests on their worker unless that worker's queue or its share of the work
outweighs the prefill the cache saves.

Baselines: `RoundRobinRouter`, `RandomRouter`, `LeastLoadedRouter`.
Any router can keep session affinity: a session goes back to its last worker while that worker
is alive and not overloaded.
"""

from __future__ import annotations

import math
import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from tokenfactory.control.kv_index import PrefixIndex, WorkerId


class NoWorkerError(RuntimeError):
    """No worker is alive to take the request."""


@dataclass(slots=True)
class WorkerState:
    """One worker as a router sees it."""

    worker_id: WorkerId
    num_running: int = 0
    """Requests decoding (their prompt is done)."""
    num_waiting: int = 0
    """Requests whose prompt is not computed yet."""
    queued_prefill_tokens: int = 0
    """Prompt tokens those waiting requests still have to compute (0 if unknown)."""
    num_free_blocks: int = 0
    """KV blocks free or evictable."""
    block_size: int = 16
    alive: bool = True


@dataclass(slots=True, frozen=True)
class RouteRequest:
    """What a router knows of a request."""

    block_hashes: Sequence[int]
    """Chained hashes of the prompt's full blocks (`kv_cache.prompt_block_hashes`)."""
    num_prompt_tokens: int
    session_id: str | None = None
    now: float = 0.0
    """The driver's clock, in seconds (simulated time in the twin)."""


@dataclass(slots=True)
class RouterMetrics:
    decisions: int = 0
    mode: str = "none"
    """"events" or "approximate" (the index's mode); "none" without an index."""
    predicted_overlap_tokens: int = 0
    """Sum over decisions of the prefix tokens the index predicted cached on the chosen worker."""
    forgone_overlap_tokens: int = 0
    """Sum over decisions of the prefix tokens another worker held beyond the chosen one's:
    what the policy gave up for load (0 without an index)."""
    affinity_hits: int = 0

    @property
    def mean_predicted_overlap_tokens(self) -> float:
        return self.predicted_overlap_tokens / self.decisions if self.decisions else 0.0


@dataclass(slots=True)
class Choice:
    """One worker's case for the request: its cached prefix and what it would cost."""

    worker: WorkerState
    cached_tokens: int
    cost: float = 0.0


class Router(ABC):
    """The shared frame: filter alive workers, honour affinity, ask `_choose`, record the decision."""

    def __init__(self, session_affinity: bool = False, max_waiting: int = 16, max_sessions: int = 65536) -> None:
        self.session_affinity = session_affinity
        self.max_waiting = max_waiting
        """A worker with this many requests waiting counts as overloaded (affinity gives way)."""
        self.max_sessions = max_sessions
        """Sessions remembered, least recently routed forgotten first (a server runs for months)."""
        self.metrics = RouterMetrics()
        self._sessions: OrderedDict[str, WorkerId] = OrderedDict()

    def route(
        self, request: RouteRequest, workers: Sequence[WorkerState], index: PrefixIndex | None = None
    ) -> WorkerId:
        """The worker for `request`; `index` (optional) says which prefixes each worker holds."""
        overlap = index.overlap(request.block_hashes, request.now) if index is not None else {}
        choices = [
            Choice(w, min(overlap.get(w.worker_id, 0) * w.block_size, max(request.num_prompt_tokens - 1, 0)))
            for w in workers if w.alive
        ]
        if not choices:
            raise NoWorkerError("no worker is alive")
        chosen = self._affine(request, choices) or self._choose(request, choices)
        self.metrics.forgone_overlap_tokens += max(c.cached_tokens for c in choices) - chosen.cached_tokens
        self._record(request, chosen, index)
        return chosen.worker.worker_id

    def _affine(self, request: RouteRequest, choices: list[Choice]) -> Choice | None:
        if not self.session_affinity or request.session_id is None:
            return None
        last = self._sessions.get(request.session_id)
        for choice in choices:
            if choice.worker.worker_id == last and not self.overloaded(choice, request):
                self.metrics.affinity_hits += 1
                return choice
        return None

    def overloaded(self, choice: Choice, request: RouteRequest) -> bool:
        """Too many waiting requests, or too few free blocks for the part not cached."""
        worker = choice.worker
        blocks_needed = math.ceil((request.num_prompt_tokens - choice.cached_tokens) / worker.block_size)
        return worker.num_waiting >= self.max_waiting or worker.num_free_blocks < blocks_needed

    def _record(self, request: RouteRequest, chosen: Choice, index: PrefixIndex | None) -> None:
        self.metrics.decisions += 1
        self.metrics.mode = index.mode if index is not None else "none"
        self.metrics.predicted_overlap_tokens += chosen.cached_tokens
        if request.session_id is not None:
            self._sessions[request.session_id] = chosen.worker.worker_id
            self._sessions.move_to_end(request.session_id)
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        if index is not None:
            index.record_routed(chosen.worker.worker_id, request.block_hashes, request.now)

    @abstractmethod
    def _choose(self, request: RouteRequest, choices: list[Choice]) -> Choice:
        """The policy itself: pick one of the alive workers' choices (never empty)."""


def by_id(choice: Choice) -> WorkerId:
    return choice.worker.worker_id


def next_in_turn(choices: list[Choice], last: WorkerId | None) -> Choice:
    """The choice with the lowest worker id above `last`, wrapping around to the lowest."""
    ordered = sorted(choices, key=by_id)
    return next((c for c in ordered if last is not None and c.worker.worker_id > last), ordered[0])


class KVAwareRouter(Router):
    """Least cost, counting the prefix each worker already holds and the work each was given
    (see module doc), among the workers not overloaded (all of them when every one is).

    With `temperature` > 0 the choice is sampled, weight exp(-(cost - min cost) / temperature),
    from `rng` (seed it for repeatable runs); at 0 it is the cheapest worker, lowest id on ties.
    """

    def __init__(
        self,
        prefill_weight: float = 1.0,
        decode_weight: float = 1.0,
        waiting_weight: float = 1.0,
        work_weight: float = 2.0,
        balance_weight: float = 0.02,
        temperature: float = 0.0,
        rng: random.Random | None = None,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if work_weight < 0 or balance_weight < 0:
            raise ValueError(f"work_weight and balance_weight must be >= 0, got {work_weight}, {balance_weight}")
        self.prefill_weight = prefill_weight
        self.decode_weight = decode_weight
        self.waiting_weight = waiting_weight
        self.work_weight = work_weight
        self.balance_weight = balance_weight
        self.temperature = temperature
        self.rng = rng if rng is not None else random.Random(0)
        self.routed_prefill_tokens: dict[WorkerId, int] = {}
        """Per worker, the prompt tokens routed to it minus those predicted cached: its share
        of the fleet's prefill work so far, which the balance term evens out."""

    def cost(self, request: RouteRequest, choice: Choice, least_routed: int = 0) -> float:
        """`least_routed`: the fewest prefill tokens routed to any candidate worker."""
        worker = choice.worker
        to_compute = request.num_prompt_tokens - choice.cached_tokens
        prefill_tokens = worker.queued_prefill_tokens + (1 + self.work_weight) * to_compute
        excess = self.routed_prefill_tokens.get(worker.worker_id, least_routed) - least_routed
        return (
            (self.prefill_weight * prefill_tokens + self.balance_weight * excess) / worker.block_size
            + self.decode_weight * worker.num_running
            + self.waiting_weight * worker.num_waiting
        )

    def _choose(self, request: RouteRequest, choices: list[Choice]) -> Choice:
        # An overloaded worker would only queue the request: take one only if all are.
        choices = [c for c in choices if not self.overloaded(c, request)] or choices
        routed = self.routed_prefill_tokens
        known = [routed[c.worker.worker_id] for c in choices if c.worker.worker_id in routed]
        least = min(known, default=0)
        for choice in choices:
            routed.setdefault(choice.worker.worker_id, least)  # a newcomer starts level with the least
            choice.cost = self.cost(request, choice, least)
        choices = sorted(choices, key=lambda c: (c.cost, c.worker.worker_id))
        if self.temperature == 0 or len(choices) == 1:
            return choices[0]
        best = choices[0].cost
        weights = [math.exp(-(c.cost - best) / self.temperature) for c in choices]
        return self.rng.choices(choices, weights=weights)[0]

    def _record(self, request: RouteRequest, chosen: Choice, index: PrefixIndex | None) -> None:
        super()._record(request, chosen, index)  # affinity's picks count too
        worker_id = chosen.worker.worker_id
        routed = self.routed_prefill_tokens
        routed[worker_id] = routed.get(worker_id, 0) + request.num_prompt_tokens - chosen.cached_tokens


class RoundRobinRouter(Router):
    """Each alive worker in turn (by id), whatever it holds."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._last: WorkerId | None = None

    def _choose(self, request: RouteRequest, choices: list[Choice]) -> Choice:
        chosen = next_in_turn(choices, self._last)
        self._last = chosen.worker.worker_id
        return chosen


class RandomRouter(Router):
    """A uniformly random alive worker, from a seeded `rng`."""

    def __init__(self, rng: random.Random | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self.rng = rng if rng is not None else random.Random(0)

    def _choose(self, request: RouteRequest, choices: list[Choice]) -> Choice:
        return self.rng.choice(sorted(choices, key=by_id))


class LeastLoadedRouter(Router):
    """Fewest requests (running + waiting); then most free blocks; ties taken in turn.

    Workers equally loaded (all of them, when requests come one at a time and each finishes before
    the next) take turns by id after the last one chosen: the lowest id would take them all."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._last: WorkerId | None = None

    def _choose(self, request: RouteRequest, choices: list[Choice]) -> Choice:
        def load(c: Choice) -> tuple[int, int]:
            return c.worker.num_running + c.worker.num_waiting, -c.worker.num_free_blocks

        least = min(load(c) for c in choices)
        chosen = next_in_turn([c for c in choices if load(c) == least], self._last)
        self._last = chosen.worker.worker_id
        return chosen


ROUTERS: dict[str, type[Router]] = {
    "kv": KVAwareRouter,
    "round_robin": RoundRobinRouter,
    "random": RandomRouter,
    "least_loaded": LeastLoadedRouter,
}


def make_router(name: str, **kwargs) -> Router:
    """A router by its registry name; `kwargs` go to its constructor."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose from {', '.join(ROUTERS)}")
    return ROUTERS[name](**kwargs)
