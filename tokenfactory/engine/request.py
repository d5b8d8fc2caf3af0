"""A request as one worker's engine sees it: token ids in, token ids out.

The scheduler's whole view of progress is two numbers per request: how many tokens it
has (`num_tokens`: prompt plus output so far) and how many of those already sit in the KV
cache (`num_computed_tokens`). A step gives each scheduled request a number of tokens to
compute; that one model covers chunked prefill, prefix-cache hits, decode and preemption.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """How to pick output tokens for one sequence (one OpenAI `choice`)."""

    max_tokens: int = 16
    """Most output tokens to generate (>= 1)."""
    temperature: float = 1.0
    """0 means greedy; otherwise logits are divided by it before sampling."""
    top_p: float = 1.0
    """Nucleus sampling: keep the smallest set of tokens whose mass reaches top_p (0, 1]."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 means no limit."""
    seed: int | None = None
    """With a seed, the request's samples do not depend on what else is in the batch."""
    stop: tuple[str, ...] = ()
    """Stop strings; checked on detokenized text by the output processor, never included."""
    stop_token_ids: tuple[int, ...] = ()
    """Token ids that end the sequence (besides EOS, unless ignore_eos)."""
    ignore_eos: bool = False
    """Keep generating past EOS (benchmarks use it to fix output lengths)."""
    logprobs: int | None = None
    """None: no logprobs. k >= 0: the chosen token's logprob plus the top-k alternatives."""
    min_tokens: int = 0
    """EOS and stop token ids are ignored until this many tokens were generated."""
    grammar: str | None = None
    """An llguidance grammar (engine/grammar.py) the output must match; None: unconstrained."""

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be non-negative, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be non-negative, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED


FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
}


@dataclass(slots=True)
class Request:
    """One sequence inside the engine. Mutated only by the scheduler."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    eos_token_ids: tuple[int, ...] = ()
    priority: int = 0
    """Higher is served first and may preempt lower (tiers map onto this)."""
    arrival_time: float = field(default_factory=time.monotonic)
    status: RequestStatus = RequestStatus.WAITING
    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    """Prompt followed by output; kept as one list so the hot path never concatenates."""
    num_computed_tokens: int = 0
    num_cached_tokens: int = -1
    """Prompt tokens found in the prefix cache at first schedule (-1 until scheduled)."""
    num_preemptions: int = 0
    stop_reason: int | str | None = None
    """The stop token id or stop string that ended the request, if any."""

    def __post_init__(self) -> None:
        if not self.prompt_token_ids:
            raise ValueError("a request needs at least one prompt token")
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASONS.get(self.status)

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
