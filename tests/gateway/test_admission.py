"""Admission: shedding by power and load (503 + Retry-After, a `shed` ledger row), the invariant that
a higher tier is never shed while a lower one runs, the live governor's token-budget lever, and
the grid-event admin API."""

from __future__ import annotations

import dataclasses
import threading
import time

import httpx
import pytest

from tests.engine.test_scheduler import make_request, make_scheduler
from tests.gateway.live_server import API_KEY, MODEL_NAME, LiveServer, gateway_config, metric
from tokenfactory.control.tiers import builtin_config, parse_factory_config
from tokenfactory.control.admission import AdmissionConfig, TierCounts, shed_decision
from prometheus_client import CollectorRegistry

from tokenfactory.control.governor import GovernorDecision, WorkerLimits
from tokenfactory.gateway.admission import GovernorMetrics, LiveGovernor, TierTraffic, shed_error
from tokenfactory.meter.ledger import LedgerEntry, read_entries
from tokenfactory.runtime.client import AsyncEngineClient
from tokenfactory.runtime.pool import ModelPools, ServedModel, WorkerPool
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.runtime.wire import EngineLoad

TIERS = builtin_config()  # flex (-10, sheddable) < default (0) < priority (10)
ADMIN_KEY = "sk-admin"
MIN_TOKENS = 8


def counts(**in_flight: tuple[int, int]) -> dict[str, TierCounts]:
    """tier=(queued, running) for the tiers named, the rest idle."""
    out = {name: TierCounts() for name in TIERS.tiers}
    for name, (queued, running) in in_flight.items():
        out[name] = TierCounts(queued=queued, running=running)
    return out


def entry(tier: str, outcome: str = "completed", **tokens) -> LedgerEntry:
    fields = {"prompt_tokens": 0, "cached_tokens": 0, "completion_tokens": 0, "energy_j": None, **tokens}
    return LedgerEntry(request_id="r", created_at=0.0, tenant="t", key_id="k", tier=tier, model=MODEL_NAME,
                       cost_usd=0.0, ttft_s=None, duration_s=0.0, outcome=outcome, **fields)


# ---------------------------------------------------------------- the rule, pure


def test_a_tier_the_governor_stopped_is_shed_with_503_and_retry_after():
    shed = shed_decision("flex", TIERS, counts(), frozenset({"flex"}), AdmissionConfig(power_retry_after_s=7.5))
    assert shed is not None and shed.reason == "power"
    error = shed_error(shed)
    assert error.status_code == 503 and error.headers == {"Retry-After": "8"}
    assert error.body()["error"]["code"] == "power_budget_exceeded"
    assert shed_decision("default", TIERS, counts(), frozenset({"flex"}), AdmissionConfig()) is None


def test_priority_is_never_shed_while_a_flex_request_is_in_flight():
    everything = frozenset(TIERS.tiers)
    tight = AdmissionConfig(max_queued=1)
    busy = counts(flex=(0, 1), priority=(5, 0))
    assert shed_decision("priority", TIERS, busy, everything, tight) is None
    assert shed_decision("default", TIERS, busy, everything, tight) is None
    assert shed_decision("flex", TIERS, busy, everything, tight) is not None
    drained = counts(priority=(5, 0))
    assert shed_decision("priority", TIERS, drained, everything, tight) is not None  # only once flex is gone


def test_load_sheds_only_sheddable_tiers_behind_a_deep_queue():
    config = AdmissionConfig(max_queued=4)
    deep = counts(priority=(4, 0))
    shed = shed_decision("flex", TIERS, deep, frozenset(), config, start_rate=2.0)
    assert shed is not None and shed.reason == "load" and shed.retry_after_s == 2.0  # 4 ahead at 2/s
    assert shed_error(shed).body()["error"]["code"] == "server_overloaded"
    assert shed_decision("default", TIERS, deep, frozenset(), config) is None  # not sheddable
    # Queued flex requests are behind a new default one, not ahead of it; but ahead of a flex one.
    assert shed_decision("flex", TIERS, counts(flex=(4, 0)), frozenset(), config) is not None


def test_traffic_counts_follow_a_request_from_queue_to_ledger():
    traffic = TierTraffic(TIERS)
    flight = traffic.submitted("flex", num_seqs=2, prompt_tokens=30)
    assert (traffic.counts["flex"].queued, traffic.counts["flex"].queued_prompt_tokens) == (2, 30)
    assert {t.tier: t.demand_tokens_per_step for t in traffic.loads()}["flex"] == 30
    traffic.first_token(flight)
    traffic.generated("flex", 2)
    assert (traffic.counts["flex"].queued, traffic.counts["flex"].running) == (0, 2)
    assert {t.tier: t.demand_tokens_per_step for t in traffic.loads()}["flex"] == 2  # a token per sequence
    done = entry("flex", prompt_tokens=15, cached_tokens=5, completion_tokens=4, energy_j=2.8)
    traffic.ended(flight, done)
    traffic.ended(flight, done)  # a second ending must not count twice
    assert traffic.counts["flex"].in_flight == 0
    ttfts, ended = traffic.recent()
    assert [tier for tier, _ in ttfts] == ["flex"] and ended[-1].computed_tokens == 14


def test_live_demand_is_tokens_per_step_not_the_whole_backlog(tiny_model_dir):
    traffic = TierTraffic(TIERS)  # default: a 2 s TTFT target
    traffic.submitted("default", num_seqs=8, prompt_tokens=4000)
    config = gateway_config(tiny_model_dir)
    governor = LiveGovernor(builtin_config().power, AsyncEngineClient(config), traffic, "cpu", 64)
    governor.observe_steps([EngineLoad(num_steps=100, step_seconds=4.0)])  # 40 ms a step since start
    governor.observe_steps([EngineLoad(num_steps=100, step_seconds=4.0)])  # no step this round: kept
    assert governor.step_s == pytest.approx(0.04)
    demand = {t.tier: t.demand_tokens_per_step for t in traffic.loads(governor.step_s)}
    assert demand["default"] == pytest.approx(4000 / 50)  # its backlog over the 50 steps of its TTFT target
    governor.observe_steps([EngineLoad(num_steps=110, step_seconds=5.0)])  # slower steps lately: 100 ms
    assert governor.step_s == pytest.approx(0.1)
    governor.observe_steps([EngineLoad(num_steps=3, step_seconds=0.1)])  # a restarted engine: skipped
    assert governor.step_s == pytest.approx(0.1)


def test_the_scheduler_takes_a_lower_token_budget_at_runtime():
    scheduler = make_scheduler(max_num_batched_tokens=64)
    assert scheduler.set_token_budget(10_000) == 64 and scheduler.set_token_budget(0) == 1
    scheduler.set_token_budget(16)
    scheduler.add_request(make_request("long", num_prompt=40))
    assert sum(chunk.num_tokens for chunk in scheduler.schedule().chunks) == 16


def test_modeled_power_follows_the_share_of_time_stepped_and_the_tokens_per_step(tiny_model_dir):
    config = gateway_config(tiny_model_dir)  # CPU: modeled from 10 W idle to 30 W busy
    max_tokens = config.scheduler.max_num_batched_tokens
    governor = LiveGovernor(builtin_config().power, AsyncEngineClient(config), TierTraffic(TIERS), "cpu", max_tokens)
    assert governor.fleet[0].hardware.idle_w == 10 and governor.fleet[0].hardware.tdp_w == 30
    assert governor.modeled_power(0, EngineLoad(), now=100.0) == 10.0  # nothing to compare with yet: idle
    half_busy = EngineLoad(num_steps=10, step_seconds=0.5, num_tokens=10 * max_tokens // 2)
    assert governor.modeled_power(0, half_busy, now=101.0) == pytest.approx(10 + 20 * 0.5 * 0.5)
    assert governor.modeled_power(0, half_busy, now=102.0) == 10.0  # no step since: idle again


CPU, H100 = get_hardware("cpu"), get_hardware("h100")


def test_each_models_engines_are_governed_on_their_own_device_and_labelled_by_model(tiny_model_dir):
    base = gateway_config(tiny_model_dir)
    general = dataclasses.replace(base, served_model_name="general")
    specialist = dataclasses.replace(base, served_model_name="specialist", device="cuda:1",
                                     scheduler=dataclasses.replace(base.scheduler, max_num_batched_tokens=256))
    pools = ModelPools([ServedModel(general, WorkerPool([AsyncEngineClient(general), AsyncEngineClient(general)], 16)),
                        ServedModel(specialist, AsyncEngineClient(specialist))])
    spec = builtin_config().power.model_copy(update={"hardware": None})
    governor = LiveGovernor(spec, pools, TierTraffic(TIERS), "cpu", 64)
    assert [(g.model, g.index, g.hardware.name, g.max_tokens_per_step) for g in governor.fleet] == [
        ("general", 0, CPU.name, 1024), ("general", 1, CPU.name, 1024), ("specialist", 0, H100.name, 256)]
    # The specialist's engine is modeled on its own hardware and step budget: half busy at half its tokens.
    half = EngineLoad(num_steps=10, step_seconds=0.5, num_tokens=10 * 128)
    governor.modeled_power(2, EngineLoad(), now=100.0)
    assert governor.modeled_power(2, half, now=101.0) == pytest.approx(H100.idle_w + (H100.tdp_w - H100.idle_w) * 0.25)
    # Every pool numbers its workers from 0: the metrics tell them apart by model.
    registry = CollectorRegistry()
    governor.decision = GovernorDecision(100.0, tuple(WorkerLimits(i, 10.0, 100 + i) for i in range(3)),
                                         frozenset(TIERS.tiers))
    GovernorMetrics(registry).update(governor)
    budgets = {(labels["model"], labels["worker"]): value for labels, value in
               ((s.labels, s.value) for family in registry.collect() for s in family.samples
                if s.name == "tokenfactory_token_budget")}
    assert budgets == {("general", "0"): 100, ("general", "1"): 101, ("specialist", "0"): 102}


# ---------------------------------------------------------------- live


class ManualClock:
    """Wall time that moves only when a test says so (grid events are scheduled in it)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


FACTORY = f"""
tiers:
  flex: {{priority: -10, sheddable: true}}
  default: {{priority: 0}}
  priority: {{priority: 10}}
power: {{static_cap_w: 25, min_tokens_per_step: {MIN_TOKENS}, pacing: false}}
"""


@pytest.fixture(scope="module")
def governed(tiny_model_dir, tmp_path_factory):
    db = tmp_path_factory.mktemp("governed") / "factory.db"
    clock = ManualClock(1_800_000_000.0)
    server = LiveServer(gateway_config(tiny_model_dir), api_keys=[API_KEY], db_path=db, admin_key=ADMIN_KEY,
                        tiers=parse_factory_config(FACTORY), clock=clock,
                        admission=AdmissionConfig(max_queued=4)).start()
    server.db, server.clock = db, clock
    server.admission = server.app.state.metering.admission
    yield server
    server.stop()


@pytest.fixture
def blackout(governed):
    """A 100% grid cut from now; afterwards the clock moves past it and the governor restores."""
    resp = admin(governed, "post", json={"name": "blackout", "cut_fraction": 1.0, "duration_s": 600})
    assert resp.status_code == 200, resp.text
    yield resp.json()
    governed.clock.now += 3600
    governed.admission.tick()


def admin(server, method: str, key: str = ADMIN_KEY, **kwargs) -> httpx.Response:
    return httpx.request(method, f"{server.url}/admin/grid-events", headers={"Authorization": f"Bearer {key}"},
                         timeout=10, **kwargs)


def complete(server, tier: str, max_tokens: int = 2, **extra) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                      json={"model": MODEL_NAME, "prompt": "power to the people", "max_tokens": max_tokens,
                            "ignore_eos": True, "service_tier": tier, **extra})


def wait_for(condition, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_the_grid_event_api_needs_the_admin_key_and_a_valid_event(governed):
    assert admin(governed, "get", key="wrong").status_code == 401
    bad = admin(governed, "post", json={"cut_fraction": 1.5, "duration_s": 60})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "cut_fraction"
    both = admin(governed, "post", json={"cut_fraction": 0.1, "duration_s": 60, "start_s": 1.0, "start_in_s": 5})
    assert both.status_code == 400 and "not both" in both.json()["error"]["message"]


def test_a_power_cut_sheds_lower_tiers_with_503_and_records_them(governed, blackout):
    assert blackout["state"] == "active" and blackout["cut_now"] == 1.0
    listed = admin(governed, "get").json()
    assert listed["budget_w"] == 0.0 and [e["name"] for e in listed["data"]] == ["blackout"]
    resp = complete(governed, "flex")
    assert resp.status_code == 503
    assert resp.headers["Retry-After"] == "5" and resp.json()["error"]["code"] == "power_budget_exceeded"
    wait_for(lambda: any(r.outcome == "shed" and r.tier == "flex" for r in read_entries(governed.db)))
    assert metric(governed, "tokenfactory_requests_total", model=governed.model, tier="flex", outcome="shed") >= 1
    assert metric(governed, "tokenfactory_tier_admitted", tier="flex") == 0
    assert metric(governed, "tokenfactory_power_budget_watts") == 0.0
    # The token-budget lever: the engine now schedules the floor, and says so in its load reports.
    assert metric(governed, "tokenfactory_token_budget", model=governed.model, worker="0") == MIN_TOKENS
    wait_for(lambda: governed.worker.load.token_budget == MIN_TOKENS)


def test_the_budget_comes_back_when_the_event_is_over(governed):
    with_cut = admin(governed, "post", json={"cut_fraction": 1.0, "duration_s": 60}).json()
    governed.clock.now = with_cut["end_s"] + 1
    governed.admission.tick()
    assert complete(governed, "flex").status_code == 200
    assert metric(governed, "tokenfactory_power_budget_watts") == 25.0
    # The static cap alone: 25 W of the CPU model's 10 W idle to 30 W busy -> 3/4 of the tokens.
    configured = governed.worker.config.scheduler.max_num_batched_tokens
    wait_for(lambda: governed.worker.load.token_budget == configured * 3 // 4)


def test_priority_is_served_through_a_blackout_while_flex_still_runs(governed):
    long_flex = threading.Thread(target=lambda: complete(governed, "flex", max_tokens=400))
    long_flex.start()
    flex = governed.admission.traffic.counts["flex"]
    wait_for(lambda: flex.running == 1)
    cut = admin(governed, "post", json={"name": "blackout", "cut_fraction": 1.0, "duration_s": 600})
    try:
        assert cut.status_code == 200 and flex.running == 1, "flex ended too early for this test"
        assert governed.admission.governor.shed_tiers == {"flex", "default"}
        assert complete(governed, "priority").status_code == 200
        assert complete(governed, "flex").status_code == 503
    finally:
        long_flex.join(120)
        governed.clock.now += 3600
        governed.admission.tick()


def test_a_deep_queue_sheds_a_sheddable_tier_by_load(governed):
    traffic = governed.admission.traffic
    backlog = traffic.submitted("priority", num_seqs=4, prompt_tokens=4)  # four sequences waiting
    try:
        resp = complete(governed, "flex")
        assert resp.status_code == 503 and resp.json()["error"]["code"] == "server_overloaded"
        assert int(resp.headers["Retry-After"]) >= 1
        assert complete(governed, "default").status_code == 200  # not sheddable
    finally:
        traffic.ended(backlog, entry("priority", outcome="aborted"))
    assert complete(governed, "flex").status_code == 200
