"""The power governor: budgets under grid events, tier shedding order, token budgets per worker,
pacing, and the factory config's `power` section (scheduled grid events)."""

from __future__ import annotations

import random
from datetime import datetime, timezone

import pytest

from tokenfactory.control.governor import (
    GovernorConfig,
    GovernorState,
    GridEvent,
    TierLoad,
    WorkerPower,
    add_event,
    admit_tiers,
    budget_at,
    decide,
    Pace,
    PaceBucket,
    PowerSpec,
    pace_power,
    scheduled_state,
    tier_demand,
)
from tokenfactory.control.tiers import ConfigError, parse_factory_config

HOUR = 3600.0
T14 = 14 * HOUR
WORKERS = [WorkerPower(i, idle_w=100.0, max_w=700.0, max_tokens_per_step=8192) for i in range(4)]
CONFIG = GovernorConfig(static_cap_w=2800.0, pacing=False)  # the token-budget lever
CUT_25_FROM_14_FOR_3H = GridEvent(start_s=T14, duration_s=3 * HOUR, cut_fraction=0.25, ramp_s=600.0)


def modeled_power(worker: WorkerPower, tokens_per_step: int) -> float:
    """The simple load model: a worker running its full token budget draws its share of power."""
    return worker.idle_w + (worker.max_w - worker.idle_w) * tokens_per_step / worker.max_tokens_per_step


def loads(flex: float, default: float, priority: float) -> list[TierLoad]:
    return [TierLoad("flex", -10, flex), TierLoad("default", 0, default), TierLoad("priority", 10, priority)]


def test_a_grid_event_ramps_in_before_it_starts_and_out_after_it_ends():
    state = GovernorState(events=(CUT_25_FROM_14_FOR_3H,))
    assert budget_at(CONFIG, state, T14 - 700) == 2800.0
    assert budget_at(CONFIG, state, T14 - 300) == pytest.approx(2800 * (1 - 0.125))
    for now in (T14, T14 + HOUR, T14 + 3 * HOUR - 1):
        assert budget_at(CONFIG, state, now) == pytest.approx(2100.0)
    assert budget_at(CONFIG, state, T14 + 3 * HOUR + 300) == pytest.approx(2800 * (1 - 0.125))
    assert budget_at(CONFIG, state, T14 + 3 * HOUR + 600) == 2800.0


def test_power_stays_under_the_budget_once_the_ramp_is_done_even_at_full_load():
    state = add_event(GovernorState(), CUT_25_FROM_14_FOR_3H, now=T14 - HOUR)
    full = loads(flex=20000, default=20000, priority=20000)
    for now in (T14 - 600, T14 - 300, T14, T14 + 2 * HOUR, T14 + 3 * HOUR + 100):
        decision = decide(CONFIG, state, WORKERS, full, now)
        drawn = sum(modeled_power(w, limit.token_budget) for w, limit in zip(WORKERS, decision.workers))
        assert drawn <= decision.budget_w + 1e-6
    during = decide(CONFIG, state, WORKERS, full, T14 + HOUR)
    assert during.budget_w == pytest.approx(2100.0)
    assert all(limit.token_budget < 8192 for limit in during.workers)
    before = decide(CONFIG, state, WORKERS, full, T14 - 2 * HOUR)
    assert all(limit.token_budget == 8192 for limit in before.workers)


def test_an_event_announced_late_ramps_from_its_announcement():
    state = add_event(GovernorState(), CUT_25_FROM_14_FOR_3H, now=T14 - 60)
    assert budget_at(CONFIG, state, T14 - 61) == 2800.0  # nothing before anyone knew
    assert budget_at(CONFIG, state, T14 - 30) == pytest.approx(2800 * (1 - 0.125))
    assert budget_at(CONFIG, state, T14) == pytest.approx(2100.0)


def test_a_tiers_demand_spreads_its_queued_prompts_over_the_steps_in_its_ttft_target():
    # 4 sequences decoding, 6,000 prompt tokens queued, a 2 s TTFT target at 50 ms steps: 40 steps
    assert tier_demand(4, 6000, ttft_s=2.0, step_s=0.05) == pytest.approx(4 + 150)
    assert tier_demand(4, 6000, ttft_s=2.0, step_s=0.05, arriving_tokens_per_step=400) == 404  # arrivals, if more
    assert tier_demand(4, 6000, ttft_s=0.01, step_s=0.05) == 6004  # a target shorter than a step: all due now
    assert tier_demand(4, 6000, ttft_s=2.0, step_s=None) == 6004  # no step time seen yet: all due now


def test_tiers_are_shed_lowest_first_as_the_budget_falls():
    demand = loads(flex=6000, default=8000, priority=6000)  # 20k tokens/step asked for
    shed_order = []
    for cut in (0.0, 0.3, 0.5, 0.7):
        event = GridEvent(start_s=0.0, duration_s=HOUR, cut_fraction=cut, ramp_s=0.0)
        decision = decide(CONFIG, GovernorState(events=(event,)), WORKERS, demand, now=10.0)
        for tier in decision.shed_tiers:
            if tier not in shed_order:
                shed_order.append(tier)
        if "default" in decision.admitted_tiers:
            assert "priority" in decision.admitted_tiers  # never a lower tier without the higher ones
    assert shed_order == ["flex", "default"]


def test_priority_is_untouched_while_lower_tiers_have_load():
    blackout = GovernorState(events=(GridEvent(0.0, HOUR, cut_fraction=0.9, ramp_s=0.0),))
    demand = loads(flex=5000, default=5000, priority=50000)  # priority alone exceeds the capacity
    decision = decide(CONFIG, blackout, WORKERS, demand, now=10.0)
    assert decision.admitted_tiers == {"priority"}
    assert decision.shed_tiers == ("flex", "default")
    drained = decide(CONFIG, blackout, WORKERS, loads(flex=0, default=0, priority=50000), now=10.0)
    assert "priority" not in drained.admitted_tiers  # only once nothing lower is left


def test_gpu_power_caps_are_off_unless_asked_for():
    assert all(limit.gpu_cap_w is None for limit in decide(CONFIG, GovernorState(), WORKERS, [], 0.0).workers)
    capped = decide(GovernorConfig(static_cap_w=1600.0, gpu_power_caps=True), GovernorState(), WORKERS, [], 0.0)
    assert [limit.gpu_cap_w for limit in capped.workers] == [400.0] * 4


def test_a_worker_with_less_headroom_leaves_its_unused_share_to_the_others():
    small = WorkerPower(9, idle_w=50.0, max_w=150.0, max_tokens_per_step=1024)
    big = WorkerPower(1, idle_w=100.0, max_w=700.0, max_tokens_per_step=8192)
    decision = decide(GovernorConfig(static_cap_w=1000.0), GovernorState(), [small, big], [], 0.0)
    shares = {limit.worker_id: limit.power_w for limit in decision.workers}
    assert shares == {9: 150.0, 1: 700.0}  # the small one tops out; the rest goes to the big one
    assert sum(shares.values()) <= 1000.0


def test_an_idle_tier_is_admitted_only_while_room_is_left():
    idle = loads(flex=0, default=0, priority=0)
    assert admit_tiers(idle, capacity_tokens=100)[0] == {"flex", "default", "priority"}
    assert admit_tiers(idle, capacity_tokens=0) == (frozenset(), ("flex", "default", "priority"))
    full = admit_tiers(loads(flex=0, default=0, priority=100), capacity_tokens=100)
    assert full == (frozenset({"priority"}), ("flex", "default"))  # nothing left for new work


def utc(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=timezone.utc).timestamp()


def power_config(events: str) -> str:
    return f"tiers: {{default: {{}}}}\npower:\n  static_cap_w: 1000\n  grid_events:\n{events}"


def test_a_daily_event_in_the_config_cuts_the_budget_every_day():
    config = parse_factory_config(power_config(
        "    - {name: peak, start: '14:00', duration_s: 10800, cut_fraction: 0.25, ramp_s: 600}\n"))
    governor = GovernorConfig(static_cap_w=config.power.static_cap_w)
    for day in ("2026-11-21", "2026-11-22"):
        for clock, budget in (("12:00", 1000.0), ("13:55", 1000 * (1 - 0.25 * 5 / 10)), ("15:30", 750.0),
                              ("17:05", 1000 * (1 - 0.25 * 5 / 10)), ("18:00", 1000.0)):
            now = utc(f"{day}T{clock}")
            assert budget_at(governor, scheduled_state(config.power, (), now), now) == pytest.approx(budget)


def test_a_daily_event_across_midnight_holds_on_both_sides():
    config = parse_factory_config(power_config(
        "    - {start: '23:00', duration_s: 7200, cut_fraction: 0.5, ramp_s: 0}\n"))
    governor = GovernorConfig(static_cap_w=1000.0)
    for clock in ("2026-11-21T23:30", "2026-11-22T00:30"):
        now = utc(clock)
        assert budget_at(governor, scheduled_state(config.power, (), now), now) == pytest.approx(500.0)


def test_a_one_off_event_with_short_notice_ramps_from_its_announcement():
    config = parse_factory_config(power_config(
        "    - {start: 2026-11-21T14:00:00Z, duration_s: 3600, cut_fraction: 0.4, ramp_s: 900, notice_s: 300}\n"))
    governor = GovernorConfig(static_cap_w=1000.0)
    budget = lambda clock: budget_at(governor, scheduled_state(config.power, (), utc(clock)), utc(clock))
    assert budget("2026-11-21T13:50") == 1000.0  # before the notice, nothing yet
    assert budget("2026-11-21T13:57:30") == pytest.approx(800.0)  # half way through a 5-minute ramp
    assert budget("2026-11-21T14:30") == pytest.approx(600.0)
    assert budget("2026-11-22T14:30") == 1000.0  # once only


def test_admin_events_add_to_the_scheduled_ones():
    config = parse_factory_config(power_config(
        "    - {start: '14:00', duration_s: 3600, cut_fraction: 0.25, ramp_s: 0}\n"))
    now = utc("2026-11-21T14:30")
    admin = add_event(GovernorState(), GridEvent(now, 600.0, 0.25, ramp_s=0.0), now).events
    state = scheduled_state(config.power, admin, now)
    assert budget_at(GovernorConfig(static_cap_w=1000.0), state, now) == pytest.approx(500.0)


@pytest.mark.parametrize("event, problem", [
    ("{start: 14:00, duration_s: 60, cut_fraction: 0.2}", "quote the time of day"),
    ("{start: 'tomorrow', duration_s: 60, cut_fraction: 0.2}", "neither HH:MM nor an ISO 8601"),
    ("{start: '14:00', duration_s: 60, cut_fraction: 1.5}", "cut_fraction"),
    ("{start: '14:00', duration_s: 86000, cut_fraction: 0.2}", "must fit in a day"),
    ("{start: '14:00', duration_s: 60, cut_fraction: 0.2, cutt: 1}", "cutt"),
])
def test_a_bad_grid_event_in_the_config_says_what_is_wrong(event, problem):
    with pytest.raises(ConfigError, match=problem):
        parse_factory_config(power_config(f"    - {event}\n"))


def test_no_tier_is_refused_for_power_while_the_fleet_at_full_tilt_fits_the_budget():
    """A burst of queued prompts far above the step budgets sheds nothing when power cannot bind."""
    workers = [WorkerPower(i, idle_w=100.0, max_w=700.0, max_tokens_per_step=1024) for i in range(4)]
    loads = [TierLoad("priority", 2, 1e6), TierLoad("default", 1, 1e6), TierLoad("flex", 0, 1e6)]
    decision = decide(GovernorConfig(static_cap_w=2800.0), GovernorState(), workers, loads, now=0.0)
    assert decision.admitted_tiers == {"priority", "default", "flex"} and decision.shed_tiers == ()
    cut = decide(GovernorConfig(static_cap_w=2799.0), GovernorState(), workers, loads, now=0.0)
    assert cut.shed_tiers == ("flex", "default")


PACED = WorkerPower(0, idle_w=400.0, max_w=700.0, max_tokens_per_step=64, rest_w=100.0, pace_tokens=1024,
                    pace_step_s=0.2)


def paced_spans(steps: list[tuple[float, float, bool, float]], pace: Pace) -> list[tuple[float, float, float]]:
    """(start, end, watts) of back-to-back (seconds, watts, protected, idle before) steps, each
    started as soon as its `PaceBucket` allows."""
    bucket, spans, t = PaceBucket(), [], 0.0
    bucket.set(pace, 0.0)
    for seconds, watts, protected, idle in steps:
        start = t + idle
        start += bucket.wait_s(start, protected)
        spans.append((start, start + seconds, watts))
        bucket.spend(start, seconds, watts)
        t = start + seconds
    return spans


def worst_window_w(spans: list[tuple[float, float, float]], rest_w: float, window_s: float) -> float:
    """The highest mean power over any `window_s`, resting at `rest_w` between the spans: for a
    piecewise-constant draw the worst window starts or ends at a corner."""
    def mean(start: float) -> float:
        end = start + window_s
        return rest_w + sum((w - rest_w) * max(0.0, min(b, end) - max(a, start)) for a, b, w in spans) / window_s

    corners = [a for a, _, _ in spans] + [b - window_s for _, b, _ in spans]
    return max(mean(c) for c in corners if 0.0 <= c <= spans[-1][1] - window_s)


def test_a_paced_worker_stays_under_its_share_in_every_one_second_window():
    share = 550.0
    config = GovernorConfig(static_cap_w=share, pacing=True, pace_burst_s=0.3)
    pace = pace_power(PACED, share, config, protect_priority=10)
    assert pace is not None and PACED.rest_w < pace.pace_w < share
    assert pace.capacity_j == pytest.approx((share - pace.pace_w) * config.window_s)
    rng = random.Random(0)
    # Steps up to the longest the worker model allows (0.2 s at full power, longer at less), some
    # with protected prompt work, some after an idle spell (the bucket fills).
    lengths = [rng.uniform(0.01, 0.2) for _ in range(600)]
    steps = [(s, 700.0) if rng.random() < 0.6 else (s * 1.2, 600.0) for s in lengths]
    steps = [(s, w, rng.random() < 0.3, rng.choice([0.0] * 8 + [0.5, 2.0])) for s, w in steps]
    assert worst_window_w(paced_spans(steps, pace), PACED.rest_w, 1.0) <= share + 1e-6
    # Resting after each step until it averages the share holds only on average: some 1 s window goes over.
    at_share = Pace(share, PACED.rest_w, capacity_j=0.0, step_j=0.0)
    assert worst_window_w(paced_spans(steps, at_share), PACED.rest_w, 1.0) > share + 5.0


def test_the_protected_tiers_prompt_runs_its_chunks_back_to_back_from_a_full_bucket():
    share = 550.0
    pace = pace_power(PACED, share, GovernorConfig(static_cap_w=share, pace_burst_s=0.3), protect_priority=10)
    assert pace is not None
    bucket = PaceBucket()
    bucket.set(pace, 0.0)
    assert bucket.wait_s(0.0, protected=True) > 0  # a newly paced worker starts with no credit
    now = 10.0  # idle long enough to fill the bucket
    assert bucket.wait_s(now, protected=False) == 0.0
    # Five 0.1 s chunks at full power (0.5 s, over the 0.3 s burst plus a step) start back to back
    # while the credit lasts, then the rest wait for it.
    waits = []
    for _ in range(5):
        waits.append(bucket.wait_s(now, protected=True))
        now += waits[-1]
        bucket.spend(now, 0.1, 700.0)
        now += 0.1
    assert waits[:3] == [0.0, 0.0, 0.0] and waits[-1] > 0
    assert bucket.credit_j >= -1e-9
    # A lower tier's step waits until the bucket is full again; an unpaced worker never waits.
    assert bucket.wait_s(now, protected=False) == pytest.approx((pace.capacity_j - bucket.credit_j)
                                                                / (pace.pace_w - pace.rest_w))
    bucket.set(None, now)
    assert bucket.wait_s(now, protected=False) == 0.0
    # At full power there is no pace; a deep cut keeps the floor and a smaller bucket.
    assert pace_power(PACED, 700.0, GovernorConfig(static_cap_w=700.0)) is None
    deep = pace_power(PACED, 160.0, GovernorConfig(static_cap_w=160.0))
    assert deep is not None and deep.pace_w == pytest.approx(100.0 + 0.05 * 600.0)
    assert deep.capacity_j == pytest.approx(160.0 - deep.pace_w) and deep.step_j <= deep.capacity_j


def test_pacing_keeps_whole_steps_and_leaves_more_capacity_than_small_steps():
    state = GovernorState(events=(GridEvent(0.0, HOUR, cut_fraction=0.25, ramp_s=0.0),))
    workers = [PACED, WorkerPower(1, 400.0, 700.0, 64, 100.0, 1024, 0.2)]
    demand = loads(flex=30, default=40, priority=20)
    small = decide(GovernorConfig(static_cap_w=1400.0, pacing=False), state, workers, demand, now=10.0)
    paced = decide(GovernorConfig(static_cap_w=1400.0, pacing=True, pace_burst_s=0.0), state, workers, demand,
                   now=10.0)
    assert [limit.token_budget for limit in paced.workers] == [1024, 1024]
    assert all(limit.pace_w is not None and limit.pace_w < limit.power_w for limit in paced.workers)
    assert all(limit.pace_w is None for limit in small.workers)
    assert [limit.token_budget for limit in small.workers] == [26, 26]  # (525 - 400) / 300 x 64
    # Resting at 100 W instead of stepping at 400 W leaves room for more tokens: fewer tiers shed.
    assert len(paced.shed_tiers) < len(small.shed_tiers)
    uncut = decide(GovernorConfig(static_cap_w=1400.0, pacing=True), GovernorState(), workers, demand, now=10.0)
    assert all(limit.pace_w is None for limit in uncut.workers)  # full power: no rests
    # Pacing is the governor's default lever (it needs no permission); NVML caps are not.
    assert GovernorConfig(static_cap_w=1.0).pacing and PowerSpec().pacing
    assert not GovernorConfig(static_cap_w=1.0).gpu_power_caps
