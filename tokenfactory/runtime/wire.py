"""Messages between a worker's client and its engine process, msgspec-encoded.

Two one-way channels, so neither side ever waits on the other:

- client -> engine: `AddRequest`, `ImportKV`, `Abort`, `SetTokenBudget`, `SetPace`, `Shutdown`;
- engine -> client: `Ready` once at start, then one `OutputBatch` per step (every request's new
  tokens from that step in a single message, plus the engine's load), and `EngineFailed` if the
  engine cannot go on.

The structs are tagged, so one decoder per direction reads any message of that direction. They
hold only plain data, so any byte transport (ZMQ today, Ray or TCP later) can carry them.
"""

from __future__ import annotations

import msgspec

from tokenfactory.control.governor import Pace
from tokenfactory.engine.kv_cache import KVEvent
from tokenfactory.engine.outputs import EngineCoreOutput
from tokenfactory.engine.request import SamplingParams


class AddRequest(msgspec.Struct, tag=True, array_like=True):
    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    priority: int = 0
    prefill_only: bool = False
    """Stop after the first token and export the KV (the prefill half of a split request)."""
    prompt_hashes: list[int] = []
    """The prompt's `kv_cache.prompt_block_hashes` when the sender has them (a pool hashed the
    prompt to route it), so the engine does not hash it again; empty: the engine hashes it."""


class ImportKV(msgspec.Struct, tag=True, array_like=True):
    """Continue a request prefilled elsewhere: `handle` is what the prefill engine's
    `KVTransport.send` returned; this engine's transport turns it back into the KV."""

    request_id: str
    prompt_token_ids: list[int]
    sampling: SamplingParams
    handle: bytes
    priority: int = 0


class Abort(msgspec.Struct, tag=True, array_like=True):
    request_ids: list[str]


class SetTokenBudget(msgspec.Struct, tag=True, array_like=True):
    """Set the scheduler's tokens per step (a power governor's lever); the engine clamps it to
    [1, its configured max_num_batched_tokens]."""

    tokens: int


class SetPace(msgspec.Struct, tag=True, array_like=True):
    """Pace the engine (a power governor's lever, `control.governor.Pace`): a step starts only when
    a bucket of energy credit, earned at `pace_w` less the draw (`rest_w` while resting, the meter's
    power while stepping) and holding at most `capacity_j`, covers `step_j`; steps without prompt
    work of `protect_priority` or above wait for a full bucket. The defaults rest after each step
    until it and its rest average `pace_w`. `pace_w` None: no rests."""

    pace_w: float | None
    rest_w: float = 0.0
    capacity_j: float = 0.0
    step_j: float = 0.0
    protect_priority: int | None = None

    @classmethod
    def of(cls, pace: Pace | None) -> SetPace:
        return cls(None) if pace is None else cls(pace.pace_w, pace.rest_w, pace.capacity_j, pace.step_j,
                                                  pace.protect_priority)

    def pace(self) -> Pace | None:
        """The governor's bucket this message carries (None: unpaced)."""
        return None if self.pace_w is None else Pace(self.pace_w, self.rest_w, self.capacity_j, self.step_j,
                                                     self.protect_priority)


class Shutdown(msgspec.Struct, tag=True, array_like=True):
    """Ask the engine process to exit after its current step."""


class EngineLoad(msgspec.Struct, array_like=True):
    """How busy the engine is: what a router or /health needs to know."""

    num_running: int = 0
    num_waiting: int = 0
    num_free_blocks: int = 0
    num_total_blocks: int = 0
    num_steps: int = 0
    step_seconds: float = 0.0
    """Time spent inside steps since start (num_steps / step_seconds is the step rate)."""
    power_w: float = 0.0
    """The accelerator's power during the last step."""
    power_source: str = "modeled"
    """"measured" (NVML) or "modeled" (the twin's power model of the worker's hardware)."""
    energy_j: float = 0.0
    """Joules spent inside steps since start."""
    num_tokens: int = 0
    """Tokens computed inside steps since start (prefill chunks plus decodes)."""
    token_budget: int = 0
    """The scheduler's tokens per step now (lower than configured while a governor cuts it)."""


class Ready(msgspec.Struct, tag=True, array_like=True):
    """The engine built its model and KV cache and takes requests now."""

    num_blocks: int
    block_size: int
    context_len: int
    max_num_seqs: int
    pid: int


class OutputBatch(msgspec.Struct, tag=True, array_like=True):
    """One engine step's outputs (possibly none) and the load right after it."""

    outputs: list[EngineCoreOutput]
    load: EngineLoad
    rejected: dict[str, str] = {}
    """Requests the engine refused outright, with the reason (e.g. past the context window)."""
    kv_events: list[KVEvent] = []
    """Prefix-cache changes in this step: what a KV-aware router subscribes to."""
    kv_ready: dict[str, bytes] = {}
    """Prefill-only requests finished this step: request id -> transport handle of their KV."""
    energy_j: dict[str, float] = {}
    """Requests that ended this step (finished, aborted, or prefilled for another worker) -> the
    joules of their steps on this engine, shared by tokens (`meter/energy.py`)."""


class EngineFailed(msgspec.Struct, tag=True, array_like=True):
    """The engine hit an error it cannot recover from; the process exits after sending it."""

    message: str


ToEngine = AddRequest | ImportKV | Abort | SetTokenBudget | SetPace | Shutdown
FromEngine = Ready | OutputBatch | EngineFailed

encoder = msgspec.msgpack.Encoder()
to_engine_decoder = msgspec.msgpack.Decoder(ToEngine)
from_engine_decoder = msgspec.msgpack.Decoder(FromEngine)
