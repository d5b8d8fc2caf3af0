"""One worker's production line.

`EngineCore` owns the scheduler, the KV cache manager and the model runner and turns a step
into token ids; it knows nothing about text. `LLMEngine` adds the tokenizer and the text stream
(detokenization, stop strings) for offline use: benchmarks, tests, the twin's calibration.
The gateway does the same text work in its own process and talks to an `EngineCore` running in
another (see `tokenfactory.runtime`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import msgspec

from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.kv_cache import KVCacheManager, KVEvent
from tokenfactory.engine.model_runner import ModelRunner
from tokenfactory.engine.outputs import EngineCoreOutput, KVTransfer, SchedulerOutput, TokenLogprobs
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.scheduler import Scheduler
from tokenfactory.engine.text import TextStream
from tokenfactory.engine.tokenizer import Tokenizer


@dataclass(slots=True)
class StepStats:
    """What one step did: enough for metrics, the meter and the twin's calibration."""

    num_tokens: int
    num_requests: int
    num_prefill_tokens: int
    duration_s: float
    tokens_by_request: dict[str, int] = field(default_factory=dict)
    """Tokens each request computed in the step (the meter shares the step's energy by them)."""


class EngineCore:
    """Scheduler + KV cache manager + model runner: requests in, token ids out, step by step."""

    def __init__(self, config: EngineConfig, runner: ModelRunner | None = None) -> None:
        self.config = config
        self.runner = runner or ModelRunner(config)
        self.kv = KVCacheManager(
            num_blocks=self.runner.num_blocks,
            block_size=config.cache.block_size,
            enable_prefix_caching=config.cache.enable_prefix_caching,
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, max_model_len=config.context_len)
        self.last_step: StepStats | None = None
        self._prefill_only: set[str] = set()
        """Requests that stop after their first token and leave their KV for another worker."""
        self._exports: dict[str, KVTransfer] = {}
        """Their KV, copied out in the step that sampled that token, until `export_kv` takes it."""

    def add_request(self, request: Request, prompt_hashes: Sequence[int] = ()) -> None:
        """Queue a request; ValueError (saying why) for one that could never run correctly.
        `prompt_hashes`: its prompt's `prompt_block_hashes`, from a caller that already has them."""
        self._check_request(request)
        self.scheduler.add_request(request)
        if prompt_hashes:
            self.kv.set_prompt_hashes(request, prompt_hashes)

    def _check_request(self, request: Request) -> None:
        vocab = self.config.model.vocab_size
        if min(request.prompt_token_ids) < 0 or max(request.prompt_token_ids) >= vocab:
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if request.num_prompt_tokens + request.sampling.max_tokens > self.config.context_len:
            raise ValueError(
                f"prompt ({request.num_prompt_tokens} tokens) plus max_tokens "
                f"({request.sampling.max_tokens}) exceeds the context window of "
                f"{self.config.context_len} tokens"
            )
        if not request.eos_token_ids:
            request.eos_token_ids = self.config.model.eos_token_ids

    # --- disaggregated serving: the prefill side ----------------------------------------------

    def prefill_only(self, request: Request, prompt_hashes: Sequence[int] = ()) -> None:
        """Queue a request to compute its prompt and sample its first token only; its KV is then
        kept for `export_kv` (unless that token ended it: EOS or a stop token)."""
        request.sampling = dataclasses.replace(request.sampling, max_tokens=1)
        self.add_request(request, prompt_hashes)
        self._prefill_only.add(request.request_id)

    def export_kv(self, request_id: str) -> KVTransfer:
        """Hand over a finished `prefill_only` request's KV (once); ValueError if there is none."""
        transfer = self._exports.pop(request_id, None)
        if transfer is None:
            raise ValueError(
                f"no KV to export for request {request_id!r}: unknown, not a finished prefill_only "
                "request, stopped at its first token, or already exported"
            )
        return transfer

    def has_export(self, request_id: str) -> bool:
        return request_id in self._exports

    def _copy_out_prefills(self, sched: SchedulerOutput) -> None:
        """Copy the KV of prefill-only requests whose prompt completes in this step (run before
        the scheduler finishes them and frees their blocks; full blocks stay in the prefix cache)."""
        for chunk in sched.chunks:
            request = chunk.request
            if request.request_id not in self._prefill_only or not chunk.samples:
                continue
            num_blocks = math.ceil(chunk.end / self.kv.block_size)
            block_ids = chunk.block_ids[:num_blocks]
            self._exports[request.request_id] = KVTransfer(
                request_id=request.request_id,
                block_size=self.kv.block_size,
                token_ids=list(request.all_token_ids),  # the sampled token is appended below
                num_prompt_tokens=request.num_prompt_tokens,
                num_computed_tokens=chunk.end,
                num_cached_tokens=max(request.num_cached_tokens, 0),
                dtype=self.config.dtype,
                shape=self.runner.kv_block_shape(num_blocks),
                data=self.runner.read_blocks(block_ids),
            )

    def _settle_prefills(self, outputs: list[EngineCoreOutput]) -> None:
        for out in outputs:
            if out.finished and out.request_id in self._prefill_only:
                self._prefill_only.discard(out.request_id)
                transfer = self._exports.pop(out.request_id, None)
                if transfer is not None and out.finish_reason == "length":  # stopped: nothing follows
                    token_ids = transfer.token_ids + out.new_token_ids
                    self._exports[out.request_id] = msgspec.structs.replace(transfer, token_ids=token_ids)

    # --- disaggregated serving: the decode side -----------------------------------------------

    def import_kv(self, request: Request, transfer: KVTransfer) -> bool:
        """Admit `request` (prompt and sampling as the caller gave them) with the KV another
        worker computed, running, so the next step decodes it. Blocks already in this prefix
        cache are reused and only the rest written. Returns False when it could not be admitted
        with the KV now: it then waits and recomputes its prompt like a preempted request."""
        self._check_transfer(request, transfer)
        for token in transfer.token_ids[transfer.num_prompt_tokens:]:
            request.append_output_token(token)
        request.num_cached_tokens = transfer.num_cached_tokens
        self._check_request(request)
        bs = self.kv.block_size
        num_cached = self.scheduler.add_computed(request, transfer.num_computed_tokens,
                                                 min_cached_tokens=transfer.first_block * bs)
        if num_cached is None:
            return False
        block_ids = self.kv.block_ids(request.request_id)[: transfer.shape[0] + transfer.first_block]
        skip = num_cached // bs - transfer.first_block  # blocks this cache already holds
        block_bytes = len(transfer.data) // transfer.shape[0]
        self.runner.write_blocks(block_ids[num_cached // bs :], transfer.data[skip * block_bytes :])
        self.kv.cache_blocks(request)
        return True

    def _check_transfer(self, request: Request, transfer: KVTransfer) -> None:
        expected = self.runner.kv_block_shape(transfer.shape[0] if transfer.shape else 0)
        if (transfer.block_size != self.kv.block_size or transfer.dtype != self.config.dtype
                or transfer.shape != expected):
            raise ValueError(
                f"KV transfer of block size {transfer.block_size}, {transfer.dtype}, shape "
                f"{transfer.shape} does not fit this worker's cache (block size {self.kv.block_size}, "
                f"{self.config.dtype}, shape {expected})"
            )
        if transfer.token_ids[: transfer.num_prompt_tokens] != request.prompt_token_ids:
            raise ValueError(f"KV transfer {transfer.request_id!r} is for another prompt")
        num_blocks = transfer.first_block + transfer.shape[0]
        if math.ceil(transfer.num_computed_tokens / self.kv.block_size) != num_blocks:
            raise ValueError(f"KV transfer {transfer.request_id!r} holds {num_blocks} blocks for "
                             f"{transfer.num_computed_tokens} computed tokens")

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
        request_ids = list(request_ids)
        for request_id in request_ids:
            self._prefill_only.discard(request_id)
            self._exports.pop(request_id, None)
        return self.scheduler.abort(request_ids)

    def has_work(self) -> bool:
        return self.scheduler.has_unfinished()

    def step(self) -> list[EngineCoreOutput]:
        """Schedule a step, run the model on it, and return every request's new tokens."""
        t0 = time.perf_counter()
        sched = self.scheduler.schedule()
        if sched.is_empty:
            self.last_step = None
            return self.scheduler.update_from_output(sched, None)
        # Grammar masks depend only on tokens already sampled: they compute while the model runs.
        self.runner.sampler.prepare(c.request for c in sched.chunks if c.samples)
        result = self.runner.execute(sched)
        if self._prefill_only:
            self._copy_out_prefills(sched)
        outputs = self.scheduler.update_from_output(sched, result)
        if self._prefill_only:
            self._settle_prefills(outputs)
        prefill = sum(c.num_tokens for c in sched.chunks if c.request.num_output_tokens == 0)
        self.last_step = StepStats(
            num_tokens=sched.total_num_tokens,
            num_requests=len(sched.chunks),
            num_prefill_tokens=prefill,
            duration_s=time.perf_counter() - t0,
            tokens_by_request=sched.num_scheduled_tokens,
        )
        return outputs

    def take_kv_events(self) -> list[KVEvent]:
        return self.kv.take_events()


@dataclass
class Completion:
    """One finished sequence of an offline `LLMEngine.generate` call."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    arrival_s: float = 0.0
    first_token_s: float = 0.0
    finish_s: float = 0.0


class LLMEngine:
    """Offline engine: tokenizer + text streams around an in-process `EngineCore`.

    With `detokenize=False` no tokenizer is needed (a dummy-weight model of some shape has
    none): prompts are token ids, outputs are token ids, and stop strings are not available.
    """

    def __init__(self, config: EngineConfig, tokenizer: Tokenizer | None = None, detokenize: bool = True) -> None:
        self.config = config
        self.core = EngineCore(config)
        if tokenizer is None and detokenize:
            tokenizer = Tokenizer.from_pretrained(config.model_path)
        self.tokenizer = tokenizer
        self._ids = itertools.count()
        self.steps: list[StepStats] = []

    def generate(
        self,
        prompts: Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams],
        priorities: Sequence[int] | None = None,
    ) -> list[Completion]:
        """Run all prompts to completion with continuous batching; results in prompt order."""
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        done: dict[str, Completion] = {}
        streams: dict[str, TextStream | None] = {}
        order: list[str] = []
        for i, (prompt, sp) in enumerate(zip(prompts, params, strict=True)):
            ids = self._prompt_ids(prompt, sp)
            rid = f"gen-{next(self._ids)}"
            prio = priorities[i] if priorities else 0
            self.core.add_request(Request(rid, ids, sp, priority=prio))
            done[rid] = Completion(rid, ids, arrival_s=time.perf_counter())
            streams[rid] = TextStream(self.tokenizer, ids, sp.stop) if self.tokenizer else None
            order.append(rid)
        while self.core.has_work():
            outputs = self.core.step()
            if self.core.last_step is not None:
                self.steps.append(self.core.last_step)
            self._collect(outputs, done, streams)
        return [done[rid] for rid in order]

    def _prompt_ids(self, prompt: str | list[int], params: SamplingParams) -> list[int]:
        if self.tokenizer is None and (isinstance(prompt, str) or params.stop):
            raise ValueError("text prompts and stop strings need a tokenizer (detokenize=True)")
        return self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)

    def _collect(self, outputs, done, streams) -> None:
        now = time.perf_counter()
        to_abort: list[str] = []
        for out in outputs:
            comp = done[out.request_id]
            if not comp.token_ids and out.new_token_ids:
                comp.first_token_s = now
            comp.token_ids.extend(out.new_token_ids)
            if out.new_logprobs:
                comp.logprobs.extend(out.new_logprobs)
            comp.num_cached_tokens = out.num_cached_tokens
            stream = streams[out.request_id]
            stop = stream.push(out.new_token_ids)[1] if stream is not None else None
            if stop is not None and not out.finished:
                to_abort.append(out.request_id)
                comp.finish_reason, comp.stop_reason = "stop", stop
            if out.finished or stop is not None:
                if stream is not None:
                    stream.finish()
                    comp.text = stream.text
                comp.finish_s = now
                if comp.finish_reason is None:
                    comp.finish_reason, comp.stop_reason = out.finish_reason, out.stop_reason
        if to_abort:
            self.core.abort(to_abort)
