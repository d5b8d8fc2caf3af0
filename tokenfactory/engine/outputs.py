"""What crosses the boundaries inside a worker: scheduler -> model runner -> scheduler -> client.

`SchedulerOutput` and `ModelRunnerOutput` stay inside the engine process and may hold live
objects. `EngineCoreOutput` crosses processes (to the gateway, or to the twin's meters), so it is a
msgspec Struct that serialises compactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from tokenfactory.engine.request import Request


@dataclass(slots=True)
class ScheduledChunk:
    """One request's share of a step: compute `num_tokens` tokens starting at
    `request.num_computed_tokens`, writing their KV into `block_ids`.

    The runner samples a new token for this request only if the chunk reaches the end of the
    request's known tokens (`request.num_computed_tokens + num_tokens == request.num_tokens`);
    a chunk in the middle of a long prompt samples nothing.
    """

    request: Request
    num_tokens: int
    block_ids: list[int]
    """The request's whole block table after allocation for this step (KV cache slots)."""

    @property
    def start(self) -> int:
        return self.request.num_computed_tokens

    @property
    def end(self) -> int:
        return self.request.num_computed_tokens + self.num_tokens

    @property
    def samples(self) -> bool:
        return self.end == self.request.num_tokens


def prefill_gather_blocks(chunk: ScheduledChunk, block_size: int) -> int:
    """How many cache blocks the runner gathers for a prefill chunk: every block up to the
    chunk's end after a cached prefix, none for a chunk from the prompt's start (its keys are
    its own rows)."""
    return -(-chunk.end // block_size) if chunk.start else 0


def shared_decode_blocks(decodes: list[ScheduledChunk], block_size: int) -> int:
    """How many leading blocks every decode row's table has in common: the runner reads them once
    for the whole batch (0 for one row, where sharing saves nothing). Only blocks wholly before
    every row's newest token count: that token's KV is written this step."""
    if len(decodes) < 2:
        return 0
    limit = (min(c.end for c in decodes) - 1) // block_size
    tables = [c.block_ids for c in decodes]
    first = tables[0]
    count = 0
    while count < limit and all(t[count] == first[count] for t in tables):
        count += 1
    return count


@dataclass(slots=True)
class SchedulerOutput:
    """A step: a token budget spread over requests, no separate prefill and decode phases."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted_ids: list[str] = field(default_factory=list)
    """Requests whose blocks were freed this step (they recompute later)."""
    finished_ids: list[str] = field(default_factory=list)
    """Requests that finished since the last step; the runner drops their state (seeded RNGs)."""

    @property
    def num_scheduled_tokens(self) -> dict[str, int]:
        return {c.request.request_id: c.num_tokens for c in self.chunks}

    @property
    def total_num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_empty(self) -> bool:
        return not self.chunks


class Logprob(msgspec.Struct, array_like=True, frozen=True):
    token_id: int
    logprob: float


class TokenLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """The chosen token's logprob and the top alternatives (most likely first)."""

    chosen: Logprob
    top: list[Logprob]


@dataclass(slots=True)
class ModelRunnerOutput:
    """Per request that sampled this step: its new token (and logprobs when asked for)."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)
    logprobs: dict[str, TokenLogprobs] = field(default_factory=dict)


class EngineCoreOutput(msgspec.Struct, array_like=True, omit_defaults=True):
    """New tokens for one request after one step; the last one carries `finish_reason`."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    """"stop", "length" or "abort"; None while the request runs on."""
    stop_reason: int | str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens served from the prefix cache (OpenAI `cached_tokens`)."""

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class KVTransfer(msgspec.Struct, array_like=True, frozen=True):
    """A prefilled request's KV blocks, leaving one worker for another (disaggregated serving).

    `data` holds K and V of blocks `first_block..first_block + shape[0] - 1` of the request, laid out
    as `shape` = [num_blocks, num_layers, 2 (K, V), block_size, num_kv_heads, head_dim] in `dtype`,
    C order (block-major: whole blocks are contiguous byte ranges). Blocks before `first_block` were left out because the receiver already caches them.
    Plain data only, so any transport (ZMQ bytes, shared memory, RDMA, an object store) can carry it.
    """

    request_id: str
    block_size: int
    token_ids: list[int]
    """Prompt plus the tokens sampled on the sending side (the first one, after a prefill)."""
    num_prompt_tokens: int
    num_computed_tokens: int
    """Tokens whose KV the blocks hold (the prompt, after a prefill)."""
    num_cached_tokens: int
    """Prompt tokens the sender found in its prefix cache (reported to the caller as cached)."""
    dtype: str
    shape: list[int]
    data: bytes
    first_block: int = 0

    @property
    def num_bytes(self) -> int:
        return len(self.data)
