"""Workers as Ray actors: an engine on any node of a Ray cluster, behind the same `Worker` interface
as a local engine process, with split requests' KV moving between actors through Ray's object store.

The actor runs the engine process's own loop (`EngineLoop`) on a thread, with two mailboxes in
place of its ZMQ sockets, so the same wire messages (`runtime/wire.py`) travel either way. The
client sends each message with `actor.put(seq, message)`, numbered because a threaded actor may run
calls out of order (the inbox puts them back in order), and keeps one `actor.take()` outstanding: a
long poll that returns the engine's messages as soon as there are any. A dead actor fails that
call, and with it every request in flight, as a dead process fails its reader.

KV moves through `RayObjectTransport`: the prefill actor `ray.put`s the encoded transfer and returns
the reference along with the batch that names it; the pool holds the reference (never the bytes)
and hands it to the decode actor with the `ImportKV`, whose actor fetches the bytes from the object
store, from whichever node holds them, before its engine sees the message. The object lives while a
reference to it does: it is freed once imported or dropped, and lost if its prefill actor dies
first; the decode engine then rejects the import (`KV_LOST`) and the pool recomputes the request.

Ray must be initialised (`ray.init`) before a client starts; `serve --transport ray` does it, joining
the cluster that `RAY_ADDRESS` names or starting a local one. Each node needs tokenfactory installed
and the checkpoint at the path the config names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import traceback
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray
import zmq

from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.outputs import EngineCoreOutput, KVTransfer
from tokenfactory.engine.request import SamplingParams
from tokenfactory.runtime.client import AsyncEngineClient, EngineDeadError, cancel_and_wait
from tokenfactory.runtime.kv_transfer import InlineTransport
from tokenfactory.runtime.wire import (
    Abort,
    AddRequest,
    EngineFailed,
    EngineLoad,
    ImportKV,
    OutputBatch,
    Ready,
    SetTokenBudget,
    Shutdown,
    encoder,
    from_engine_decoder,
)

logger = logging.getLogger(__name__)

TAKE_WAIT_S = 0.5
"""How long one `take` waits in the actor for the engine's next message before returning none."""

KV_FETCH_TIMEOUT_S = 60.0
"""How long a decode actor waits for a transfer's bytes before calling them lost."""

KV_LOST = "the KV of this request was lost before it arrived"
"""How a rejected import starts when its object was gone (its prefill actor died): the pool's cue
to recompute rather than fail."""


class _Inbox:
    """The engine's inbox: messages released in the client's numbering, through the two socket calls
    `EngineLoop` makes (`poll`, non-blocking `recv`)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._early: dict[int, bytes] = {}
        self._ready: deque[bytes] = deque()
        self._next = 0

    def put(self, seq: int, data: bytes) -> None:
        with self._cond:
            self._early[seq] = data
            while self._next in self._early:
                self._ready.append(self._early.pop(self._next))
                self._next += 1
            self._cond.notify_all()

    def poll(self, timeout: int) -> bool:
        """Whether a message is ready within `timeout` milliseconds."""
        with self._cond:
            return bool(self._cond.wait_for(lambda: self._ready, timeout / 1000))

    def recv(self, flags: int = 0) -> bytes:
        """The next message; `zmq.Again` when there is none (the loop only ever asks without waiting)."""
        with self._cond:
            if not self._ready:
                raise zmq.Again()
            return self._ready.popleft()


class _Outbox:
    """The engine's outbox: `send` from the loop, `take` (everything so far) from the client's poll."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._messages: deque[bytes] = deque()

    def send(self, data: bytes) -> None:
        with self._cond:
            self._messages.append(data)
            self._cond.notify_all()

    def take(self, timeout_s: float) -> list[bytes]:
        with self._cond:
            self._cond.wait_for(lambda: self._messages, timeout_s)
            messages = list(self._messages)
            self._messages.clear()
            return messages


class RayObjectTransport:
    """A `KVTransport` through Ray's object store, used inside the actors. The handle is the
    object's id; the reference itself travels beside the wire messages (`take_sent` on the prefill
    side, `deliver` on the decode side), so Ray counts who holds it and frees it after use."""

    def __init__(self) -> None:
        self._codec = InlineTransport()
        self._lock = threading.Lock()
        self._sent: dict[bytes, ray.ObjectRef] = {}
        self._arrived: dict[bytes, bytes | str] = {}

    def send(self, transfer: KVTransfer) -> bytes:
        ref = ray.put(self._codec.send(transfer))
        with self._lock:
            self._sent[ref.binary()] = ref
        return ref.binary()

    def take_sent(self) -> dict[bytes, ray.ObjectRef]:
        """The references made since the last call, for the client (this actor lets go of them)."""
        with self._lock:
            sent, self._sent = self._sent, {}
        return sent

    def deliver(self, handle: bytes, ref: ray.ObjectRef) -> None:
        """Fetch the transfer under `handle` ahead of its `ImportKV` (on the actor's call thread, so
        the engine's steps never wait on the network)."""
        try:
            data: bytes | str = ray.get(ref, timeout=KV_FETCH_TIMEOUT_S)
        except (ray.exceptions.RayError, TimeoutError) as e:
            data = f"{KV_LOST} ({type(e).__name__})"
        with self._lock:
            self._arrived[handle] = data

    def receive(self, handle: bytes) -> KVTransfer:
        with self._lock:
            data = self._arrived.pop(handle, None)
        if data is None:
            raise ValueError("no KV was delivered under this handle")
        if isinstance(data, str):
            raise ValueError(data)
        return self._codec.receive(data)


class EngineActor:
    """The engine inside a Ray actor (made with `ray.remote(EngineActor)`): `EngineLoop` on a thread
    between an inbox and an outbox. Torch is imported there, never in the client's process."""

    def __init__(self, config: EngineConfig) -> None:
        self.inbox, self.outbox = _Inbox(), _Outbox()
        self.transport = RayObjectTransport()
        self._loop = threading.Thread(target=self._serve, args=(config,), name="engine-loop", daemon=True)
        self._loop.start()

    def _serve(self, config: EngineConfig) -> None:
        try:
            from tokenfactory.engine.engine import EngineCore
            from tokenfactory.runtime.engine_process import EngineLoop

            core = EngineCore(config)
            self.outbox.send(encoder.encode(Ready(
                num_blocks=core.kv.num_blocks,
                block_size=config.cache.block_size,
                context_len=config.context_len,
                max_num_seqs=config.scheduler.max_num_seqs,
                pid=os.getpid(),
            )))
            EngineLoop(core, self.inbox, self.outbox, transport=self.transport).run()
        except Exception:
            self.outbox.send(encoder.encode(EngineFailed(traceback.format_exc())))

    def put(self, seq: int, data: bytes, kv: tuple[bytes, list[ray.ObjectRef]] | None = None) -> None:
        """Message `seq` for the engine; `kv`: the handle and (in a list, so that Ray passes the
        reference rather than resolving it) the object of the transfer an `ImportKV` names."""
        if kv is not None:
            handle, (ref,) = kv
            self.transport.deliver(handle, ref)
        self.inbox.put(seq, data)

    def take(self, timeout_s: float) -> tuple[list[bytes], dict[bytes, ray.ObjectRef]]:
        """The engine's messages since the last call (waiting up to `timeout_s` for one), and the
        references of the KV transfers they may name."""
        messages = self.outbox.take(timeout_s)
        return messages, self.transport.take_sent()  # after the messages: every handle they name is in


@dataclass(frozen=True, slots=True)
class RayKVHandle:
    """A split request's KV as the pool holds it between a prefill and a decode Ray worker."""

    key: bytes
    ref: ray.ObjectRef


class RayEngineClient(AsyncEngineClient):
    """A `Worker` (and `KVWorker`) whose engine runs in a Ray actor. Request bookkeeping (streams,
    aborts, rejections, KV events, energy) is `AsyncEngineClient`'s; only the transport differs.

    `actor_options` go to Ray's `.options()` (resources, node placement, runtime env); by default
    one CPU, and one GPU for a CUDA engine."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 300.0, **actor_options: Any) -> None:
        super().__init__(config, startup_timeout_s)
        self.actor_options = {"num_cpus": 1, "num_gpus": 1 if config.device.startswith("cuda") else 0,
                              **actor_options}
        self._actor: Any = None
        self._seq = 0
        self._unclaimed: dict[bytes, ray.ObjectRef] = {}
        """KV references that came back before the batch naming them (or for a caller who left)."""
        self._imports: dict[str, RayKVHandle] = {}
        """The KV of `ImportKV`s about to be sent, by request id."""

    @property
    def pid(self) -> int | None:
        """The actor's process id (on its node)."""
        return self._info.pid if self._info is not None else None

    async def start(self) -> None:
        """Create the actor and wait until its engine has built the model and KV cache."""
        if not ray.is_initialized():
            raise RuntimeError("Ray is not initialised: call ray.init() first (serve --transport ray does)")
        options = {"max_concurrency": 4, **self.actor_options}  # a long poll and sends at once
        self._actor = ray.remote(EngineActor).options(**options).remote(self.config)
        try:
            self._info = await asyncio.wait_for(self._await_ready(), self.startup_timeout_s)
        except TimeoutError:
            await self.shutdown()
            raise EngineDeadError(f"the engine's Ray actor was not ready within {self.startup_timeout_s:.0f} s "
                                  f"(can the cluster place it? {self.actor_options})") from None
        except BaseException:
            await self.shutdown()
            raise
        self._load = EngineLoad(num_free_blocks=self._info.num_blocks, num_total_blocks=self._info.num_blocks)
        self._reader = asyncio.create_task(self._read_outputs(), name="ray-engine-output-reader")

    async def _take(self) -> list[OutputBatch | Ready | EngineFailed]:
        try:
            raw, sent = await self._actor.take.remote(TAKE_WAIT_S)
        except ray.exceptions.RayActorError as e:
            raise EngineDeadError(f"the engine's Ray actor died ({_first_line(e)})") from None
        self._unclaimed.update(sent)
        return [from_engine_decoder.decode(message) for message in raw]

    async def _await_ready(self) -> Ready:
        while True:
            for msg in await self._take():
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, EngineFailed):
                    raise EngineDeadError(f"the engine failed to start:\n{msg.message}")

    async def _route_outputs(self) -> None:
        while True:
            try:
                messages = await self._take()
            except EngineDeadError as e:
                self._fail_all(str(e))
                return
            for msg in messages:
                if isinstance(msg, EngineFailed):
                    logger.error("the engine's Ray actor failed:\n%s", msg.message)
                    self._fail_all(f"the engine failed ({_first_line(msg.message)})")
                    return
                if isinstance(msg, OutputBatch):
                    self._dispatch(msg)

    def _dispatch(self, batch: OutputBatch) -> None:
        super()._dispatch(batch)
        for request_id, key in batch.kv_ready.items():
            ref = self._unclaimed.pop(key, None)
            if ref is not None and self._kv_handles.get(request_id) == key:
                # What `prefill` returns: the id with its reference, which keeps the object alive.
                self._kv_handles[request_id] = RayKVHandle(key, ref)  # type: ignore[assignment]

    async def generate_from_kv(
        self, request_id: str, prompt_token_ids: list[int], handle: RayKVHandle, params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[EngineCoreOutput]:
        """The decode half of a split request whose KV another Ray worker put in the object store."""
        if not isinstance(handle, RayKVHandle):
            raise TypeError(f"a Ray worker imports KV from another Ray worker's object store, not a "
                            f"{type(handle).__name__} handle")
        message = ImportKV(request_id, list(prompt_token_ids), params, handle.key, priority)
        self._imports[request_id] = handle
        del handle  # held only until sent, so the object is freed once the decode actor has it
        try:
            async for out in self._stream(message):
                yield out
        finally:
            self._imports.pop(request_id, None)

    def _send(self, msg: AddRequest | ImportKV | Abort | SetTokenBudget | Shutdown) -> None:
        """Never blocks: the call is queued; a dead actor shows in the reader's next poll."""
        if self._actor is None:
            raise EngineDeadError(self._dead_reason or "the engine's Ray actor is gone")
        kv = None
        if isinstance(msg, ImportKV):
            kv = (msg.handle, [self._imports.pop(msg.request_id).ref])
        self._actor.put.remote(self._seq, encoder.encode(msg), kv)
        self._seq += 1

    async def shutdown(self) -> None:
        """Kill the actor (it holds nothing that outlives it) and fail what is still in flight."""
        if self._reader is not None:
            await cancel_and_wait(self._reader)
            self._reader = None
        if self._actor is not None:
            with contextlib.suppress(ray.exceptions.RayError):
                ray.kill(self._actor, no_restart=True)
            self._actor = None
        self._unclaimed.clear()
        if self._dead_reason is None:
            self._fail_all("the engine was shut down")


def ensure_ray() -> None:
    """Join the Ray cluster `RAY_ADDRESS` names, or start a local one, unless this process has."""
    if not ray.is_initialized():
        ray.init()


def _first_line(error: object) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

