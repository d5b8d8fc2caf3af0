"""Energy attribution: each engine step's joules, shared among its requests by tokens.

A step computes some tokens for each request in it (a prefill chunk, or one decode token). Its
energy is the sensor's energy counter difference across the step where the device keeps one
(NVML), else power x the step's duration; each request gets the share of that energy its tokens
are of the step's tokens. Energy spent idle between steps belongs to no request and is left out.

Three pieces, one per place they run:
- `StepEnergyMeter` in the engine process: sums each request's joules and hands a request's total
  over once it finishes (it rides `wire.OutputBatch.energy_j` to the gateway);
- `EnergyBook` in the gateway: holds those totals until the ledger entry of the HTTP request
  takes them (an HTTP request with `n` choices runs engine requests `<id>-0 .. <id>-(n-1)`);
- `energy_by_tier`: joules per token and tokens per joule by tier, read from the ledger.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

from tokenfactory.meter.db import connect
from tokenfactory.meter.power import PowerReading, PowerSensor, Source


def attribute_step(joules: float, tokens_by_request: dict[str, int]) -> dict[str, float]:
    """Split a step's joules among its requests in proportion to the tokens each computed."""
    total = sum(tokens_by_request.values())
    if total <= 0:
        return {}
    return {request_id: joules * n / total for request_id, n in tokens_by_request.items()}


def step_joules(before: PowerReading, after: PowerReading, duration_s: float) -> float:
    """A step's energy: the counter difference where both readings carry one, else mean power x time."""
    if before.energy_counter_j is not None and after.energy_counter_j is not None:
        return max(0.0, after.energy_counter_j - before.energy_counter_j)
    return (before.watts + after.watts) / 2 * duration_s


class StepEnergyMeter:
    """In the engine process: reads the sensor around each step and keeps each request's joules."""

    def __init__(self, sensor: PowerSensor) -> None:
        self.sensor = sensor
        self.total_j = 0.0
        self.last_watts = 0.0
        self._by_request: dict[str, float] = {}
        self._before: PowerReading | None = None

    @property
    def source(self) -> Source:
        return self.sensor.source

    def begin_step(self) -> None:
        self._before = self.sensor.read()

    def end_step(self, duration_s: float, tokens_by_request: dict[str, int]) -> None:
        """Attribute the step that `begin_step` opened, `duration_s` long."""
        after = self.sensor.read()
        before = self._before if self._before is not None else after
        joules = step_joules(before, after, duration_s)
        self._before = None
        self.total_j += joules
        self.last_watts = after.watts
        for request_id, share in attribute_step(joules, tokens_by_request).items():
            self._by_request[request_id] = self._by_request.get(request_id, 0.0) + share

    def take_finished(self, request_ids: Iterable[str]) -> dict[str, float]:
        """The joules of requests that just ended (finished, aborted or handed off), forgotten here."""
        return {rid: self._by_request.pop(rid, 0.0) for rid in request_ids}


class EnergyBook:
    """In the gateway: joules per HTTP request, from the engine's messages until the ledger takes them.

    Engine request `<id>-<i>` (choice i of HTTP request `<id>`, as the gateway names them) adds to
    `<id>`. Bounded: entries nobody takes (an aborted request whose ledger row was written before
    its energy arrived) are dropped oldest first.
    """

    def __init__(self, max_entries: int = 100_000) -> None:
        self.max_entries = max_entries
        self._joules: OrderedDict[str, float] = OrderedDict()

    def add(self, energy_j: dict[str, float]) -> None:
        for engine_request_id, joules in energy_j.items():
            request_id = engine_request_id.rpartition("-")[0] or engine_request_id
            self._joules[request_id] = self._joules.get(request_id, 0.0) + joules
            self._joules.move_to_end(request_id)
        while len(self._joules) > self.max_entries:
            self._joules.popitem(last=False)

    def take(self, request_id: str) -> float | None:
        """The joules of HTTP request `request_id`, forgotten here; None when none arrived."""
        return self._joules.pop(request_id, None)


@dataclass(frozen=True, slots=True)
class TierEnergy:
    tier: str
    requests_metered: int
    """Requests whose ledger row has energy (rows before the meter, or without it, are left out)."""
    tokens: int
    """Prompt (uncached) plus completion tokens of those requests: the tokens the energy computed."""
    energy_j: float

    @property
    def joules_per_token(self) -> float | None:
        return self.energy_j / self.tokens if self.tokens else None

    @property
    def tokens_per_joule(self) -> float | None:
        return self.tokens / self.energy_j if self.energy_j > 0 else None


def energy_by_tier(path: str | Path, since: float = 0.0) -> list[TierEnergy]:
    """Energy and computed tokens per tier from the ledger, over rows that carry energy."""
    with closing(connect(path)) as conn:
        rows = conn.execute(
            "SELECT tier, COUNT(*), SUM(prompt_tokens - cached_tokens + completion_tokens), SUM(energy_j) "
            "FROM usage WHERE created_at >= ? AND energy_j IS NOT NULL GROUP BY tier ORDER BY tier", (since,),
        ).fetchall()
    return [TierEnergy(tier, n, int(tokens or 0), float(joules or 0.0)) for tier, n, tokens, joules in rows]
