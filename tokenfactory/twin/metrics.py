"""What a simulation measured: per-request records in, a summary of the factory out."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenfactory.engine.outputs import EngineCoreOutput


@dataclass(slots=True)
class RequestRecord:
    """One request's timeline in simulated seconds (-1 until it happens)."""

    arrival: float
    num_prompt_tokens: int
    first_token: float = -1.0
    last_token: float = -1.0
    finish: float = -1.0
    num_output_tokens: int = 0
    num_cached_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def itl(self) -> float:
        """Mean inter-token latency after the first token (0 for a single-token answer)."""
        if self.num_output_tokens < 2:
            return 0.0
        return (self.last_token - self.first_token) / (self.num_output_tokens - 1)

    @property
    def e2e(self) -> float:
        return self.finish - self.arrival

    def observe(self, output: EngineCoreOutput, now: float) -> bool:
        """Fold one engine step's output for this request in at `now`; True once it finished."""
        if self.first_token < 0:
            self.first_token = now
        self.num_output_tokens += len(output.new_token_ids)
        self.last_token = now
        if output.finish_reason is None:
            return False
        self.finish = now
        self.num_cached_tokens = output.num_cached_tokens
        return True


@dataclass(frozen=True, slots=True)
class SLO:
    ttft_s: float = 2.0
    itl_s: float = 0.1


@dataclass(frozen=True, slots=True)
class Percentiles:
    p50: float
    p90: float
    p99: float


@dataclass(frozen=True, slots=True)
class Summary:
    num_requests: int
    num_finished: int
    num_rejected: int
    duration_s: float
    """Simulated seconds from the first arrival to the last finish."""
    ttft: Percentiles
    itl: Percentiles
    e2e: Percentiles
    output_tokens: int
    output_tokens_per_s: float
    output_tokens_per_s_per_gpu: float
    prefix_hit_rate: float
    """Prompt tokens served from the prefix cache / prompt tokens."""
    goodput_rps: float
    """Finished requests per second that met the SLO."""
    slo_attainment: float
    energy_j: float
    joules_per_token: float
    dollars_per_million_tokens: float
    num_preemptions: int


def percentiles(values: list[float]) -> Percentiles:
    """Nearest-rank percentiles (NaN for no values)."""
    if not values:
        nan = float("nan")
        return Percentiles(nan, nan, nan)
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(round(q * len(ordered))) - 1))]

    return Percentiles(rank(0.50), rank(0.90), rank(0.99))


def summarize(
    records: list[RequestRecord],
    num_rejected: int,
    num_gpus: int,
    energy_j: float,
    price_per_gpu_hour: float,
    num_preemptions: int = 0,
    slo: SLO = SLO(),
) -> Summary:
    finished = [r for r in records if r.finish >= 0]
    start = min((r.arrival for r in records), default=0.0)
    end = max((r.finish for r in finished), default=start)
    duration = max(end - start, 1e-9)
    output_tokens = sum(r.num_output_tokens for r in records)
    prompt_tokens = sum(r.num_prompt_tokens for r in finished)
    cached_tokens = sum(r.num_cached_tokens for r in finished)
    good = sum(1 for r in finished if r.ttft <= slo.ttft_s and r.itl <= slo.itl_s)
    tokens_per_s = output_tokens / duration
    per_gpu = tokens_per_s / num_gpus
    return Summary(
        num_requests=len(records),
        num_finished=len(finished),
        num_rejected=num_rejected,
        duration_s=duration,
        ttft=percentiles([r.ttft for r in finished]),
        itl=percentiles([r.itl for r in finished if r.num_output_tokens > 1]),
        e2e=percentiles([r.e2e for r in finished]),
        output_tokens=output_tokens,
        output_tokens_per_s=tokens_per_s,
        output_tokens_per_s_per_gpu=per_gpu,
        prefix_hit_rate=cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        goodput_rps=good / duration,
        slo_attainment=good / len(finished) if finished else 0.0,
        energy_j=energy_j,
        joules_per_token=energy_j / output_tokens if output_tokens else float("nan"),
        dollars_per_million_tokens=price_per_gpu_hour * 1e6 / (per_gpu * 3600) if per_gpu else float("nan"),
        num_preemptions=num_preemptions,
    )
