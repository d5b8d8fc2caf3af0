"""The engine's own process: a busy loop around `EngineCore`, fed and drained over ZMQ.

The gateway does every piece of HTTP and text work elsewhere, so this process only ever
(1) takes the requests and aborts that arrived, (2) runs one step, (3) sends that step's outputs as
one message. It reads its inbox without waiting while it has work and blocks on it only when idle,
so the accelerator is never starved by request traffic. Paced by the power governor (`SetPace`),
it starts a step only when its `control.governor.PaceBucket` allows (the twin runs the same code),
still reading its inbox while it rests: a request of the protected tier may let it start sooner.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
import traceback

import zmq

from tokenfactory.control.governor import PaceBucket
from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.outputs import EngineCoreOutput
from tokenfactory.engine.request import Request
from tokenfactory.meter.energy import StepEnergyMeter
from tokenfactory.meter.power import sensor_for
from tokenfactory.runtime.kv_transfer import InlineTransport, KVTransport
from tokenfactory.runtime.wire import (
    Abort,
    AddRequest,
    EngineFailed,
    ImportKV,
    EngineLoad,
    OutputBatch,
    Ready,
    SetPace,
    SetTokenBudget,
    Shutdown,
    encoder,
    to_engine_decoder,
)

PARENT_CHECK_INTERVAL_S = 1.0
"""How often the loop checks that the gateway still lives (an orphaned engine would spin forever)."""


def run_engine_process(config: EngineConfig, inbox_addr: str, outbox_addr: str) -> None:
    """Process entry point: build the engine, say `Ready`, then serve until `Shutdown`."""
    # Ctrl-C reaches the whole process group; the gateway decides when the engine stops.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(inbox_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(outbox_addr)
    try:
        core = EngineCore(config)
        outbox.send(encoder.encode(Ready(
            num_blocks=core.kv.num_blocks,
            block_size=config.cache.block_size,
            context_len=config.context_len,
            max_num_seqs=config.scheduler.max_num_seqs,
            pid=os.getpid(),
        )))
        EngineLoop(core, inbox, outbox, energy=StepEnergyMeter(sensor_for(config.device))).run()
    except Exception:
        outbox.send(encoder.encode(EngineFailed(traceback.format_exc())))
        raise
    finally:
        ctx.destroy(linger=1000)


class EngineLoop:
    """Receive, step, send; one `OutputBatch` per step that produced anything."""

    def __init__(
        self, core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, transport: KVTransport | None = None,
        energy: StepEnergyMeter | None = None,
    ) -> None:
        self.core = core
        self.energy = energy or StepEnergyMeter(sensor_for(core.config.device))
        self.transport = transport or InlineTransport()
        self.inbox = inbox
        self.outbox = outbox
        self.num_steps = 0
        self.step_seconds = 0.0
        self.num_tokens = 0
        self._parent = multiprocessing.parent_process()
        self._last_parent_check = time.monotonic()
        self.pace = PaceBucket()
        """Paced (`SetPace`): a step starts when this bucket allows, on time.monotonic."""

    def run(self) -> None:
        while True:
            outputs: list[EngineCoreOutput] = []
            rejected: dict[str, str] = {}
            rest = self._rest_s() if self.core.has_work() else 0.0
            received = self._receive(outputs, rejected, block=not self.core.has_work(), wait_s=rest)
            if received is None:
                return
            if self.core.has_work() and self._rest_s() <= 0.0:
                outputs.extend(self._step())
            kv_events = self.core.take_kv_events()
            kv_ready = self._export_prefills(outputs)
            energy_j = self.energy.take_finished(out.request_id for out in outputs if out.finished)
            if outputs or rejected or received or kv_events:
                batch = OutputBatch(outputs=outputs, load=self.load(), rejected=rejected, kv_events=kv_events,
                                    kv_ready=kv_ready, energy_j=energy_j)
                self.outbox.send(encoder.encode(batch))

    def _step(self) -> list[EngineCoreOutput]:
        """One engine step, timed, its energy shared among its requests by tokens."""
        self.energy.begin_step()
        t0 = time.perf_counter()
        outputs = self.core.step()
        duration = time.perf_counter() - t0
        stats = self.core.last_step
        tokens_by_request = stats.tokens_by_request if stats is not None else {}
        self.energy.end_step(duration, tokens_by_request)
        self.num_tokens += sum(tokens_by_request.values())
        self.step_seconds += duration
        self.num_steps += 1
        self.pace.spend(time.monotonic() - duration, duration, self.energy.last_watts)
        return outputs

    def _rest_s(self) -> float:
        """How long the pace asks the next step to wait (0: none)."""
        return self.pace.wait_s(time.monotonic(), self.pace.protects(self.core.scheduler.has_prompt_work))

    def _receive(self, outputs: list[EngineCoreOutput], rejected: dict[str, str], block: bool,
                 wait_s: float = 0.0) -> int | None:
        """Apply every waiting message (when not blocking, after waiting up to `wait_s` for one);
        the number applied, or None on `Shutdown`/orphaning."""
        if block:
            while not self.inbox.poll(timeout=int(PARENT_CHECK_INTERVAL_S * 1000)):
                if not self._parent_alive():
                    return None
        elif not self._parent_alive():
            return None
        elif wait_s > 0:
            self.inbox.poll(timeout=max(1, round(min(wait_s, PARENT_CHECK_INTERVAL_S) * 1000)))
        count = 0
        while True:
            try:
                raw = self.inbox.recv(zmq.NOBLOCK)
            except zmq.Again:
                return count
            msg = to_engine_decoder.decode(raw)
            if isinstance(msg, Shutdown):
                return None
            count += 1
            if isinstance(msg, AddRequest):
                self._add(msg, rejected)
            elif isinstance(msg, ImportKV):
                self._import(msg, rejected)
            elif isinstance(msg, Abort):
                outputs.extend(self.core.abort(msg.request_ids))
            elif isinstance(msg, SetTokenBudget):
                self.core.scheduler.set_token_budget(msg.tokens)
            elif isinstance(msg, SetPace):
                pace = msg.pace()
                if pace != self.pace.pace:
                    self.pace.set(pace, time.monotonic())

    def _add(self, msg: AddRequest, rejected: dict[str, str]) -> None:
        request = Request(msg.request_id, msg.prompt_token_ids, msg.sampling, priority=msg.priority)
        try:
            if msg.prefill_only:
                self.core.prefill_only(request, msg.prompt_hashes)
            else:
                self.core.add_request(request, msg.prompt_hashes)
        except ValueError as e:
            rejected[msg.request_id] = str(e)

    def _import(self, msg: ImportKV, rejected: dict[str, str]) -> None:
        request = Request(msg.request_id, msg.prompt_token_ids, msg.sampling, priority=msg.priority)
        try:
            self.core.import_kv(request, self.transport.receive(msg.handle))
        except ValueError as e:
            rejected[msg.request_id] = str(e)

    def _export_prefills(self, outputs: list[EngineCoreOutput]) -> dict[str, bytes]:
        """Hand the KV of prefill-only requests that finished in this step to the transport."""
        return {
            out.request_id: self.transport.send(self.core.export_kv(out.request_id))
            for out in outputs
            if out.finished and self.core.has_export(out.request_id)
        }

    def _parent_alive(self) -> bool:
        now = time.monotonic()
        if self._parent is None or now - self._last_parent_check < PARENT_CHECK_INTERVAL_S:
            return True
        self._last_parent_check = now
        return self._parent.is_alive()

    def load(self) -> EngineLoad:
        scheduler, kv = self.core.scheduler, self.core.kv
        return EngineLoad(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            num_free_blocks=kv.num_free_blocks,
            num_total_blocks=kv.num_blocks,
            num_steps=self.num_steps,
            step_seconds=self.step_seconds,
            power_w=self.energy.last_watts,
            power_source=self.energy.source,
            energy_j=self.energy.total_j,
            num_tokens=self.num_tokens,
            token_budget=scheduler.token_budget,
        )
