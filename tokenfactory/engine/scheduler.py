"""Continuous batching: each step spreads a token budget over requests.

There are no prefill and decode phases. A request has `num_tokens` (prompt plus output so far)
and `num_computed_tokens` (already in the KV cache); a step gives it some of the difference.
A decode is a chunk of one token, a chunked prefill a chunk of many, a prefix-cache hit starts a
request with tokens already computed, and a preempted request simply starts again from zero
over its prompt and output (recompute), reusing whatever prefix is still cached.

Each step serves requests highest priority then earliest arrival first, running before waiting
at equal priority: running requests in that order, except that waiting requests of a strictly
higher priority than the next running one are admitted before it. So under a short token budget
a higher tier's prompt takes the budget first and lower-tier running requests skip a step (they
keep their blocks); with one priority all running requests come first. When blocks run out the
lowest-priority, latest-arrived running request is preempted. Waiting requests are admitted while
budget, blocks and `max_num_seqs` allow; a waiting request may preempt running ones of strictly
lower priority to get blocks.

Pure bookkeeping: no clock, no I/O, no tensors, so the digital twin drives this very class.
Cost per step is O(running requests) plus the admitted ones.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tokenfactory.engine.kv_cache import KVCacheManager
from tokenfactory.engine.outputs import (
    EngineCoreOutput,
    ModelRunnerOutput,
    ScheduledChunk,
    SchedulerOutput,
)
from tokenfactory.engine.request import Request, RequestStatus

if TYPE_CHECKING:  # config.py pulls in torch; the scheduler only reads its fields
    from tokenfactory.engine.config import SchedulerConfig


def _serving_order(request: Request) -> tuple[int, float]:
    """Priority descending, then arrival ascending."""
    return (-request.priority, request.arrival_time)


@dataclass(slots=True, frozen=True)
class SchedulerStats:
    """A snapshot for dashboards, metrics and the twin."""

    num_running: int
    num_waiting: int
    kv_usage: float
    num_free_blocks: int
    prefix_cache_hit_rate: float
    num_preemptions: int
    """Preemptions since start, all requests together."""


@dataclass(slots=True)
class _StepPlan:
    """The step being built."""

    budget: int
    chunks: dict[str, ScheduledChunk] = field(default_factory=dict)
    preempted_ids: list[str] = field(default_factory=list)


class Scheduler:
    """Decides, step by step, which requests compute how many tokens."""

    def __init__(self, config: SchedulerConfig, kv: KVCacheManager, max_model_len: int | None = None) -> None:
        self.config = config
        self.kv = kv
        self.max_model_len = max_model_len
        self._requests: dict[str, Request] = {}
        """Every unfinished request, by id."""
        self._running: list[Request] = []
        """Kept in serving order, so the preemption victim is always the last one."""
        self._waiting: list[tuple[int, float, int, Request]] = []
        """A heap of (-priority, arrival, seq, request); aborted entries are dropped lazily."""
        self._num_waiting = 0
        self._seq = itertools.count()
        self._finished_ids: list[str] = []
        self.num_preemptions = 0
        self.token_budget = config.max_num_batched_tokens
        """Tokens per step now: the configured budget, or less while a power governor lowers it."""

    def set_token_budget(self, tokens: int) -> int:
        """Lower (or restore) the per-step token budget at runtime, clamped to [1, configured];
        returns the budget applied."""
        self.token_budget = max(1, min(int(tokens), self.config.max_num_batched_tokens))
        return self.token_budget

    # --- requests in ----------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """Queue a request; raises ValueError for one that could never run."""
        self.check_admissible(request)
        self._enqueue(request)

    def _enqueue(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        self._requests[request.request_id] = request
        self._push_waiting(request)

    def add_computed(self, request: Request, num_computed_tokens: int, min_cached_tokens: int = 0) -> int | None:
        """Admit a request whose first `num_computed_tokens` tokens were computed on another
        worker (a KV transfer) straight into the running set, so its next step decodes.

        Its blocks start with whatever prefix this cache holds. Returns how many tokens that
        prefix covers (the caller writes the KV of the rest into `kv.block_ids`), or None when it
        cannot run now (blocks short, `max_num_seqs` reached, or fewer than `min_cached_tokens`
        cached): then it is queued like a new request and recomputes, as after a preemption.
        """
        self.check_admissible(request)
        num_cached = min(self.kv.lookup_prefix(request), num_computed_tokens)
        num_cached -= num_cached % self.kv.block_size
        if (num_cached < min_cached_tokens or len(self._running) >= self.config.max_num_seqs
                or not self.kv.allocate_slots(request, num_computed_tokens - num_cached, num_cached)):
            self._enqueue(request)
            return None
        request.status = RequestStatus.RUNNING
        request.num_computed_tokens = num_computed_tokens
        if request.num_cached_tokens < 0:
            request.num_cached_tokens = num_cached
        self._requests[request.request_id] = request
        bisect.insort(self._running, request, key=_serving_order)
        return num_cached

    def check_admissible(self, request: Request) -> None:
        """Raise ValueError if `request` could never run here: its id in use, its prompt longer than
        the context window, prompt plus max_tokens more than the whole cache, or a prompt over the
        step budget without chunked prefill."""
        if request.request_id in self._requests:
            raise ValueError(f"request id {request.request_id!r} is already in use")
        max_tokens = request.num_prompt_tokens + request.sampling.max_tokens
        if self.max_model_len is not None:
            if request.num_prompt_tokens > self.max_model_len:
                raise ValueError(
                    f"prompt ({request.num_prompt_tokens} tokens) is longer than the "
                    f"context window ({self.max_model_len} tokens)"
                )
            max_tokens = min(max_tokens, self.max_model_len)
        if max_tokens > self.kv.capacity_tokens:
            raise ValueError(
                f"request {request.request_id!r} may need {max_tokens} tokens of KV cache "
                f"(prompt plus max_tokens) but the whole cache holds {self.kv.capacity_tokens}"
            )
        budget = self.config.max_num_batched_tokens
        if not self.config.enable_chunked_prefill and request.num_prompt_tokens > budget:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) exceeds max_num_batched_tokens "
                f"({self.config.max_num_batched_tokens}) and chunked prefill is disabled"
            )

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        """Finish these requests with "abort", wherever they are; unknown ids are ignored."""
        outputs: list[EngineCoreOutput] = []
        any_running = False
        for request_id in request_ids:
            request = self._requests.get(request_id)
            if request is None:
                continue
            any_running |= request.status == RequestStatus.RUNNING
            if request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
                self._num_waiting -= 1  # its heap entry is skipped when reached
            self._finish(request, RequestStatus.FINISHED_ABORTED)
            outputs.append(self._output(request, []))
        if any_running:
            self._running = [r for r in self._running if not r.is_finished]
        return outputs

    # --- a step ---------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Spread this step's token budget in serving order (see the module doc)."""
        plan = _StepPlan(budget=self.token_budget)
        self._schedule_running(plan)
        if not plan.preempted_ids:  # blocks are short: admitting more would only thrash
            self._schedule_waiting(plan)
        finished, self._finished_ids = self._finished_ids, []
        return SchedulerOutput(
            chunks=list(plan.chunks.values()),
            preempted_ids=plan.preempted_ids,
            finished_ids=finished,
        )

    def _schedule_running(self, plan: _StepPlan) -> None:
        index = 0
        ahead = self._outranking_priority()
        while index < len(self._running) and plan.budget > 0:
            request = self._running[index]
            if request.priority < ahead:
                # Higher-tier waiting requests go first; they are inserted before `index`.
                if not plan.preempted_ids:
                    index += self._schedule_waiting(plan, above=request.priority)
                ahead = self._outranking_priority()
                if ahead > request.priority:  # the head of the queue cannot start now: not again this step
                    ahead = -math.inf
                continue
            num_new = self._chunk_size(request, request.num_computed_tokens, plan.budget)
            if num_new <= 0:
                index += 1
                continue
            while not self.kv.allocate_slots(request, num_new):
                victim = self._running[-1]  # always after `index`: nothing scheduled yet
                self._preempt_last(plan)
                if victim is request:
                    return
            self._add_chunk(plan, request, num_new)
            index += 1

    def _schedule_waiting(self, plan: _StepPlan, above: float = -math.inf) -> int:
        """Admit waiting requests of priority greater than `above` in serving order; returns how many."""
        deferred: list[tuple[int, float, int, Request]] = []
        admitted = 0
        while self._num_waiting > len(deferred) and plan.budget > 0 and len(self._running) < self.config.max_num_seqs:
            request = self._peek_waiting()
            if request.priority <= above:
                break
            if request.request_id in plan.preempted_ids:
                break  # just preempted for someone else: not back in the same step
            num_cached = self.kv.lookup_prefix(request)
            if self.kv.is_computing(request, num_cached):
                # Its next prefix block is being computed for another request: admitted next
                # step, it gets that block from the cache instead of computing it again.
                deferred.append(heapq.heappop(self._waiting))
                continue
            remaining = request.num_tokens - num_cached
            num_new = self._chunk_size(request, num_cached, plan.budget)
            if num_new < remaining and not self._may_chunk(remaining):
                break
            if not self._allocate_preempting_lower(plan, request, num_new, num_cached):
                break  # keep serving order: nobody overtakes the head of the queue
            heapq.heappop(self._waiting)
            self._num_waiting -= 1
            request.status = RequestStatus.RUNNING
            request.num_computed_tokens = num_cached
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_cached
            bisect.insort(self._running, request, key=_serving_order)
            self._add_chunk(plan, request, num_new)
            admitted += 1
        for entry in deferred:
            heapq.heappush(self._waiting, entry)
        return admitted

    def _allocate_preempting_lower(
        self, plan: _StepPlan, request: Request, num_new: int, num_cached: int
    ) -> bool:
        """Allocate for a waiting request, preempting strictly lower-priority running ones."""
        while not self.kv.allocate_slots(request, num_new, num_cached):
            if not self._running or self._running[-1].priority >= request.priority:
                return False
            self._preempt_last(plan)
        return True

    def _chunk_size(self, request: Request, num_computed: int, budget: int) -> int:
        """Tokens to compute for `request` now: the rest of its tokens, within the budget and
        (for chunked prefill) the per-request cap."""
        num_new = min(request.num_tokens - num_computed, budget)
        cap = self.config.long_prefill_token_threshold
        if cap > 0 and self.config.enable_chunked_prefill:
            num_new = min(num_new, cap)
        return num_new

    def _may_chunk(self, remaining: int) -> bool:
        # Without chunked prefill a request waits for a step with room for all of it, except a
        # preempted one that grew past the whole budget: it could never run otherwise.
        return self.config.enable_chunked_prefill or remaining > self.token_budget

    def _add_chunk(self, plan: _StepPlan, request: Request, num_new: int) -> None:
        block_ids = self.kv.block_ids(request.request_id)
        plan.chunks[request.request_id] = ScheduledChunk(request, num_new, block_ids)
        plan.budget -= num_new

    def _preempt_last(self, plan: _StepPlan) -> None:
        """Preempt the lowest-priority, latest-arrived running request (recompute later)."""
        victim = self._running.pop()
        chunk = plan.chunks.pop(victim.request_id, None)
        if chunk is not None:  # it was served earlier this step: give its tokens back
            plan.budget += chunk.num_tokens
        victim.status = RequestStatus.PREEMPTED
        self.kv.free(victim)
        victim.num_computed_tokens = 0
        victim.num_preemptions += 1
        self.num_preemptions += 1
        plan.preempted_ids.append(victim.request_id)
        self._push_waiting(victim)

    # --- results in -----------------------------------------------------------------------

    def update_from_output(
        self, scheduled: SchedulerOutput, result: ModelRunnerOutput | None
    ) -> list[EngineCoreOutput]:
        """Advance each scheduled request, append its sampled token, and apply stop checks."""
        if result is None:
            return []
        outputs: list[EngineCoreOutput] = []
        any_finished = False
        for chunk in scheduled.chunks:
            request = chunk.request
            if request.status != RequestStatus.RUNNING:
                continue  # aborted since the step was scheduled
            samples = chunk.samples
            request.num_computed_tokens += chunk.num_tokens
            self.kv.cache_blocks(request)
            token = result.sampled_token_ids.get(request.request_id) if samples else None
            if token is None:
                continue
            request.append_output_token(token)
            status = self._check_stop(request, token)
            if status is not None:
                self._finish(request, status)
                any_finished = True
            logprobs = result.logprobs.get(request.request_id)
            outputs.append(self._output(request, [token], None if logprobs is None else [logprobs]))
        if any_finished:
            self._running = [r for r in self._running if not r.is_finished]
        return outputs

    def _check_stop(self, request: Request, token: int) -> RequestStatus | None:
        """The finished status after `token` was appended, or None to go on.

        EOS and stop token ids count only once more than `min_tokens` tokens were generated,
        so a request always yields at least `min_tokens` tokens before its stop token.
        """
        sampling = request.sampling
        if request.num_output_tokens > sampling.min_tokens:
            if token in request.eos_token_ids and not sampling.ignore_eos:
                return RequestStatus.FINISHED_STOPPED
            if token in sampling.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= sampling.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        if self.max_model_len is not None and request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None

    # --- skipping ahead (the digital twin) ---------------------------------------------------

    def decode_steps(self, max_steps: int, token_id: int) -> tuple[int, list[EngineCoreOutput]]:
        """Run up to `max_steps` decode-only steps in one call, every running request sampling
        `token_id` in each: the same block allocations, cached blocks, KV events, tokens and stop
        checks, in the same order, as that many `schedule()` + `update_from_output()` rounds.

        The twin calls this to skip through stretches where nothing but decoding happens (its cost
        model prices each skipped step). It stops after the first step in which some request
        finishes and before a step whose new blocks would not all fit (a real step would preempt
        there), so it may do fewer steps than asked, even none. Returns the steps done and one
        output per running request holding all its new tokens (a finished one's carries its
        finish reason).

        Raises ValueError unless the state is pure decode: nothing waiting, every running request
        exactly one token short of computed (so it samples each step), all within the token budget.
        """
        running = self._running
        if self._num_waiting or len(running) > self.token_budget or any(
            r.num_tokens - r.num_computed_tokens != 1 for r in running
        ):
            raise ValueError("decode_steps needs a pure-decode state: nothing waiting, one token per running request")
        num_steps = min([max_steps, *(self._steps_until_stop(r, token_id) for r in running)])
        kv = self.kv
        block_size = kv.block_size
        tables = [kv.block_ids(r.request_id) for r in running]  # live views
        needing = [r for r, table in zip(running, tables) if r.num_computed_tokens + 1 > len(table) * block_size]
        done = 0
        while done < num_steps:
            # as _schedule_running: in serving order, one token each; False: the real step
            # would preempt here, so leave it to schedule()
            if needing and not kv.append_decode_blocks(needing):
                break
            needing = []
            # Steps in which no block fills touch no cache state: take them all at once, up to the
            # step in which the next block fills (or the last step), which runs as usual below.
            quiet = min([num_steps - done, *(block_size - r.num_computed_tokens % block_size for r in running)]) - 1
            if quiet > 0:
                tokens = [token_id] * quiet
                for request in running:
                    request.num_computed_tokens += quiet
                    request.output_token_ids += tokens
                    request.all_token_ids += tokens
                done += quiet
            for request, table in zip(running, tables):  # as update_from_output
                request.num_computed_tokens += 1
                if request.num_computed_tokens % block_size == 0:  # a block just filled
                    kv.cache_blocks(request)
                    if request.num_computed_tokens == len(table) * block_size:
                        needing.append(request)  # its next token starts a new block
                request.append_output_token(token_id)
            done += 1
        if done == 0:
            return 0, []
        self._finished_ids = []  # what the skipped schedule() calls drained
        outputs: list[EngineCoreOutput] = []
        for request in running:  # earlier steps' stop checks all passed: _steps_until_stop
            status = self._check_stop(request, token_id)
            if status is not None:
                self._finish(request, status)
            outputs.append(self._output(request, [token_id] * done))
        self._running = [r for r in running if not r.is_finished]
        return done, outputs

    def _steps_until_stop(self, request: Request, token_id: int) -> int:
        """Decode steps sampling `token_id` until `_check_stop` first ends `request` (>= 1)."""
        sampling = request.sampling
        steps = sampling.max_tokens - request.num_output_tokens
        if self.max_model_len is not None:
            steps = min(steps, self.max_model_len - request.num_tokens)
        stops = (token_id in request.eos_token_ids and not sampling.ignore_eos) or token_id in sampling.stop_token_ids
        if stops:
            steps = min(steps, sampling.min_tokens - request.num_output_tokens + 1)
        return max(1, steps)

    # --- state ----------------------------------------------------------------------------

    def has_unfinished(self) -> bool:
        return bool(self._requests)

    @property
    def num_running(self) -> int:
        return len(self._running)

    @property
    def num_waiting(self) -> int:
        return self._num_waiting

    def has_prompt_work(self, min_priority: int) -> bool:
        """Whether a request of `min_priority` or above still has prompt tokens to compute (waiting,
        or running mid-prefill): a paced engine lets such work start sooner (`governor.PaceBucket`)."""
        if self._num_waiting and self._peek_waiting().priority >= min_priority:
            return True
        for request in self._running:  # serving order: the highest priority first
            if request.priority < min_priority:
                return False
            if request.num_tokens - request.num_computed_tokens > 1:
                return True
        return False

    def stats(self) -> SchedulerStats:
        return SchedulerStats(
            num_running=len(self._running),
            num_waiting=self._num_waiting,
            kv_usage=self.kv.usage,
            num_free_blocks=self.kv.num_free_blocks,
            prefix_cache_hit_rate=self.kv.prefix_hit_rate,
            num_preemptions=self.num_preemptions,
        )

    # --- internals ------------------------------------------------------------------------

    def _push_waiting(self, request: Request) -> None:
        # A preempted request keeps its arrival time, so it goes back ahead of newer
        # requests of its priority.
        heapq.heappush(self._waiting, (-request.priority, request.arrival_time, next(self._seq), request))
        self._num_waiting += 1

    def _outranking_priority(self) -> float:
        """The waiting head's priority if it outranks the lowest running request, else -inf: the
        cheap check that keeps steps without a higher-tier arrival on the plain path."""
        if not self._num_waiting or not self._running:
            return -math.inf
        priority = self._peek_waiting().priority
        return priority if priority > self._running[-1].priority else -math.inf

    def _peek_waiting(self) -> Request:
        """The head of the waiting queue, dropping entries of aborted requests on the way."""
        while self._waiting[0][3].is_finished:
            heapq.heappop(self._waiting)
        return self._waiting[0][3]

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and free its blocks; the caller drops it from `_running`."""
        request.status = status
        self.kv.free(request)
        del self._requests[request.request_id]
        self._finished_ids.append(request.request_id)

    def _output(
        self, request: Request, new_token_ids: list[int], logprobs: list | None = None
    ) -> EngineCoreOutput:
        return EngineCoreOutput(
            request_id=request.request_id,
            new_token_ids=new_token_ids,
            new_logprobs=logprobs,
            finish_reason=request.finish_reason,
            stop_reason=request.stop_reason,
            num_prompt_tokens=request.num_prompt_tokens,
            num_cached_tokens=max(request.num_cached_tokens, 0),
        )
