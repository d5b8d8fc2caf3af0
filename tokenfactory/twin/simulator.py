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
worker's KV events (worker id = index), and each prompt is hashed once on arrival
(`kv_cache.prompt_block_hashes`). The other policies read no index, so their runs skip both.

Output lengths follow the trace: every request samples with ignore_eos and max_tokens equal to
its traced output length.

Fast-forward: most steps of a lightly loaded fleet are pure decode (nothing waiting, one token
per running request), and such steps repeat with nothing new to decide until a request finishes,
blocks run short or a request arrives (the router reads every worker's state then). So after a
pure-decode step the worker runs the following ones at once through `Scheduler.decode_steps`
(the scheduler's own bookkeeping, tokens, blocks and KV events), pricing each with the cost
model as its context grows, and ending strictly before the next arrival; its step completion is
the last skipped step's. Records, meters and events come out as if every step had been taken
(`TwinConfig.fast_forward=False` takes them all, to check that).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenfactory.control.kv_index import KVIndex
from tokenfactory.control.router import KVAwareRouter, RoundRobinRouter, RouteRequest, Router, WorkerState
from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.engine.kv_cache import KVCacheManager, prompt_block_hashes
from tokenfactory.engine.outputs import EngineCoreOutput, ModelRunnerOutput, SchedulerOutput
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.scheduler import Scheduler
from tokenfactory.twin.cost_model import BatchShape, CostModel, StepCost
from tokenfactory.twin.metrics import SLO, RequestRecord, Summary, summarize
from tokenfactory.twin.workloads import TraceRequest, prompt_token_ids

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


@dataclass
class SimulationResult:
    summary: Summary
    records: list[RequestRecord]
    workers: list[SimWorker]
    """Their KV managers are left as the run ended (for leak checks)."""


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
        self._steps: list[tuple[float, int, int]] = []
        """Heap of step completions: (time, sequence, worker index)."""
        self._seq = 0
        self._records: dict[str, RequestRecord] = {}
        self.num_rejected = 0
        self.now = 0.0
        self._next_arrival = math.inf
        """Skipped-ahead steps end before it: the router reads every worker's state then."""

    def run(self, workload: list[TraceRequest], on_progress: Callable[[float], None] | None = None) -> SimulationResult:
        """Simulate until every request finished; `on_progress(now)` is called now and then."""
        records = [RequestRecord(r.arrival_time, r.input_length) for r in workload]
        self._records = {str(i): rec for i, rec in enumerate(records)}
        position, num_events = 0, 0
        while position < len(workload) or self._steps:
            self._next_arrival = workload[position].arrival_time if position < len(workload) else math.inf
            if position < len(workload) and (not self._steps or workload[position].arrival_time <= self._steps[0][0]):
                self.now = workload[position].arrival_time
                woken = set()
                while position < len(workload) and workload[position].arrival_time == self.now:
                    woken.add(self._arrive(str(position), workload[position]))
                    position += 1
                self._next_arrival = workload[position].arrival_time if position < len(workload) else math.inf
                for index in sorted(w for w in woken if w is not None):
                    self._start_step(self.workers[index])
            else:
                self.now, _, index = heapq.heappop(self._steps)
                self._end_step(self.workers[index])
                self._start_step(self.workers[index])
            num_events += 1
            if on_progress is not None and num_events % 2048 == 0:
                on_progress(self.now)
        if on_progress is not None:
            on_progress(self.now)
        return SimulationResult(self._summarize(records), records, self.workers)

    def _arrive(self, request_id: str, trace: TraceRequest) -> int | None:
        """Hand the request to the router's worker; returns that worker's index."""
        request = Request(
            request_id,
            prompt_token_ids(trace),
            SamplingParams(max_tokens=trace.output_length, ignore_eos=True),
            arrival_time=trace.arrival_time,
        )
        worker = self.workers[self._route(request)]
        try:
            worker.scheduler.add_request(request)
        except ValueError:  # longer than the context window or the whole KV cache
            self.num_rejected += 1
            del self._records[request_id]
            return None
        worker.track_prefill(request)
        return worker.index

    def _route(self, request: Request) -> int:
        block_size = self.config.block_size
        hashes = prompt_block_hashes(request.prompt_token_ids, block_size) if self.index is not None else ()
        route = RouteRequest(hashes, request.num_prompt_tokens, now=self.now)
        return self.router.route(route, [w.state() for w in self.workers], self.index)

    def _start_step(self, worker: SimWorker) -> None:
        if worker.busy or not worker.scheduler.has_unfinished():
            return
        scheduled = worker.scheduler.schedule()
        if scheduled.is_empty:
            return  # nothing fits now; the next arrival wakes it again
        num_tokens = pairs = kv_read = num_sampled = 0
        for chunk in scheduled.chunks:
            n, start = chunk.num_tokens, chunk.request.num_computed_tokens
            num_tokens += n
            pairs += n * start + n * (n + 1) // 2
            kv_read += start + n
            num_sampled += start + n == chunk.request.num_tokens
        shape = BatchShape(num_tokens, pairs, kv_read, num_sampled)
        worker.busy, worker.in_flight = True, scheduled
        end = self._charge(worker, self.now, [self.cost.step(shape)], num_tokens)
        if self.config.fast_forward and self._is_pure_decode(worker, scheduled, shape):
            end = self._skip_ahead(worker, shape, end)
        self._seq += 1
        heapq.heappush(self._steps, (end, self._seq, worker.index))

    @staticmethod
    def _charge(worker: SimWorker, start: float, costs: list[StepCost], tokens_per_step: int) -> float:
        """Count consecutive steps on the worker's meters; returns when the last one ends."""
        end = start
        for cost in costs:  # one by one, so sums round as they would step by step
            end += cost.duration_s
            worker.busy_s += cost.duration_s
            worker.energy_j += cost.energy_j
        worker.num_steps += len(costs)
        worker.num_tokens_computed += len(costs) * tokens_per_step
        return end

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
        costs: list[StepCost] = []
        t, n = end, shape.num_tokens
        while len(costs) < horizon:
            shape = BatchShape(n, shape.attention_pairs + n, shape.kv_read_tokens + n, n)
            cost = self.cost.step(shape)
            if t + cost.duration_s >= self._next_arrival:
                break  # an arrival sees the state between steps: take those one by one
            t += cost.duration_s
            costs.append(cost)
        if not costs:
            return end
        outputs = self._complete(worker)
        if any(o.finished for o in outputs):  # the context window ended one early
            worker.skipped_outputs = outputs
            return end
        done, skipped = worker.scheduler.decode_steps(len(costs), SAMPLED_TOKEN)
        worker.skipped_outputs = outputs + skipped
        return self._charge(worker, end, costs[:done], n)

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
            record = self._records[output.request_id]
            if record.first_token < 0:
                record.first_token = now
            record.num_output_tokens += len(output.new_token_ids)
            record.last_token = now
            if output.finish_reason is not None:
                record.finish = now
                record.num_cached_tokens = output.num_cached_tokens
        events = worker.kv.take_events()  # drained even unread: the list would grow all run
        if self.index is not None:
            self.index.apply(worker.index, events)

    def _summarize(self, records: list[RequestRecord]) -> Summary:
        cost = self.cost
        kept = [r for r in self._records.values()]
        makespan = max((r.finish for r in kept), default=0.0)
        idle_w = cost.hardware.idle_w * cost.tp
        energy = sum(w.energy_j + max(0.0, makespan - w.busy_s) * idle_w for w in self.workers)
        return summarize(
            kept,
            num_rejected=self.num_rejected,
            num_gpus=self.config.num_workers * cost.tp,
            energy_j=energy,
            price_per_gpu_hour=cost.hardware.price_per_hour,
            num_preemptions=sum(w.scheduler.num_preemptions for w in self.workers),
            slo=self.config.slo,
        )
