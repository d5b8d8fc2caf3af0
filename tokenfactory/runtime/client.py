"""The worker interface, and its first implementation: an engine in a local process over ZMQ.

Everything above a worker (the gateway today, a router over many workers later) talks to it only
through `Worker`: submit a request and stream its outputs, abort it, read its load. Where the
engine lives (a local process, a Ray actor on another node) is the implementation's business;
the messages themselves (`tokenfactory.runtime.wire`) are plain bytes on any transport.

`AsyncEngineClient` runs inside the gateway's event loop. One background task reads the engine's
per-step `OutputBatch`es and routes each `EngineCoreOutput` to its request's queue. If the engine
process dies, every in-flight request fails at once with `EngineDeadError`; nothing waits forever.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

import zmq
import zmq.asyncio

from tokenfactory.control.governor import Pace
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.kv_cache import KVEvent
from tokenfactory.engine.outputs import EngineCoreOutput
from tokenfactory.engine.request import SamplingParams
from tokenfactory.meter.energy import EnergyBook
from tokenfactory.runtime.wire import (
    Abort,
    AddRequest,
    EngineFailed,
    EngineLoad,
    ImportKV,
    OutputBatch,
    Ready,
    SetPace,
    SetTokenBudget,
    Shutdown,
    encoder,
    from_engine_decoder,
)


def _engine_process_main(config: EngineConfig, inbox_addr: str, outbox_addr: str) -> None:
    """The engine process's entry point, imported there: the gateway never loads torch."""
    from tokenfactory.runtime.engine_process import run_engine_process

    run_engine_process(config, inbox_addr, outbox_addr)

logger = logging.getLogger(__name__)

LIVENESS_CHECK_MS = 500
"""How long the reader waits for output before checking that the engine process still lives."""


async def cancel_and_wait(task: asyncio.Future) -> None:
    """Cancel `task` and wait until it has finished unwinding (its cancellation swallowed)."""
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


class EngineDeadError(RuntimeError):
    """The engine process is gone; the request cannot finish."""


class RequestRejectedError(ValueError):
    """The engine refused the request (the message says why)."""


class Worker(Protocol):
    """What the gateway or a router needs from one engine, wherever it runs."""

    @property
    def info(self) -> Ready: ...

    @property
    def load(self) -> EngineLoad: ...

    @property
    def is_alive(self) -> bool: ...

    @property
    def dead_reason(self) -> str | None: ...

    async def start(self) -> None: ...

    async def shutdown(self) -> None: ...

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        session_id: str | None = None, prompt_hashes: Sequence[int] = (),
    ) -> AsyncIterator[EngineCoreOutput]:
        """Stream one sequence's outputs; `session_id` names the conversation it belongs to (a
        router may keep a session's turns on one engine, where its growing context is cached);
        `prompt_hashes` are the prompt's `prompt_block_hashes` if the caller has them already."""

    def abort(self, request_id: str) -> None: ...

    def subscribe_kv_events(self, callback: Callable[[list[KVEvent]], None]) -> None:
        """Call `callback` with each batch of the engine's prefix-cache events, in order."""


class KVWorker(Worker, Protocol):
    """A worker that can take either half of a disaggregated request."""

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        prompt_hashes: Sequence[int] = (),
    ) -> tuple[EngineCoreOutput, object | None]:
        """Compute the prompt and sample the first token -> that output and the transport handle of
        the request's KV, opaque to the caller (bytes from an engine process, a `RayKVHandle` from a
        Ray actor; None when the first token ended the request)."""

    def generate_from_kv(
        self, request_id: str, prompt_token_ids: list[int], handle: object, params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[EngineCoreOutput]:
        """Continue a request prefilled elsewhere (its KV under `handle`); yield the tokens after
        the first."""


class AsyncEngineClient:
    """A `Worker` whose engine runs in a child process ("spawn"), reached over ipc:// sockets."""

    def __init__(self, config: EngineConfig, startup_timeout_s: float = 300.0) -> None:
        self.config = config
        self.startup_timeout_s = startup_timeout_s
        self._queues: dict[str, asyncio.Queue[EngineCoreOutput | Exception]] = {}
        self._load = EngineLoad()
        self._info: Ready | None = None
        self._dead_reason: str | None = None
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task | None = None
        self._tmpdir = ""
        self._kv_listeners: list[Callable[[list[KVEvent]], None]] = []
        self._kv_handles: dict[str, bytes] = {}
        """KV handles of finished prefill-only requests, until `prefill` takes them."""
        self.energy = EnergyBook()
        """Joules of ended requests, as the engine attributed them, until the ledger takes them."""
        self.token_budget: int | None = None
        """The tokens per step last asked of the engine (None: its configured budget)."""
        self.pace = SetPace(None)
        """The pace last asked of the engine (`pace_w` None: unpaced)."""

    @property
    def info(self) -> Ready:
        if self._info is None:
            raise RuntimeError("the engine has not started")
        return self._info

    @property
    def load(self) -> EngineLoad:
        """The engine's load as of its last message."""
        return self._load

    @property
    def is_alive(self) -> bool:
        return self._info is not None and self._dead_reason is None

    @property
    def dead_reason(self) -> str | None:
        return self._dead_reason

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    async def start(self) -> None:
        """Spawn the engine process and wait until it has built its model and KV cache."""
        self._tmpdir = tempfile.mkdtemp(prefix="tokenfactory-")
        inbox_addr, outbox_addr = f"ipc://{self._tmpdir}/in", f"ipc://{self._tmpdir}/out"
        self._zmq = zmq.asyncio.Context()
        # Linger 0 everywhere: a context collected without shutdown() must not block the
        # interpreter's exit on messages for an engine that is gone.
        self._zmq.setsockopt(zmq.LINGER, 0)
        # Sends are plain (synchronous) so an abort can go out even from a cancelled task. The
        # sender gets a context of its own: a socket made through a shadow of the asyncio
        # context would be invisible to that context's destroy(), whose term() then hangs.
        self._sync_zmq = zmq.Context()
        self._sync_zmq.setsockopt(zmq.LINGER, 0)
        self._sender = self._sync_zmq.socket(zmq.PUSH)
        self._sender.setsockopt(zmq.SNDHWM, 0)
        self._sender.bind(inbox_addr)
        self._receiver = self._zmq.socket(zmq.PULL)
        self._receiver.setsockopt(zmq.RCVHWM, 0)
        self._receiver.bind(outbox_addr)
        ctx = multiprocessing.get_context("spawn")
        self._process = ctx.Process(
            target=_engine_process_main,
            args=(self.config, inbox_addr, outbox_addr),
            name="tokenfactory-engine",
            daemon=True,
        )
        self._process.start()
        try:
            self._info = await asyncio.wait_for(self._await_ready(), self.startup_timeout_s)
        except BaseException:
            await self.shutdown()
            raise
        self._load = EngineLoad(num_free_blocks=self._info.num_blocks, num_total_blocks=self._info.num_blocks)
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")

    async def _await_ready(self) -> Ready:
        while True:
            if await self._receiver.poll(LIVENESS_CHECK_MS):
                msg = from_engine_decoder.decode(await self._receiver.recv())
                if isinstance(msg, Ready):
                    return msg
                if isinstance(msg, EngineFailed):
                    raise EngineDeadError(f"the engine failed to start:\n{msg.message}")
            elif not self._process.is_alive():
                raise EngineDeadError(
                    f"the engine process exited during startup (exit code {self._process.exitcode})"
                )

    async def _read_outputs(self) -> None:
        # A reader that stopped silently would leave every request waiting forever.
        try:
            await self._route_outputs()
        except Exception as e:
            logger.exception("reading the engine's outputs failed")
            self._fail_all(f"lost the engine's output stream ({e!r})")

    async def _route_outputs(self) -> None:
        """Route each step's outputs to their requests; notice a dead engine within a moment."""
        while True:
            if not await self._receiver.poll(LIVENESS_CHECK_MS):
                if not self._process.is_alive():
                    self._fail_all(f"the engine process died (exit code {self._process.exitcode})")
                    return
                continue
            msg = from_engine_decoder.decode(await self._receiver.recv())
            if isinstance(msg, EngineFailed):
                logger.error("the engine process failed:\n%s", msg.message)
                last_line = msg.message.strip().splitlines()[-1] if msg.message.strip() else "unknown error"
                self._fail_all(f"the engine failed ({last_line})")
                return
            if isinstance(msg, OutputBatch):
                self._dispatch(msg)

    def subscribe_kv_events(self, callback: Callable[[list[KVEvent]], None]) -> None:
        self._kv_listeners.append(callback)

    def _dispatch(self, batch: OutputBatch) -> None:
        self._load = batch.load
        if batch.kv_events:
            for listener in self._kv_listeners:
                listener(batch.kv_events)
        self.energy.add(batch.energy_j)  # before the outputs: a final output's ledger entry reads it
        for request_id, handle in batch.kv_ready.items():
            if request_id in self._queues:
                self._kv_handles[request_id] = handle
        for out in batch.outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:  # None: the caller already left (it sent an abort)
                queue.put_nowait(out)
        for request_id, reason in batch.rejected.items():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(RequestRejectedError(reason))

    def _fail_all(self, reason: str) -> None:
        self._dead_reason = reason
        for queue in self._queues.values():
            queue.put_nowait(EngineDeadError(reason))

    def _check_alive(self) -> None:
        if self._dead_reason is not None:
            raise EngineDeadError(self._dead_reason)
        if self._info is None:
            raise EngineDeadError("the engine has not started")

    def generate(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        session_id: str | None = None, prompt_hashes: Sequence[int] = (),
    ) -> AsyncIterator[EngineCoreOutput]:
        """Submit one sequence and yield its outputs step by step until it finishes.

        Leaving early (break, exception, cancellation) aborts the request so its KV blocks free up.
        One engine has nothing to route, so `session_id` is not used here.
        """
        return self._stream(AddRequest(request_id, list(prompt_token_ids), params, priority,
                                       prompt_hashes=list(prompt_hashes)))

    async def prefill(
        self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
        prompt_hashes: Sequence[int] = (),
    ) -> tuple[EngineCoreOutput, bytes | None]:
        """The prefill half of a split request: its first output, and its KV's transport handle."""
        last: EngineCoreOutput | None = None
        try:
            async for out in self._stream(AddRequest(request_id, list(prompt_token_ids), params, priority,
                                                     prefill_only=True, prompt_hashes=list(prompt_hashes))):
                last = out
        finally:
            handle = self._kv_handles.pop(request_id, None)
        assert last is not None  # a stream ends with a finished output or raises
        return last, handle

    def generate_from_kv(
        self, request_id: str, prompt_token_ids: list[int], handle: bytes, params: SamplingParams,
        priority: int = 0,
    ) -> AsyncIterator[EngineCoreOutput]:
        """The decode half of a split request: import its KV, yield the tokens after the first."""
        return self._stream(ImportKV(request_id, list(prompt_token_ids), params, handle, priority))

    async def _stream(self, msg: AddRequest | ImportKV) -> AsyncIterator[EngineCoreOutput]:
        self._check_alive()
        request_id = msg.request_id
        if request_id in self._queues:
            raise ValueError(f"request id {request_id!r} is already running")
        queue: asyncio.Queue[EngineCoreOutput | Exception] = asyncio.Queue()
        self._queues[request_id] = queue
        finished = False
        try:
            self._send(msg)
            while not finished:
                item = await queue.get()
                if isinstance(item, Exception):
                    finished = True  # the engine already dropped it
                    raise item
                finished = item.finished
                yield item
        finally:
            del self._queues[request_id]
            if not finished:
                self.abort(request_id)

    def abort(self, request_id: str) -> None:
        """Stop a request; its last output (finish_reason "abort") goes nowhere."""
        if self._dead_reason is None and self._info is not None:
            with contextlib.suppress(EngineDeadError):  # a gone engine holds nothing to free
                self._send(Abort([request_id]))

    def set_token_budget(self, tokens: int) -> None:
        """Ask the engine to schedule at most `tokens` per step (it clamps to its configured
        budget). Sent only when the value changes; a dead engine is left alone."""
        if tokens != self.token_budget and self.is_alive:
            with contextlib.suppress(EngineDeadError):
                self._send(SetTokenBudget(tokens))
                self.token_budget = tokens

    def set_pace(self, limits: Pace | None) -> None:
        """Pace the engine's steps with the governor's bucket (`wire.SetPace`; None: no rests).
        Sent only when it changes; a dead engine is left alone."""
        pace = SetPace.of(limits)
        if pace != self.pace and self.is_alive:
            with contextlib.suppress(EngineDeadError):
                self._send(pace)
                self.pace = pace

    def _send(self, msg: AddRequest | ImportKV | Abort | SetTokenBudget | SetPace | Shutdown) -> None:
        """Never blocks. The queue is unbounded (SNDHWM 0), so a send can only fail to go out at
        once when no engine is connected: a PUSH socket would otherwise wait for one forever."""
        try:
            self._sender.send(encoder.encode(msg), flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            if self._dead_reason is None:
                self._fail_all("the engine process is not connected")
            raise EngineDeadError(self._dead_reason) from None

    async def shutdown(self) -> None:
        """Stop the engine process (politely, then by force) and fail what is still in flight."""
        if self._reader is not None:
            await cancel_and_wait(self._reader)
        if self._process is not None and self._process.is_alive():
            with contextlib.suppress(zmq.ZMQError, EngineDeadError):
                self._send(Shutdown())
            await asyncio.to_thread(self._process.join, 10)
            if self._process.is_alive():
                self._process.kill()
                await asyncio.to_thread(self._process.join, 5)
        if self._dead_reason is None:
            self._fail_all("the engine was shut down")
        if self._tmpdir:
            self._sync_zmq.destroy(linger=0)
            self._zmq.destroy(linger=0)
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = ""
