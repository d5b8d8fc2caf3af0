"""Many workers behind one `Worker`: a router picks the engine for each request.

`WorkerPool` implements the same `Worker` protocol as `AsyncEngineClient`, so the gateway serves
a pool exactly as it serves one engine. Each request's prompt is hashed into chained block hashes
(the same hashes the engines use), the router (`control.router`, pure) picks a worker from the
pool's `WorkerState`s and the prefix index, and the request streams from that worker.

The index learns what each engine caches from its KV events (`KVIndex`), or, without events,
from the pool's own decisions (`ApproximateIndex`). The running/waiting counts the router sees
are the pool's own bookkeeping of what it sent where (current to the request, unlike the
engines' per-step load reports); free blocks come from each engine's last load report.

A worker that dies leaves the routing set and the index, and its in-flight requests migrate:
each goes to another worker with its prompt plus the tokens generated so far as the new prompt
(recomputed there, or found in that worker's prefix cache) and the rest of its token allowance,
so the caller's stream goes on without a gap or a repeat. Greedy requests continue exactly as
they would have; sampled ones continue from a fresh random state. A pool that can make workers
(a local one) restarts dead ones, which rejoin the routing set with an empty cache.

Disaggregated mode (`num_prefill > 0`): the first `num_prefill` workers only prefill, the others
decode. For each request the router picks a decode worker, and `control.disagg.should_split`
decides from the prompt length and that worker's cached prefix whether the request is split: then
a prefill worker (routed by prefix too) computes the prompt and the first token, the request's KV
moves through the workers' `KVTransport` to the decode worker, and decoding goes on there. The
caller sees one ordinary stream (the first token from the prefill side). A request not split is
served whole by its decode worker. Split requests migrate too: if the prefill worker dies before
the first token, the request is served whole on a decode worker; if the decode worker dies (or the
KV cannot be imported there, e.g. lost with a prefill worker that died holding it), it continues
whole on another from its prompt plus the tokens already sent. With no prefill worker alive nothing
is split; with no decode worker alive, the prefill workers serve whole requests.

A factory may serve several models, each from its own pool (`ServedModel`: a model's engine config
and its worker or pool). `ModelPools` holds them all for what spans the factory: starting and
stopping every worker, the power governor's view of every engine, and the energy books.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial

import msgspec

from tokenfactory.control.disagg import DisaggConfig, should_split
from tokenfactory.control.kv_index import KVIndex, PrefixIndex, WorkerId
from tokenfactory.control.router import NoWorkerError, RouteRequest, Router, WorkerState, make_router
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.kv_cache import KVEvent, prompt_block_hashes
from tokenfactory.engine.outputs import EngineCoreOutput
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.client import (
    AsyncEngineClient,
    EngineDeadError,
    KVWorker,
    RequestRejectedError,
    Worker,
    cancel_and_wait,
)
from tokenfactory.runtime.wire import EngineLoad, Ready

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class _Routed:
    """A request in flight, as the pool tracks it."""

    worker_id: WorkerId
    prefill_tokens: int
    """Prompt tokens the chosen worker was predicted to compute (prompt minus cached prefix)."""
    cached_tokens: int = 0
    """Prompt tokens the index predicted cached on the chosen worker."""
    started: bool = False
    """True once its first output came back (its prompt is done: it decodes now)."""
    prompt_hashes: list[int] = field(default_factory=list)
    """The routed prompt's block hashes, handed to the worker so its engine does not hash it again."""


@dataclass(slots=True, frozen=True)
class WorkerHealth:
    """One worker's line in /health."""

    worker_id: WorkerId
    alive: bool
    dead_reason: str | None
    load: EngineLoad
    num_routed: int
    num_cached_blocks: int | None
    """Blocks the router's index believes this worker holds (None without an event index)."""


class WorkerPool:
    """A `Worker` over several workers (default: N local engine processes of one config)."""

    def __init__(
        self,
        workers: list[Worker],
        block_size: int,
        router: Router | str = "kv",
        index: PrefixIndex | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_migrations: int = 2,
        spawn: Callable[[], Worker] | None = None,
        restart_interval_s: float | None = None,
        num_prefill: int = 0,
        disagg: DisaggConfig | None = None,
    ) -> None:
        if not workers:
            raise ValueError("a pool needs at least one worker")
        if not 0 <= num_prefill < len(workers):
            raise ValueError(f"num_prefill must leave at least one decode worker, got {num_prefill} "
                             f"of {len(workers)} workers")
        self.workers = workers
        self.num_prefill = num_prefill
        """Workers 0..num_prefill-1 only prefill split requests; 0 means no disaggregation."""
        self.disagg = disagg or DisaggConfig()
        self.num_split = 0
        """Requests served through the prefill/decode split since start."""
        self.block_size = block_size
        self.router = make_router(router) if isinstance(router, str) else router
        self.prefill_router = copy.deepcopy(self.router)
        """The prefill pool's own instance of the policy: one shared instance would keep one
        round-robin turn (or one load ledger) over two pools, sending every split to the same pair."""
        self.index: PrefixIndex = index if index is not None else KVIndex()
        self._clock = clock
        self.max_migrations = max_migrations
        """How often one request may move after its worker died (a request that itself kills
        workers must not take the whole pool down with it)."""
        self.num_migrations = 0
        self._spawn = spawn
        """Makes a fresh worker like the others (local pools), so a dead one can be replaced."""
        self.restart_interval_s = restart_interval_s
        """With a spawner: how often to look for dead workers and restart them (None: never)."""
        self.num_restarts = 0
        self._supervisor: asyncio.Task | None = None
        self._routed: dict[str, _Routed] = {}
        self._gone: set[WorkerId] = set()
        self.routed_counts: Counter[WorkerId] = Counter()
        """Requests sent to each worker since start."""
        if isinstance(self.index, KVIndex):
            for worker_id, worker in enumerate(workers):
                worker.subscribe_kv_events(partial(self.index.apply, worker_id))

    @classmethod
    def local(cls, config: EngineConfig, num_workers: int,
              make_worker: Callable[[EngineConfig], Worker] = AsyncEngineClient, **kwargs) -> WorkerPool:
        """`num_workers` engines with `config`, each made by `make_worker`: an engine process on this
        machine by default, `ray_worker.RayEngineClient` for a Ray actor wherever the cluster puts it."""
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        workers: list[Worker] = [make_worker(config) for _ in range(num_workers)]
        return cls(workers, config.cache.block_size, spawn=partial(make_worker, config), **kwargs)

    @classmethod
    def local_disaggregated(cls, config: EngineConfig, num_prefill: int, num_decode: int, **kwargs) -> WorkerPool:
        """`num_prefill` prefill and `num_decode` decode engines (processes here, or `make_worker`'s)."""
        if num_prefill < 1 or num_decode < 1:
            raise ValueError(f"need at least one prefill and one decode worker, got {num_prefill}, {num_decode}")
        return cls.local(config, num_prefill + num_decode, num_prefill=num_prefill, **kwargs)

    @property
    def decode_ids(self) -> range:
        """The workers that serve whole requests and the decode half of split ones."""
        return range(self.num_prefill, len(self.workers))

    # --- the Worker protocol ---------------------------------------------------------------

    @property
    def info(self) -> Ready:
        """The first live worker's shape (every worker serves the same model and config)."""
        for worker in self.workers:
            if worker.is_alive:
                return worker.info
        return self.workers[0].info

    @property
    def load(self) -> EngineLoad:
        """The live workers' loads, summed."""
        total = EngineLoad()
        for worker in self.workers:
            if worker.is_alive:
                load = worker.load
                total.num_running += load.num_running
                total.num_waiting += load.num_waiting
                total.num_free_blocks += load.num_free_blocks
                total.num_total_blocks += load.num_total_blocks
                total.num_steps += load.num_steps
                total.step_seconds += load.step_seconds
        return total

    @property
    def is_alive(self) -> bool:
        """Serving while any worker is."""
        return any(worker.is_alive for worker in self.workers)

    @property
    def dead_reason(self) -> str | None:
        if self.is_alive:
            return None
        reasons = {worker.dead_reason or "not started" for worker in self.workers}
        return f"all {len(self.workers)} workers are down ({'; '.join(sorted(reasons))})"

    async def start(self) -> None:
        """Start every worker at once; if one fails, stop them all."""
        results = await asyncio.gather(*(w.start() for w in self.workers), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.shutdown()
            raise failures[0]
        if self._spawn is not None and self.restart_interval_s is not None:
            self._supervisor = asyncio.create_task(self._supervise(), name="worker-supervisor")

    async def shutdown(self) -> None:
        if self._supervisor is not None:
            await cancel_and_wait(self._supervisor)
            self._supervisor = None
        await asyncio.gather(*(w.shutdown() for w in self.workers), return_exceptions=True)

    async def restart(self, worker_id: WorkerId) -> None:
        """Replace a dead worker by a fresh one; it rejoins the routing set with an empty cache."""
        if self._spawn is None:
            raise RuntimeError("this pool cannot make workers (it was given them)")
        old = self.workers[worker_id]
        if old.is_alive:
            raise ValueError(f"worker {worker_id} is alive")
        await old.shutdown()
        new = self._spawn()
        await new.start()
        self.index.remove_worker(worker_id)  # whatever the dead one held is gone with it
        if isinstance(self.index, KVIndex):
            new.subscribe_kv_events(partial(self.index.apply, worker_id))
        self.workers[worker_id] = new
        self._gone.discard(worker_id)
        self.num_restarts += 1

    async def _supervise(self) -> None:
        while True:
            await asyncio.sleep(self.restart_interval_s)
            for worker_id, worker in enumerate(self.workers):
                if not worker.is_alive:
                    try:
                        await self.restart(worker_id)
                    except Exception:  # a worker that cannot start now is tried again later
                        logger.exception("restarting worker %d failed", worker_id)

    async def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        session_id: str | None = None,
    ) -> AsyncIterator[EngineCoreOutput]:
        """Route one sequence to a worker (or split it over a prefill and a decode worker) and
        yield its outputs; if a worker it runs on dies, move it to another and go on. The router
        sees `session_id`, so with session affinity a session's turns stay together."""
        if request_id in self._routed:
            raise ValueError(f"request id {request_id!r} is already running")
        try:
            routed = None
            if self.num_prefill:
                routed = self._route(list(prompt_token_ids), self._whole_ids(), session_id)
                if (routed.worker_id in self.decode_ids and self._prefill_alive()
                        and should_split(len(prompt_token_ids), routed.cached_tokens, self.disagg)):
                    self.num_split += 1
                    async for out in self._generate_split(request_id, prompt_token_ids, params, priority,
                                                           routed, session_id):
                        yield out
                    return
            async for out in self._generate_whole(request_id, prompt_token_ids, params, priority, routed,
                                                   session_id):
                yield out
        finally:
            self._routed.pop(request_id, None)

    async def _generate_whole(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int,
        routed: _Routed | None, session_id: str | None = None, generated: list[int] | None = None,
    ) -> AsyncIterator[EngineCoreOutput]:
        """Serve a request on one worker, moving it on when that worker dies; `generated`: tokens
        the caller already has (from a split request's dead half), continued after."""
        generated = list(generated or [])
        for attempt in range(self.max_migrations + 1):
            context = list(prompt_token_ids) + generated
            if routed is None or attempt:
                routed = self._route(context, self._whole_ids(), session_id)
            self._routed[request_id] = routed
            worker = self.workers[routed.worker_id]  # this one: a restart may replace it in the table
            stream = worker.generate(request_id, context, _remaining(params, len(generated)), priority,
                                     prompt_hashes=routed.prompt_hashes)
            try:
                async for out in stream:
                    routed.started = True
                    generated.extend(out.new_token_ids)
                    yield out if len(context) == len(prompt_token_ids) else _as_continuation(out, len(prompt_token_ids))
                return
            except EngineDeadError:
                if attempt == self.max_migrations or not worker.dead_reason:
                    raise
                self.num_migrations += 1
            finally:
                await stream.aclose()  # now, not at garbage collection: an early exit aborts at once

    async def _generate_split(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int,
        decode: _Routed, session_id: str | None,
    ) -> AsyncIterator[EngineCoreOutput]:
        """Prefill on a prefill worker, then decode on `decode`'s worker from the moved KV. When either
        half's worker dies, or the KV cannot be imported (lost with its prefill worker), the request
        goes on whole on another worker: from its prompt, or its prompt and the tokens so far."""
        routed = self._route(list(prompt_token_ids), range(self.num_prefill), router=self.prefill_router,
                             hashes=decode.prompt_hashes)
        self._routed[request_id] = routed
        prefill_worker: KVWorker = self.workers[routed.worker_id]
        try:
            first, handle = await prefill_worker.prefill(request_id, prompt_token_ids, params, priority,
                                                         prompt_hashes=routed.prompt_hashes)
        except EngineDeadError:
            if not prefill_worker.dead_reason:
                raise
            first = None
        if first is None:  # the prompt is computed again where the request now goes
            self.num_migrations += 1
            async for out in self._generate_whole(request_id, prompt_token_ids, params, priority, None, session_id):
                yield out
            return
        if handle is None or not self._continues(first, params, len(prompt_token_ids)):
            yield first
            return
        yield msgspec.structs.replace(first, finish_reason=None)
        generated = list(first.new_token_ids)
        self._routed[request_id] = _Routed(decode.worker_id, 0, started=True)
        decode_worker: KVWorker = self.workers[decode.worker_id]
        stream = decode_worker.generate_from_kv(request_id, prompt_token_ids, handle, params, priority)
        handle = None  # the stream holds it only until it is sent: a moved KV is not kept for the whole decode
        try:
            async for out in stream:
                generated.extend(out.new_token_ids)
                yield out
            return
        except EngineDeadError:
            if not decode_worker.dead_reason:
                raise
        except RequestRejectedError as e:
            logger.warning("request %s: its KV could not be imported (%s); recomputing it", request_id, e)
        finally:
            await stream.aclose()
        self.num_migrations += 1
        async for out in self._generate_whole(request_id, prompt_token_ids, params, priority, None, session_id,
                                               generated):
            yield out

    def _whole_ids(self) -> range:
        """The workers that serve whole requests: the decode workers, or while none of them lives,
        every worker (a prefill worker is a whole engine too)."""
        if any(self.workers[i].is_alive for i in self.decode_ids):
            return self.decode_ids
        return range(len(self.workers))

    def _prefill_alive(self) -> bool:
        return any(self.workers[i].is_alive for i in range(self.num_prefill))

    def _continues(self, first: EngineCoreOutput, params: SamplingParams, num_prompt_tokens: int) -> bool:
        """Whether a prefill's "length" finish was only the prefill's own one-token cap."""
        return (first.finish_reason == "length" and params.max_tokens > 1
                and num_prompt_tokens + 1 < self.info.context_len)

    def _route(self, prompt_token_ids: list[int], candidates: range, session_id: str | None = None,
               router: Router | None = None, hashes: list[int] | None = None) -> _Routed:
        """`hashes`: the prompt's block hashes when the caller has them (a split routes one prompt twice)."""
        if hashes is None:
            hashes = prompt_block_hashes(prompt_token_ids, self.block_size)
        request = RouteRequest(hashes, len(prompt_token_ids), session_id=session_id, now=self._clock())
        states = self.worker_states()
        overlap = self.index.overlap(hashes, request.now)  # before routing records the choice
        try:
            worker_id = (router or self.router).route(request, [states[i] for i in candidates], self.index)
        except NoWorkerError as e:
            raise EngineDeadError(self.dead_reason or str(e)) from None
        self.routed_counts[worker_id] += 1
        cached = min(overlap.get(worker_id, 0) * self.block_size, len(prompt_token_ids))
        return _Routed(worker_id, len(prompt_token_ids) - cached, cached, prompt_hashes=hashes)

    def abort(self, request_id: str) -> None:
        routed = self._routed.get(request_id)
        if routed is not None:
            self.workers[routed.worker_id].abort(request_id)

    def subscribe_kv_events(self, callback: Callable[[list[KVEvent]], None]) -> None:
        """Every worker's events go to `callback` (without saying which worker's: subscribe to
        `workers[i]` for that)."""
        for worker in self.workers:
            worker.subscribe_kv_events(callback)

    @property
    def energy(self) -> PoolEnergy:
        """The joules the workers attributed to ended requests, read as one book."""
        return PoolEnergy(self)

    # --- what the router and /health see ---------------------------------------------------

    def worker_states(self) -> list[WorkerState]:
        """Each worker as the router sees it; a newly dead worker is dropped from the index."""
        states = [
            WorkerState(worker_id, block_size=self.block_size, alive=worker.is_alive,
                        num_free_blocks=worker.load.num_free_blocks if worker.is_alive else 0)
            for worker_id, worker in enumerate(self.workers)
        ]
        for routed in self._routed.values():
            state = states[routed.worker_id]
            if routed.started:
                state.num_running += 1
            else:
                state.num_waiting += 1
                state.queued_prefill_tokens += routed.prefill_tokens
        for state in states:
            if not state.alive and state.worker_id not in self._gone:
                self._gone.add(state.worker_id)
                self.index.remove_worker(state.worker_id)
        return states

    def worker_health(self) -> list[WorkerHealth]:
        index = self.index if isinstance(self.index, KVIndex) else None
        return [
            WorkerHealth(worker_id, worker.is_alive, worker.dead_reason, worker.load, self.routed_counts[worker_id],
                         index.num_blocks(worker_id) if index is not None else None)
            for worker_id, worker in enumerate(self.workers)
        ]


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One model the factory serves: its engine config (name, checkpoint, limits) and the worker,
    one engine or a `WorkerPool`, that serves it."""

    config: EngineConfig
    worker: Worker

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def engines(self) -> list[Worker]:
        """The engines behind this model, in worker-id order."""
        return list(self.worker.workers) if isinstance(self.worker, WorkerPool) else [self.worker]


class ModelPools:
    """Every served model's pool: a request is routed within its model's pool, while the power
    budget and the energy books span them all."""

    def __init__(self, models: Sequence[ServedModel]) -> None:
        if not models:
            raise ValueError("a factory serves at least one model")
        self.models: dict[str, ServedModel] = {}
        for model in models:
            if model.name in self.models:
                raise ValueError(f"two models are served as {model.name!r}")
            self.models[model.name] = model

    @property
    def workers(self) -> list[Worker]:
        """Every engine of every model, model by model (the governor's fleet)."""
        return [engine for model in self.models.values() for engine in model.engines]

    @property
    def is_alive(self) -> bool:
        """Serving while any model is."""
        return any(model.worker.is_alive for model in self.models.values())

    @property
    def energy(self) -> PoolEnergy:
        """The joules every engine attributed to ended requests, read as one book (request ids are
        unique across models)."""
        return PoolEnergy(self)

    async def start(self) -> None:
        """Start every model's workers at once; if one fails, stop them all."""
        workers = [model.worker for model in self.models.values()]
        results = await asyncio.gather(*(w.start() for w in workers), return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            await self.shutdown()
            raise failures[0]

    async def shutdown(self) -> None:
        await asyncio.gather(*(model.worker.shutdown() for model in self.models.values()), return_exceptions=True)


class PoolEnergy:
    """The workers' energy books as one: a request's joules are summed over every worker it ran on
    (the prefill and decode halves of a split request, the workers before and after a migration)."""

    def __init__(self, pool: WorkerPool | ModelPools) -> None:
        self._pool = pool

    def take(self, request_id: str) -> float | None:
        """The joules of HTTP request `request_id`, forgotten here; None when no worker has any."""
        books = [book for w in self._pool.workers if (book := getattr(w, "energy", None)) is not None]
        parts = [joules for book in books if (joules := book.take(request_id)) is not None]
        return sum(parts) if parts else None


def _remaining(params: SamplingParams, num_generated: int) -> SamplingParams:
    """The sampling parameters for the rest of a sequence that already has `num_generated` tokens."""
    if not num_generated:
        return params
    return dataclasses.replace(params, max_tokens=params.max_tokens - num_generated,
                               min_tokens=max(0, params.min_tokens - num_generated))


def _as_continuation(out: EngineCoreOutput, num_prompt_tokens: int) -> EngineCoreOutput:
    """An output of a migrated sequence, in terms of the original request: its prompt, and no
    more cached prompt tokens than the prompt has."""
    return msgspec.structs.replace(out, num_prompt_tokens=num_prompt_tokens,
                                   num_cached_tokens=min(out.num_cached_tokens, num_prompt_tokens))
