"""Disaggregated prefill/decode in the twin: P prefill workers, D decode workers, moved KV between.

Workers 0..P-1 only prefill; workers P..P+D-1 decode (and serve whole the requests that are not
split). Every one is the engine's own `Scheduler` over its own `KVCacheManager`, as in the
aggregated `Simulator`; what this adds is the live pool's split (`runtime/pool.py`) in simulated
time:

    arrival       -> the router picks a decode worker; `control.disagg.should_split` decides from
                     the prompt length and that worker's cached prefix (with a KV-aware router the
                     index's overlap, read before the choice is recorded, as the pool does; else
                     the worker's own cache, which an index fed by its events would mirror)
      whole       -> add_request on the decode worker
      split       -> the prefill router picks a prefill worker; a copy of the request with
                     max_tokens=1 is queued there (`EngineCore.prefill_only`)
    prefill step  -> the step that samples its first token also fixes when its KV lands on the
                     decode worker: step end + KV bytes / link bandwidth + latency
    landing       -> the decode worker admits the request as running with its prompt computed
                     (`Scheduler.add_computed`, reusing whatever prefix it caches; the rest is
                     "written" and offered to its prefix cache); with no room it waits and
                     recomputes, as `EngineCore.import_kv` does

A landing takes effect at the decode worker's first step boundary at or after it: an idle
worker is woken by an entry in the step heap, a busy one picks it up when its step ends. Its
skip-ahead over pure-decode steps stops before any landing that could reach it (known ones, and
the end of any prefill step under way), so skipping never delays a request.

The first token's time is the prefill worker's; the gap to the second token includes the
transfer. Records, energy (all P + D workers, idle power included) and the summary are the
aggregated simulator's.
"""

from __future__ import annotations

import copy
import heapq
from dataclasses import dataclass, field

from tokenfactory.control.disagg import DisaggConfig, should_split
from tokenfactory.control.kv_index import KVIndex
from tokenfactory.control.router import KVAwareRouter, RouteRequest, Router, WorkerState
from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.scheduler import Scheduler
from tokenfactory.twin.cost_model import BatchShape
from tokenfactory.twin.simulator import SAMPLED_TOKEN, SimWorker, Simulator, TwinConfig
from tokenfactory.twin.workloads import PromptHasher, TraceRequest, prompt_token_ids

ALWAYS_SPLIT = DisaggConfig(min_prompt_tokens=1, max_cached_fraction=1.0)
"""Every request goes through the split (the pure P:D configurations of a sweep)."""


@dataclass(frozen=True)
class SplitConfig:
    """How the fleet of `TwinConfig.num_workers` is split and how KV moves between the parts."""

    num_prefill: int
    """Workers 0..num_prefill-1 only prefill; 0 means no disaggregation (the aggregated fleet)."""
    disagg: DisaggConfig = field(default_factory=DisaggConfig)
    """When a request is split (`ALWAYS_SPLIT`: every request)."""
    transfer_latency_s: float = 1e-4
    """Fixed cost of one KV move (handshake, descriptors, first byte), >= 0."""
    transfer_bandwidth: float | None = None
    """Bytes/s per GPU of the link; None: the hardware's interconnect (same-node NVLink).
    A cross-node link is slower: e.g. 50e9 for one 400 Gb/s NIC per GPU."""
    prefill_scheduler: SchedulerConfig | None = None
    """Batch limits of the prefill workers; None: the fleet's (`TwinConfig.scheduler`)."""

    def __post_init__(self) -> None:
        if self.num_prefill < 0:
            raise ValueError(f"num_prefill must be >= 0, got {self.num_prefill}")
        if self.transfer_latency_s < 0:
            raise ValueError(f"transfer_latency_s must be >= 0, got {self.transfer_latency_s}")
        if self.transfer_bandwidth is not None and self.transfer_bandwidth <= 0:
            raise ValueError(f"transfer_bandwidth must be positive, got {self.transfer_bandwidth}")


@dataclass(slots=True)
class _Split:
    """A split request between its arrival and its landing on the decode worker."""

    request: Request
    """The whole request, as the decode worker will run it."""
    decode: int
    hashes: list[int] | None
    """Its prompt's block hashes (None when the fleet keeps no prefix cache)."""
    num_cached_tokens: int = 0
    """Prompt tokens the prefill worker found in its prefix cache."""


class DisaggregatedSimulator(Simulator):
    """The aggregated `Simulator` with its workers split into prefill and decode pools."""

    def __init__(
        self,
        config: TwinConfig,
        split: SplitConfig,
        router: Router | None = None,
        prefill_router: Router | None = None,
    ) -> None:
        if split.num_prefill >= config.num_workers:
            raise ValueError(
                f"{split.num_prefill} prefill workers leave no decode worker out of {config.num_workers}"
            )
        super().__init__(config, router)
        self.split = split
        self.num_prefill = split.num_prefill
        self.prefill_router = prefill_router or copy.deepcopy(self.router)
        """Its own instance: a policy's state (round robin's last pick) is per pool."""
        if self.index is None and isinstance(self.prefill_router, KVAwareRouter):
            self.index = KVIndex()
        if self._hasher is None and self.index is not None:
            self._hasher = PromptHasher(config.block_size)
        if split.prefill_scheduler is not None:
            max_len = config.cost.model.max_position_embeddings
            for worker in self.workers[: self.num_prefill]:
                worker.scheduler = Scheduler(split.prefill_scheduler, worker.kv, max_len)
        bandwidth = split.transfer_bandwidth or config.cost.hardware.interconnect_bandwidth
        self._transfer_s_per_token = config.cost.kv_bytes_per_token / (bandwidth * config.cost.tp)
        """Each GPU of a tensor-parallel group moves its own shard of the KV heads."""
        self._splits: dict[str, _Split] = {}
        """Split requests still prefilling, by id."""
        self._handing_off: dict[int, list[str]] = {}
        """Prefill worker -> the requests whose first token its step under way samples and that
        go on decoding (their record must not read as finished)."""
        self._prefill_ends: dict[int, float] = {}
        """Prefill worker -> when its step under way ends (a landing may follow it)."""
        self._landings: list[list[tuple[float, int, _Split]]] = [[] for _ in self.workers]
        """Per decode worker: a heap of (landing time, sequence, split request)."""
        self._wakes: list[list[float]] = [[] for _ in self.workers]
        """Per decode worker: times of the step-heap entries pushed to wake it for a landing."""
        self._num_assigned = [0] * len(self.workers)
        """Per decode worker: split requests routed to it and not landed yet."""
        self.num_split = 0
        self.num_transfers_admitted = 0
        self.num_transfers_recomputed = 0
        """Landings that found no room and recompute the prompt on the decode worker."""
        self.transfer_s = 0.0
        """Total simulated seconds of KV transfer."""

    # --- arrivals ----------------------------------------------------------------------------

    def _arrive(self, request_id: str, trace: TraceRequest) -> int | None:
        if not self.num_prefill:
            return super()._arrive(request_id, trace)
        prompt = prompt_token_ids(trace)
        request = Request(
            request_id, prompt, SamplingParams(max_tokens=trace.output_length, ignore_eos=True),
            arrival_time=trace.arrival_time,
        )
        hashes = self._hasher(trace, prompt) if self._hasher is not None else None
        route = RouteRequest(hashes if self.index is not None else (), len(prompt), trace.session_id, now=self.now)
        overlap = self.index.overlap(route.block_hashes, self.now) if self.index is not None else {}
        decode_id = self._route_among(route, range(self.num_prefill, len(self.workers)), self.router)
        decode = self.workers[decode_id]
        try:  # the decode worker must be able to hold it whole, not just its prompt
            decode.scheduler.check_admissible(request)
        except ValueError:
            return self._reject(request_id)
        if self.index is not None:  # what the router believes that worker caches, as in the pool
            cached = min(overlap.get(decode_id, 0) * self.config.block_size, len(prompt))
        elif self.split.disagg != ALWAYS_SPLIT:  # no index kept: the worker's cache itself says
            self._give_hashes(decode, request, hashes)
            cached = decode.kv.lookup_prefix(request)
        else:
            cached = 0
        if not should_split(len(prompt), cached, self.split.disagg):
            return self._admit(decode, request, hashes)
        prefill = self.workers[self._route_among(route, range(self.num_prefill), self.prefill_router)]
        first_token_only = Request(
            request_id, prompt, SamplingParams(max_tokens=1, ignore_eos=True), arrival_time=trace.arrival_time
        )
        index = self._admit(prefill, first_token_only, hashes)
        if index is not None:
            self._splits[request_id] = _Split(request, decode_id, hashes)
            self._num_assigned[decode_id] += 1
            self.num_split += 1
        return index

    def _route_among(self, route: RouteRequest, candidates: range, router: Router) -> int:
        states = [self._state(self.workers[i]) for i in candidates]
        return router.route(route, states, self.index)

    def _state(self, worker: SimWorker) -> WorkerState:
        """As the pool counts it: split requests on their way to a decode worker run there."""
        state = worker.state()
        state.num_running += self._num_assigned[worker.index]
        return state

    # --- steps -------------------------------------------------------------------------------

    def _start_step(self, worker: SimWorker) -> None:
        if worker.index >= self.num_prefill or worker.busy:
            super()._start_step(worker)
            return
        busy_before = worker.busy_s
        super()._start_step(worker)
        if not worker.busy:
            return
        end = self.now + (worker.busy_s - busy_before)  # one step: prefill workers never skip ahead
        self._prefill_ends[worker.index] = end
        assert worker.in_flight is not None
        handing_off = []
        for chunk in worker.in_flight.chunks:
            request = chunk.request
            if request.num_computed_tokens + chunk.num_tokens < request.num_tokens:
                continue  # a chunk of a longer prompt: no first token yet
            split = self._splits.pop(request.request_id)
            split.num_cached_tokens = max(request.num_cached_tokens, 0)
            if split.request.sampling.max_tokens == 1:  # the first token is the whole answer
                self._num_assigned[split.decode] -= 1
            else:
                handing_off.append(request.request_id)
                self._send(split, end)
        self._handing_off[worker.index] = handing_off

    def transfer_time(self, num_tokens: int) -> float:
        """Seconds to move `num_tokens` of KV from a prefill to a decode worker."""
        return self.split.transfer_latency_s + num_tokens * self._transfer_s_per_token

    def _send(self, split: _Split, prefill_end: float) -> None:
        """The KV leaves with the first token; it lands after the transfer time."""
        duration = self.transfer_time(split.request.num_prompt_tokens)
        self.transfer_s += duration
        landing = prefill_end + duration
        self._seq += 1
        heapq.heappush(self._landings[split.decode], (landing, self._seq, split))
        # An entry in the step heap wakes the decode worker then (an idle one has no step to end);
        # `_end_step` tells it from a step's end by `_wakes`.
        heapq.heappush(self._wakes[split.decode], landing)
        heapq.heappush(self._steps, (landing, self._seq, split.decode))

    def _end_step(self, worker: SimWorker) -> None:
        wakes = self._wakes[worker.index]
        if wakes and wakes[0] <= self.now:  # this heap entry is a wake, not a step's end
            heapq.heappop(wakes)
            if not worker.busy:  # a busy worker takes the landing when its step ends
                self._land(worker)
            return
        super()._end_step(worker)
        if worker.index < self.num_prefill:
            self._prefill_ends.pop(worker.index, None)
            for request_id in self._handing_off.pop(worker.index, ()):
                self._records[request_id].finish = -1.0  # its prefill ended it; the decode worker goes on
        else:
            self._land(worker)

    def _land(self, worker: SimWorker) -> None:
        """Admit every transfer that has reached this decode worker by now."""
        landings = self._landings[worker.index]
        while landings and landings[0][0] <= self.now:
            _, _, split = heapq.heappop(landings)
            self._num_assigned[worker.index] -= 1
            request = split.request
            request.append_output_token(SAMPLED_TOKEN)  # the prefill worker's first token
            request.num_cached_tokens = split.num_cached_tokens
            self._give_hashes(worker, request, split.hashes)
            if worker.scheduler.add_computed(request, request.num_prompt_tokens) is None:
                self.num_transfers_recomputed += 1  # queued: it recomputes, as after a preemption
            else:
                worker.kv.cache_blocks(request)  # the written blocks join its prefix cache
                self.num_transfers_admitted += 1
            worker.track_prefill(request)

    def _skip_ahead(self, worker: SimWorker, shape: BatchShape, end: float) -> float:
        """Skip only up to the first landing that could reach this worker."""
        bound = self._next_arrival
        landings = self._landings[worker.index]
        if landings:
            bound = min(bound, landings[0][0])
        if self._prefill_ends:  # a prefill step under way may send it a request
            bound = min(bound, min(self._prefill_ends.values()) + self.split.transfer_latency_s)
        saved, self._next_arrival = self._next_arrival, bound
        try:
            return super()._skip_ahead(worker, shape, end)
        finally:
            self._next_arrival = saved

