"""One worker's production line.

`EngineCore` owns the scheduler, the KV cache manager and the model runner and turns a step
into token ids; it knows nothing about text. `LLMEngine` adds the tokenizer and the text stream
(detokenization, stop strings) for offline use: benchmarks, tests, the twin's calibration.
The gateway does the same text work in its own process and talks to an `EngineCore` running in
another (see `tokenfactory.runtime`).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.kv_cache import KVCacheManager, KVEvent
from tokenfactory.engine.model_runner import ModelRunner
from tokenfactory.engine.outputs import EngineCoreOutput, TokenLogprobs
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

    def add_request(self, request: Request) -> None:
        """Queue a request; ValueError (saying why) for one that could never run correctly."""
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
        self.scheduler.add_request(request)

    def abort(self, request_ids: Iterable[str]) -> list[EngineCoreOutput]:
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
        result = self.runner.execute(sched)
        outputs = self.scheduler.update_from_output(sched, result)
        prefill = sum(c.num_tokens for c in sched.chunks if c.request.num_output_tokens == 0)
        self.last_step = StepStats(
            num_tokens=sched.total_num_tokens,
            num_requests=len(sched.chunks),
            num_prefill_tokens=prefill,
            duration_s=time.perf_counter() - t0,
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
