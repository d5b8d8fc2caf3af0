"""The factory's Prometheus metrics, served as text at GET /metrics.

Per request (from its ledger entry, so metrics and ledger never disagree), each labelled by the
model that served it: requests by tier and outcome, tokens by tier and kind, TTFT and duration
histograms by tier, revenue (what the tier's prices charged), energy and the electricity cost of
that energy. Per scrape (from the workers' last load reports, labelled by model and worker):
queue depths, KV usage, power and step energy; the prefix hit rate comes from the token counters.
Each app owns its registry, so two apps in one process never share counts.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tokenfactory.meter.ledger import LedgerEntry
from tokenfactory.runtime.wire import EngineLoad

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
JOULES_PER_KWH = 3.6e6


@dataclass(frozen=True, slots=True)
class WorkerSample:
    """One worker's last load report, as /metrics shows it."""

    model: str
    worker: str
    """Its id within its model's pool."""
    load: EngineLoad


class FactoryMetrics:
    def __init__(self, electricity_usd_per_kwh: float = 0.10) -> None:
        self.electricity_usd_per_kwh = electricity_usd_per_kwh
        self.registry = CollectorRegistry()
        r = self.registry
        by_tier = ["model", "tier"]
        self.requests = Counter("tokenfactory_requests", "Requests by model, tier and outcome", [*by_tier, "outcome"],
                                registry=r)
        self.tokens = Counter("tokenfactory_tokens", "Tokens by model, tier and kind (prompt, cached, completion)",
                              [*by_tier, "kind"], registry=r)
        self.ttft = Histogram("tokenfactory_time_to_first_token_seconds", "Time to first token by model and tier",
                              by_tier, buckets=LATENCY_BUCKETS_S, registry=r)
        self.duration = Histogram("tokenfactory_request_duration_seconds", "Request duration by model and tier",
                                  by_tier, buckets=LATENCY_BUCKETS_S, registry=r)
        self.revenue = Counter("tokenfactory_revenue_usd", "What the tiers' prices charged", by_tier, registry=r)
        self.request_energy = Counter("tokenfactory_request_energy_joules",
                                      "Step energy attributed to requests, by model and tier", by_tier, registry=r)
        self.energy_cost = Counter("tokenfactory_energy_cost_usd",
                                   "Electricity cost of the energy attributed to requests", by_tier, registry=r)
        self.prefix_hit_rate = Gauge("tokenfactory_prefix_cache_hit_rate",
                                     "Prompt tokens served from the prefix cache / prompt tokens", registry=r)
        labels = ["model", "worker"]
        self.running = Gauge("tokenfactory_requests_running", "Requests in the running batch", labels, registry=r)
        self.waiting = Gauge("tokenfactory_requests_waiting", "Requests queued in the engine", labels, registry=r)
        self.kv_usage = Gauge("tokenfactory_kv_cache_usage_ratio", "Used KV blocks / all KV blocks", labels,
                              registry=r)
        self.power = Gauge("tokenfactory_power_watts", "Accelerator power during the last step",
                           [*labels, "source"], registry=r)
        self.step_energy = Gauge("tokenfactory_step_energy_joules",
                                 "Joules spent inside engine steps since the worker started",
                                 [*labels, "source"], registry=r)
        self._prompt_tokens = 0
        self._cached_tokens = 0

    def observe(self, entry: LedgerEntry) -> None:
        """Count one request as its ledger entry records it."""
        key = (entry.model, entry.tier)
        self.requests.labels(*key, entry.outcome).inc()
        self.tokens.labels(*key, "prompt").inc(entry.prompt_tokens)
        self.tokens.labels(*key, "cached").inc(entry.cached_tokens)
        self.tokens.labels(*key, "completion").inc(entry.completion_tokens)
        if entry.ttft_s is not None:
            self.ttft.labels(*key).observe(entry.ttft_s)
        self.duration.labels(*key).observe(entry.duration_s)
        self.revenue.labels(*key).inc(entry.cost_usd)
        if entry.energy_j is not None:
            self.request_energy.labels(*key).inc(entry.energy_j)
            self.energy_cost.labels(*key).inc(entry.energy_j / JOULES_PER_KWH * self.electricity_usd_per_kwh)
        self._prompt_tokens += entry.prompt_tokens
        self._cached_tokens += entry.cached_tokens

    def render(self, workers: list[WorkerSample]) -> bytes:
        """The Prometheus text exposition, with the workers' gauges as of now."""
        for sample in workers:
            load, w = sample.load, (sample.model, sample.worker)
            self.running.labels(*w).set(load.num_running)
            self.waiting.labels(*w).set(load.num_waiting)
            used = load.num_total_blocks - load.num_free_blocks
            self.kv_usage.labels(*w).set(used / load.num_total_blocks if load.num_total_blocks else 0.0)
            self.power.labels(*w, load.power_source).set(load.power_w)
            self.step_energy.labels(*w, load.power_source).set(load.energy_j)
        self.prefix_hit_rate.set(self._cached_tokens / self._prompt_tokens if self._prompt_tokens else 0.0)
        return generate_latest(self.registry)
