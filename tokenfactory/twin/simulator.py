"""The digital twin's event loop: real schedulers and KV caches, a cost model instead of GPUs.

Each simulated worker owns the engine's own `Scheduler` and `KVCacheManager`; only the model
runner (replaced by the cost model, which prices the step and samples a fixed token) and the
clock (simulated seconds) are not the production ones. Events live in a heap of step
completions merged with the sorted arrival list:

    arrival      -> the router (a `control.router` policy) picks a worker -> add_request;
                    an idle worker steps
    step start   -> scheduler.schedule(); the cost model gives the step's duration and power
    step end     -> scheduler.update_from_output(); tokens are recorded; the worker steps again

Routing runs the live pool's own policies (`control.router`) on a `WorkerState` per worker built
from its scheduler. A `KVAwareRouter` also consults a `KVIndex` fed, after every step, with that
worker's KV events (worker id = index). Each prompt is hashed once on arrival
(`workloads.PromptHasher`: the KV cache's own block hashes, each distinct trace block hashed once),
and the same hashes go to the router and to the worker's KV cache manager.

Closed-loop workloads (`workloads.DynamicWorkload`) add arrivals as the run goes: when a request
finishes the workload returns its follow-ups (a client's next request, a session's next turn),
merged with the known arrivals through a heap.

Output lengths follow the trace: every request samples with ignore_eos and max_tokens equal to
its traced output length.

Fast-forward: most steps of a lightly loaded fleet are pure decode (nothing waiting, one token
per running request), and such steps repeat with nothing new to decide until a request finishes,
blocks run short or a request arrives (the router reads every worker's state then). So after a
pure-decode step the worker runs the following ones at once through `Scheduler.decode_steps`
(the scheduler's own bookkeeping, tokens, blocks and KV events), pricing each with the cost
model (in closed form when it offers `decode_stretch`, as the roofline does) as its context
grows, and ending strictly before the next arrival; its step completion is the last skipped
step's. With a closed-loop workload the next arrival may be a follow-up of a request not finished
yet: no request finishes before the earliest step completion in the heap, so a skip also ends
before that plus the workload's least think time. Records, meters and events come out as if
every step had been taken (`TwinConfig.fast_forward=False` takes them all, to check that).

Power over time: every step's energy and busy time are spread over fixed intervals of simulated
time (`TwinConfig.power_interval_s`); with the idle power of the time no step ran, that gives the
fleet's average watts per interval (`SimulationResult.power_w`).
"""

from __future__ import annotations

import gc
import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from tokenfactory.control.kv_index import KVIndex
from tokenfactory.control.router import KVAwareRouter, RoundRobinRouter, RouteRequest, Router, WorkerState
from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.engine.kv_cache import KVCacheManager, prompt_block_hashes
from tokenfactory.engine.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.scheduler import Scheduler
from tokenfactory.twin.cost_model import BatchShape, CostModel, step_shape
from tokenfactory.twin.metrics import SLO, RequestRecord, Summary, summarize
from tokenfactory.twin.workloads import DynamicWorkload, PromptHasher, TraceRequest, prompt_token_ids

SAMPLED_TOKEN = 1
"""The token every simulated step samples (sampling ignores EOS, so lengths follow the trace)."""


@dataclass(slots=True)
class SimWorker:
    """One engine: a real scheduler over a real KV cache manager, plus its meters."""

    index: int
    scheduler: Scheduler
    kv: KVCacheManager
    busy: bool = False
    in_flight: SchedulerOutput | None = None
    """The step under way, updated when it ends; None while skipping ahead (already updated)."""
    skipped_outputs: list[EngineCoreOutput] = field(default_factory=list)
    """What the skipped-ahead steps produced, recorded when the last of them ends."""
    num_steps: int = 0
    busy_s: float = 0.0
    energy_j: float = 0.0
    """Energy of its steps (idle energy is added in the summary)."""

    num_tokens_computed: int = 0
    """Prefill plus decode tokens its steps computed (its share of the fleet's work)."""
    queued_prefill_tokens: int = 0
    """Prompt tokens its requests still have to compute before their first token."""
    prefilling: dict[str, int] = field(default_factory=dict)
    """Request id -> its share of `queued_prefill_tokens`, for requests still in prefill."""

    def state(self) -> WorkerState:
        """This worker as a router sees it."""
        return WorkerState(
            self.index,
            num_running=self.scheduler.num_running,
            num_waiting=self.scheduler.num_waiting,
            queued_prefill_tokens=self.queued_prefill_tokens,
            num_free_blocks=self.kv.num_free_blocks,
            block_size=self.kv.block_size,
        )

    def track_prefill(self, request: Request) -> None:
        """Update the queued prefill of a request that was just scheduled or added."""
        remaining = max(0, request.num_prompt_tokens - request.num_computed_tokens)
        self.queued_prefill_tokens += remaining - self.prefilling.get(request.request_id, 0)
        if remaining and not request.is_finished:
            self.prefilling[request.request_id] = remaining
        else:
            self.prefilling.pop(request.request_id, None)


@dataclass(frozen=True)
class TwinConfig:
    cost: CostModel
    num_workers: int = 16
    scheduler: SchedulerConfig = field(
        default_factory=lambda: SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=256)
    )
    block_size: int = 16
    num_blocks: int | None = None
    """KV blocks per worker; None sizes the cache from the hardware and model (the physical size)."""
    enable_prefix_caching: bool = True
    slo: SLO = SLO()
    fast_forward: bool = True
    """Skip through pure-decode stretches (same results); False steps every decode one by one."""
    power_interval_s: float = 60.0
    """Simulated seconds per sample of the fleet's power (`SimulationResult.power_w`)."""
    hash_ahead: bool = False
    """Hash a request list's prompts in a second process while simulating (`PromptHasher.hash_ahead`):
    the same hashes, one more core busy. Not for closed-loop workloads, whose prompts come later."""

    def __post_init__(self) -> None:
        if self.num_workers < 1 or self.power_interval_s <= 0:
            raise ValueError(f"need num_workers >= 1 and power_interval_s > 0, got {self.num_workers}, "
                             f"{self.power_interval_s}")


@dataclass
class SimulationResult:
    summary: Summary
    records: list[RequestRecord]
    """One per request in arrival order (for a closed-loop workload, in the order they arrived)."""
    workers: list[SimWorker]
    """Their KV managers are left as the run ended (for leak checks)."""
    power_w: list[float] = field(default_factory=list)
    """The fleet's mean power (all GPUs, idle ones included, modeled) per `power_interval_s`,
    from the first arrival to the last finish."""
    power_interval_s: float = 60.0


class Simulator:
    """Replays a workload through `num_workers` real schedulers in simulated time."""

    def __init__(self, config: TwinConfig, router: Router | None = None) -> None:
        self.config = config
        self.cost = config.cost
        self.router = router or RoundRobinRouter()
        self.index = KVIndex() if isinstance(self.router, KVAwareRouter) else None
        """What the workers' KV events say they cache; only the KV-aware policy reads it."""
        num_blocks = config.num_blocks or config.cost.kv_num_blocks(config.block_size)
        max_len = config.cost.model.max_position_embeddings
        self.workers = [
            SimWorker(i, Scheduler(config.scheduler, kv, max_len), kv)
            for i in range(config.num_workers)
            for kv in [KVCacheManager(num_blocks, config.block_size, config.enable_prefix_caching)]
        ]
        self._hasher = (PromptHasher(config.block_size)
                        if config.enable_prefix_caching or self.index is not None else None)
        self._runner_block_size = config.block_size if getattr(config.cost, "counts_runner_work", False) else None
        """Set when the cost model prices this engine's model runner's own work (`step_shape`)."""
        self._slowdown = getattr(config.cost, "slowdown", None)
        """A profiled machine's step-time variability over its busy time (`twin.profile.Slowdown`),
        or None. With it every step is priced on its own (no skipping ahead): the factor moves."""
        self._steps: list[tuple[float, int, int]] = []
        """Heap of step completions: (time, sequence, worker index)."""
        self._seq = 0
        self._records: dict[str, RequestRecord] = {}
        self.num_rejected = 0
        self.now = 0.0
        self._next_arrival = math.inf
        """Skipped-ahead steps end before it: the router reads every worker's state then."""
        self._workload: DynamicWorkload | None = None
        self._follow_ups: list[tuple[float, int, TraceRequest]] = []
        """Heap of a closed-loop workload's released requests: (arrival, sequence, request)."""
        self._traces: dict[str, TraceRequest] = {}
        """A closed-loop workload's requests under way, by id (told to it when they finish)."""
        self._finished: list[str] = []
        """Requests whose last token the step just ended produced."""
        self._energy_bins: list[float] = []
        self._busy_bins: list[float] = []
        """Per power interval: the energy of the steps in it, and their busy seconds (all workers)."""

    def run(
        self,
        workload: Sequence[TraceRequest] | DynamicWorkload,
        on_progress: Callable[[float], None] | None = None,
    ) -> SimulationResult:
        """Simulate until every request finished; `on_progress(now)` is called now and then.
        `workload`: requests sorted by arrival, or a closed-loop workload."""
        if isinstance(workload, DynamicWorkload):
            self._workload, arrivals = workload, workload.start()
        else:
            arrivals = workload
        records = [RequestRecord(r.arrival_time, r.input_length) for r in arrivals]
        self._records = {str(i): rec for i, rec in enumerate(records)}
        position, num_events = 0, 0
        if self.config.hash_ahead and self._hasher is not None and self._workload is None:
            self._hasher.hash_ahead(arrivals)
        # The run makes no reference cycles (a test checks), so the cyclic collector would only
        # rescan the ever-growing heap of caches and records: a quarter of the run's time.
        collecting = gc.isenabled()
        gc.disable()
        try:
            while position < len(arrivals) or self._steps or self._follow_ups:
                next_known = arrivals[position].arrival_time if position < len(arrivals) else math.inf
                next_follow_up = self._follow_ups[0][0] if self._follow_ups else math.inf
                if min(next_known, next_follow_up) <= (self._steps[0][0] if self._steps else math.inf):
                    self.now = min(next_known, next_follow_up)
                    woken = set()
                    while position < len(arrivals) and arrivals[position].arrival_time == self.now:
                        woken.add(self._arrive_tracked(str(position), arrivals[position]))
                        position += 1
                    while self._follow_ups and self._follow_ups[0][0] == self.now:
                        trace = heapq.heappop(self._follow_ups)[2]
                        request_id = str(len(records))
                        records.append(record := RequestRecord(trace.arrival_time, trace.input_length))
                        self._records[request_id] = record
                        woken.add(self._arrive_tracked(request_id, trace))
                    self._next_arrival = self._arrival_bound(arrivals, position, several_start=True)
                    for index in sorted(w for w in woken if w is not None):
                        self._start_step(self.workers[index])
                else:
                    self.now, _, index = heapq.heappop(self._steps)
                    self._end_step(self.workers[index])
                    self._release_follow_ups()
                    self._next_arrival = self._arrival_bound(arrivals, position)
                    self._start_step(self.workers[index])
                num_events += 1
                if on_progress is not None and num_events % 2048 == 0:
                    on_progress(self.now)
        finally:
            if self._hasher is not None:
                self._hasher.close()
            if collecting:
                gc.enable()
        if on_progress is not None:
            on_progress(self.now)
        start = min((r.arrival for r in records), default=0.0)
        return SimulationResult(
            self._summarize(), records, self.workers, self._power(start), self.config.power_interval_s
        )

    def _arrival_bound(self, arrivals: Sequence[TraceRequest], position: int, several_start: bool = False) -> float:
        """The earliest time a request may arrive: skipped-ahead steps end before it."""
        bound = arrivals[position].arrival_time if position < len(arrivals) else math.inf
        if self._follow_ups:
            bound = min(bound, self._follow_ups[0][0])
        if self._workload is not None and self._traces:
            # No request finishes before the earliest step completion in the heap, so no follow-up
            # comes sooner. When several workers start at once, the later ones' first steps are
            # not in the heap yet: then it could come at once (they are woken by arrivals, so their
            # steps prefill and rarely skip anyway).
            earliest = self.now if several_start or not self._steps else self._steps[0][0]
            bound = min(bound, earliest + self._workload.min_think_s)
        return bound

    def _arrive_tracked(self, request_id: str, trace: TraceRequest) -> int | None:
        """`_arrive`, remembering a closed-loop workload's request until it finishes."""
        if self._workload is None:
            return self._arrive(request_id, trace)
        self._traces[request_id] = trace
        index = self._arrive(request_id, trace)
        if index is None:  # rejected: its client moves on
            self._follow_up(self._traces.pop(request_id))
        return index

    def _release_follow_ups(self) -> None:
        """Tell a closed-loop workload which requests the step just ended finished."""
        finished, self._finished = self._finished, []
        if self._workload is None:
            return
        for request_id in finished:
            if self._records[request_id].finish >= 0 and request_id in self._traces:
                self._follow_up(self._traces.pop(request_id))

    def _follow_up(self, trace: TraceRequest) -> None:
        assert self._workload is not None
        for follow_up in self._workload.on_finish(trace, self.now):
            if follow_up.arrival_time < self.now + self._workload.min_think_s:
                raise ValueError(f"a follow-up arrives at {follow_up.arrival_time}, before {self.now} + the "
                                 f"workload's min_think_s")
            self._seq += 1
            heapq.heappush(self._follow_ups, (follow_up.arrival_time, self._seq, follow_up))

    def _arrive(self, request_id: str, trace: TraceRequest, priority: int = 0) -> int | None:
        """Hand the request to the router's worker; returns that worker's index. `priority`: the
        scheduling priority of its tier (the power simulator's tiers)."""
        tokens = prompt_token_ids(trace)
        request = Request(
            request_id,
            tokens,
            SamplingParams(max_tokens=trace.output_length, ignore_eos=True),
            priority=priority,
            arrival_time=trace.arrival_time,
        )
        hashes = self._hasher(trace, tokens) if self._hasher is not None else None
        return self._admit(self.workers[self._route(request, hashes, trace.session_id)], request, hashes)

    def _admit(self, worker: SimWorker, request: Request, hashes: list[int] | None) -> int | None:
        """Add `request` to `worker`; returns its index, or None when it can never fit."""
        try:
            worker.scheduler.add_request(request)
        except ValueError:  # longer than the context window or the whole KV cache
            return self._reject(request.request_id)
        self._give_hashes(worker, request, hashes)
        worker.track_prefill(request)
        return worker.index

    def _give_hashes(self, worker: SimWorker, request: Request, hashes: list[int] | None) -> None:
        """Hand the prompt's block hashes, computed once on arrival, to the worker's cache."""
        if hashes is not None and self.config.enable_prefix_caching:
            worker.kv.set_prompt_hashes(request, hashes)

    def _reject(self, request_id: str) -> None:
        self.num_rejected += 1
        del self._records[request_id]

    def _route(self, request: Request, hashes: Sequence[int] | None = None, session_id: str | None = None) -> int:
        """The router's worker for `request`; `hashes`: its prompt's block hashes, if known."""
        if self.index is None:
            hashes = ()
        elif hashes is None:
            hashes = prompt_block_hashes(request.prompt_token_ids, self.config.block_size)
        route = RouteRequest(hashes, request.num_prompt_tokens, session_id, now=self.now)
        return self.router.route(route, [w.state() for w in self.workers], self.index)

    def _start_step(self, worker: SimWorker) -> None:
        if worker.busy or not worker.scheduler.has_unfinished():
            return
        scheduled = worker.scheduler.schedule()
        if scheduled.is_empty:
            return  # nothing fits now; the next arrival wakes it again
        shape = step_shape(scheduled, self._runner_block_size)
        worker.busy, worker.in_flight = True, scheduled
        cost = self.cost.step(shape)
        if self._slowdown is not None:
            cost = self._slowdown.apply(cost, worker.busy_s)
        end = self._charge(worker, self.now, cost.duration_s, cost.energy_j, 1, shape.num_tokens)
        if self.config.fast_forward and self._slowdown is None and self._is_pure_decode(worker, scheduled, shape):
            end = self._skip_ahead(worker, shape, end)
        self._seq += 1
        heapq.heappush(self._steps, (end, self._seq, worker.index))

    def _charge(
        self, worker: SimWorker, start: float, duration_s: float, energy_j: float, num_steps: int, tokens_per_step: int
    ) -> float:
        """Count `num_steps` consecutive steps, together `duration_s` long from `start`, on the
        worker's and the fleet's meters; returns when the last one ends."""
        worker.busy_s += duration_s
        worker.energy_j += energy_j
        worker.num_steps += num_steps
        worker.num_tokens_computed += num_steps * tokens_per_step
        self._meter_power(start, duration_s, energy_j)
        return start + duration_s

    def _meter_power(self, start: float, duration_s: float, energy_j: float) -> None:
        """Spread a span of steps over the power intervals it overlaps, pro rata."""
        interval = self.config.power_interval_s
        first, last = int(start // interval), int((start + duration_s) // interval)
        if last >= len(self._energy_bins):
            grow = last + 1 - len(self._energy_bins)
            self._energy_bins.extend([0.0] * grow)
            self._busy_bins.extend([0.0] * grow)
        if first == last or duration_s <= 0:
            self._energy_bins[first] += energy_j
            self._busy_bins[first] += duration_s
            return
        power = energy_j / duration_s
        for i in range(first, last + 1):
            overlap = min(start + duration_s, (i + 1) * interval) - max(start, i * interval)
            self._energy_bins[i] += power * overlap
            self._busy_bins[i] += overlap

    def _power(self, start: float) -> list[float]:
        """Fleet watts per interval from `start` to the last finish, idle GPUs included."""
        end = max((r.finish for r in self._records.values()), default=start)
        return _fleet_power(self._energy_bins, self._busy_bins, len(self.workers), self.cost, start, end,
                            self.config.power_interval_s)

    def _is_pure_decode(self, worker: SimWorker, scheduled: SchedulerOutput, shape: BatchShape) -> bool:
        """One sampled token per running request, nobody waiting or preempted: the next steps
        repeat this one with one more token of context each, until something changes. A
        one-token chunk yielding a request's first token (a prompt cached but for its last
        token) does not count: its first-token time is this step's end."""
        return (
            not scheduled.preempted_ids
            and worker.scheduler.num_waiting == 0
            and shape.num_tokens == shape.num_sampled == len(scheduled.chunks) == worker.scheduler.num_running
            and all(c.request.num_output_tokens for c in scheduled.chunks)
        )

    def _skip_ahead(self, worker: SimWorker, shape: BatchShape, end: float) -> float:
        """After the pure-decode step just scheduled (ending at `end`), run the decode steps
        that also end before the next arrival at once; returns when the last of them ends."""
        scheduled = worker.in_flight
        assert scheduled is not None
        # Steps after this one before its first request finishes (the scheduler has the last word).
        horizon = min(c.request.sampling.max_tokens - c.request.num_output_tokens for c in scheduled.chunks) - 1
        steps, duration, energy = self._price_stretch(shape, horizon, self._next_arrival - end)
        if not steps:
            return end
        outputs = self._complete(worker)
        if any(o.finished for o in outputs):  # the context window ended one early
            worker.skipped_outputs = outputs
            return end
        done, skipped = worker.scheduler.decode_steps(steps, SAMPLED_TOKEN)
        worker.skipped_outputs = outputs + skipped
        if not done:
            return end
        if done < steps:  # blocks ran short: the next step preempts, one by one
            _, duration, energy = self._price_stretch(shape, done)
        return self._charge(worker, end, duration, energy, done, shape.num_tokens)

    def _price_stretch(self, first: BatchShape, max_steps: int, time_limit_s: float = math.inf) -> tuple[int, float, float]:
        """(steps, seconds, joules) of the pure-decode steps after `first`, at most `max_steps`,
        ending strictly within `time_limit_s`: in closed form where the cost model offers it
        (`CostModel.decode_stretch`), else step by step."""
        stretch = getattr(self.cost, "decode_stretch", None)
        if stretch is not None:
            priced = stretch(first, max_steps, time_limit_s)
            return priced.num_steps, priced.duration_s, priced.energy_j
        n, shape = first.num_tokens, first
        steps, duration, energy = 0, 0.0, 0.0
        while steps < max_steps:
            # Every context one longer; the runner's padding, a block's worth of jumps, the same on average.
            shape = BatchShape(n, shape.attention_pairs + n, shape.kv_read_tokens + n, n, num_decode_rows=n,
                               decode_extra_pairs=shape.decode_extra_pairs, decode_extra_reads=shape.decode_extra_reads)
            cost = self.cost.step(shape)
            if duration + cost.duration_s >= time_limit_s:
                break
            steps, duration, energy = steps + 1, duration + cost.duration_s, energy + cost.energy_j
        return steps, duration, energy

    def _complete(self, worker: SimWorker) -> list[EngineCoreOutput]:
        """Update the scheduler with the step in flight (its KV events are drained at its end)."""
        scheduled = worker.in_flight
        assert scheduled is not None
        worker.in_flight = None
        sampled = {
            c.request.request_id: SAMPLED_TOKEN
            for c in scheduled.chunks
            if c.request.num_computed_tokens + c.num_tokens == c.request.num_tokens
        }
        outputs = worker.scheduler.update_from_output(scheduled, ModelRunnerOutput(sampled))
        for chunk in scheduled.chunks:
            if chunk.request.request_id in worker.prefilling:
                worker.track_prefill(chunk.request)
        return outputs

    def _end_step(self, worker: SimWorker) -> None:
        if worker.in_flight is not None:
            outputs = self._complete(worker)
        else:
            outputs, worker.skipped_outputs = worker.skipped_outputs, []
        worker.busy = False
        now = self.now
        for output in outputs:
            if self._records[output.request_id].observe(output, now):
                self._finished.append(output.request_id)
        events = worker.kv.take_events()  # drained even unread: the list would grow all run
        if self.index is not None:
            self.index.apply(worker.index, events)

    def _summarize(self) -> Summary:
        """The requests not rejected (`records` keeps rejected ones too, never started)."""
        return _fleet_summary(self.config, list(self._records.values()), _meters(self.workers), self.num_rejected)


def _meters(workers: list[SimWorker]) -> list[tuple[float, float, int]]:
    """(step energy, busy seconds, preemptions) of each worker: all a fleet summary needs of it."""
    return [(w.energy_j, w.busy_s, w.scheduler.num_preemptions) for w in workers]


def _fleet_summary(
    config: TwinConfig, kept: list[RequestRecord], meters: list[tuple[float, float, int]], num_rejected: int
) -> Summary:
    """The summary of `kept` (the requests not rejected); energy adds idle power to the end."""
    cost = config.cost
    makespan = max((r.finish for r in kept), default=0.0)
    idle_w = cost.hardware.idle_w * cost.tp
    energy = sum(step_j + max(0.0, makespan - busy_s) * idle_w for step_j, busy_s, _ in meters)
    return summarize(
        kept,
        num_rejected=num_rejected,
        num_gpus=len(meters) * cost.tp,
        energy_j=energy,
        price_per_gpu_hour=cost.hardware.price_per_hour,
        num_preemptions=sum(preemptions for _, _, preemptions in meters),
        slo=config.slo,
    )


def _fleet_power(
    energy_bins: list[float], busy_bins: list[float], num_workers: int, cost: CostModel,
    start: float, end: float, interval: float,
) -> list[float]:
    """Mean watts per interval of `num_workers` workers: their steps' energy plus idle power
    for the time they ran none."""
    idle_w = cost.hardware.idle_w * cost.tp
    samples = []
    for i in range(int(start // interval), int(end // interval) + 1):
        length = min(end, (i + 1) * interval) - max(start, i * interval)
        if length <= 0:
            continue
        energy, busy = (energy_bins[i], busy_bins[i]) if i < len(energy_bins) else (0.0, 0.0)
        samples.append((energy + max(0.0, num_workers * length - busy) * idle_w) / length)
    return samples


@dataclass
class _PodRun:
    """What one pod's run hands back to the fleet (small enough to cross processes)."""

    records: list[RequestRecord]
    kept: list[RequestRecord]
    meters: list[tuple[float, float, int]]
    num_rejected: int
    energy_bins: list[float]
    busy_bins: list[float]
    workers: list[SimWorker]
    """Left empty when the pod ran in another process."""


_POD_JOB: tuple | None = None
"""(config, router factory, workload, num_pods) of the pods run in forked processes."""


def _run_pod(pod: int, keep_workers: bool = False) -> tuple[int, _PodRun]:
    assert _POD_JOB is not None
    config, router, workload, num_pods = _POD_JOB
    simulator = Simulator(config, router())
    result = simulator.run(workload[pod::num_pods])
    return pod, _PodRun(result.records, list(simulator._records.values()), _meters(simulator.workers),
                        simulator.num_rejected, simulator._energy_bins, simulator._busy_bins,
                        simulator.workers if keep_workers else [])


def simulate_pods(
    config: TwinConfig,
    router: Callable[[], Router],
    workload: Sequence[TraceRequest],
    num_pods: int,
    on_pod_done: Callable[[int], None] | None = None,
    jobs: int = 1,
) -> SimulationResult:
    """A fleet of `num_pods` pods of `config.num_workers` workers each, behind a front load
    balancer that deals the arrivals to the pods in turn (request i to pod i mod num_pods). Each
    pod is a `Simulator` with its own router (`router()` makes one) and index, as a datacenter's
    clusters each have their own; pods share nothing, so they run apart (`jobs` processes at once,
    forked) and the results merge into one fleet's (records back in arrival order; the result's
    `workers` only when jobs is 1)."""
    global _POD_JOB
    if num_pods < 1 or jobs < 1:
        raise ValueError(f"need num_pods >= 1 and jobs >= 1, got {num_pods}, {jobs}")
    _POD_JOB = (config, router, workload, num_pods)
    runs: list[_PodRun | None] = [None] * num_pods
    try:
        if jobs == 1:
            outcomes = (_run_pod(pod, keep_workers=True) for pod in range(num_pods))
            for pod, run in outcomes:
                runs[pod] = run
                if on_pod_done is not None:
                    on_pod_done(pod)
        else:
            import multiprocessing

            with multiprocessing.get_context("fork").Pool(min(jobs, num_pods)) as pool:
                for done, (pod, run) in enumerate(pool.imap_unordered(_run_pod, range(num_pods))):
                    runs[pod] = run
                    if on_pod_done is not None:
                        on_pod_done(done)
    finally:
        _POD_JOB = None
    pods = [run for run in runs if run is not None]
    records = [pods[i % num_pods].records[i // num_pods] for i in range(len(workload))]
    kept = [r for run in pods for r in run.kept]
    meters = [m for run in pods for m in run.meters]
    summary = _fleet_summary(config, kept, meters, sum(run.num_rejected for run in pods))
    size = max(len(run.energy_bins) for run in pods)
    energy_bins, busy_bins = [0.0] * size, [0.0] * size
    for run in pods:
        for i, (energy, busy) in enumerate(zip(run.energy_bins, run.busy_bins)):
            energy_bins[i] += energy
            busy_bins[i] += busy
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finish for r in kept), default=start)
    power = _fleet_power(energy_bins, busy_bins, len(meters), config.cost, start, end, config.power_interval_s)
    return SimulationResult(summary, records, [w for run in pods for w in run.workers], power,
                            config.power_interval_s)
