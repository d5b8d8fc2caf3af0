import math

import pytest

from tokenfactory.control.governor import PACE_BURST_S, GovernorConfig, GridEvent
from tokenfactory.control.router import make_router
from tokenfactory.control.tiers import builtin_config
from tokenfactory.engine.config import SchedulerConfig
from tokenfactory.twin.clocks import CLOCK_LEVELS, ActivityPower, ClockedCostModel, WorkerLoad, decode_shape, pick_clock
from tokenfactory.twin.cost_model import CostModel, default_model, shape_of
from tokenfactory.twin.hardware import get_hardware
from tokenfactory.twin.power_sim import ClockPolicy, PowerSimulator, assign_tiers, worker_power
from tokenfactory.twin.simulator import TwinConfig
from tokenfactory.twin.workloads import LengthDistribution, poisson_workload

BASE = CostModel(default_model(), get_hardware("h100"))
COST = ClockedCostModel(BASE)
SHAPES = [shape_of([(1, 0)]), shape_of([(512, 0)]), shape_of([(4096, 2000)]), decode_shape(64, 3000),
          decode_shape(8, 100, 256)]


@pytest.mark.parametrize("shape", SHAPES)
def test_full_clock_keeps_the_roofline_step_time(shape):
    assert COST.step(shape).duration_s == pytest.approx(BASE.step(shape).duration_s, rel=1e-12)


@pytest.mark.parametrize("shape", SHAPES)
def test_power_lies_between_idle_and_tdp_and_falls_with_the_clock(shape):
    hw = BASE.hardware
    powers = [COST.at(f).step(shape).power_w for f in CLOCK_LEVELS]
    assert all(hw.idle_w <= p <= hw.tdp_w + 1e-9 for p in powers)
    assert powers == sorted(powers)


def test_compute_bound_steps_slow_with_the_clock_memory_bound_ones_do_not():
    prefill, decode = shape_of([(8192, 0)]), decode_shape(16, 1000)
    assert COST.step(prefill).power_w == pytest.approx(BASE.hardware.tdp_w)
    assert COST.at(0.5).step(prefill).duration_s == pytest.approx(2 * COST.step(prefill).duration_s, rel=0.05)
    assert COST.at(0.5).step(decode).duration_s == pytest.approx(COST.step(decode).duration_s)
    assert COST.at(0.5).step(decode).energy_j < 0.95 * COST.step(decode).energy_j
    # Below the memory knee the memory roof slows too.
    low = ClockedCostModel(BASE, 0.25, ActivityPower(memory_knee=0.5))
    assert low.step(decode).duration_s > 1.5 * COST.step(decode).duration_s
    with pytest.raises(ValueError):
        COST.at(0.0)


def test_pick_clock_takes_the_lowest_level_that_keeps_the_slo():
    light = WorkerLoad(num_running=4, mean_context=500, queued_prefill_tokens=0)
    assert pick_clock(COST, light, itl_s=0.1, ttft_s=2.0, chunk_tokens=8192) == min(CLOCK_LEVELS)
    backlog = WorkerLoad(num_running=64, mean_context=2000, queued_prefill_tokens=60_000)
    assert pick_clock(COST, backlog, itl_s=0.1, ttft_s=2.0, chunk_tokens=8192) == max(CLOCK_LEVELS)
    for running, queued in [(32, 2000), (128, 5000), (200, 20_000), (8, 300)]:
        load = WorkerLoad(running, mean_context=1500, queued_prefill_tokens=queued)
        picked = pick_clock(COST, load, itl_s=0.1, ttft_s=2.0, chunk_tokens=512)

        def keeps(f: float) -> bool:
            step = COST.at(f).step(decode_shape(running, 1500, min(512, queued))).duration_s
            return step <= 0.05 and step * queued / min(512, queued) <= 1.0

        assert keeps(picked) or picked == max(CLOCK_LEVELS)
        assert not any(keeps(f) for f in CLOCK_LEVELS if f < picked)


def test_the_governors_linear_model_never_under_predicts_a_short_context_step():
    power = worker_power(COST, 8192)
    assert power.idle_w == pytest.approx(COST.step(shape_of([(1, 0)])).power_w)
    assert power.max_w == pytest.approx(BASE.hardware.tdp_w)
    for tokens in range(1, 8193, 7):
        linear = power.idle_w + (power.max_w - power.idle_w) * min(1.0, tokens / power.max_tokens_per_step)
        assert COST.step(shape_of([(tokens, 0)])).power_w <= linear + 1e-6


def test_tiers_are_assigned_by_seed_and_fraction():
    tiers = assign_tiers(10_000, {"flex": 0.3, "default": 0.5, "priority": 0.2}, seed=3)
    assert tiers == assign_tiers(10_000, {"flex": 0.3, "default": 0.5, "priority": 0.2}, seed=3)
    assert tiers != assign_tiers(10_000, {"flex": 0.3, "default": 0.5, "priority": 0.2}, seed=4)
    assert tiers.count("priority") / len(tiers) == pytest.approx(0.2, abs=0.02)
    with pytest.raises(ValueError):
        assign_tiers(3, {"flex": 0.0})


def busy(num_requests: int = 300):
    # About half of what 2 workers can prefill at full power: far more than a 40% cut leaves.
    return poisson_workload(20.0, num_requests, LengthDistribution(1500, 0.5), LengthDistribution(60, 0.5), seed=1)


def power_sim(events=(), clocks=None, use_governor=True, workload=None, num_workers=2, gpu_caps=False, pacing=False,
              pace_burst_s=PACE_BURST_S):
    workload = workload or busy()
    config = TwinConfig(COST, num_workers=num_workers,
                        scheduler=SchedulerConfig(max_num_batched_tokens=8192, max_num_seqs=256))
    tiers = assign_tiers(len(workload), {"flex": 0.3, "default": 0.5, "priority": 0.2}, seed=0)
    cap = num_workers * worker_power(COST, 8192).max_w
    sim = PowerSimulator(config, make_router("kv"), builtin_config(), GovernorConfig(cap, gpu_power_caps=gpu_caps, pacing=pacing, pace_burst_s=pace_burst_s), events, tiers,
                         clocks=clocks, use_governor=use_governor)
    return sim, sim.run_power(workload), tiers


def test_a_grid_cut_keeps_power_under_the_budget_and_sheds_the_lowest_tiers_first():
    event = GridEvent(start_s=4.0, duration_s=6.0, cut_fraction=0.4, ramp_s=1.0)
    sim, run, tiers = power_sim((event,))
    _, base, _ = power_sim()
    assert run.max_power_over_budget(event.start_s, event.start_s + event.duration_s) <= 1.0 + 1e-9
    # Without the cut the same load draws more than the cut budget in that window.
    assert max(s.power_w for s in base.samples if event.start_s <= s.at < 10.0) > 0.6 * sim.governor.static_cap_w
    assert run.tiers["flex"].shed > base.tiers["flex"].shed
    assert run.tiers["priority"].shed == 0
    assert run.tiers["priority"].output_tokens == base.tiers["priority"].output_tokens
    # What was not shed was served in full.
    for i, record in enumerate(run.result.records):
        if str(i) not in sim.shed_ids:
            assert record.finish >= 0
    served = sum(t.output_tokens for t in run.tiers.values())
    assert served == run.output_tokens == run.result.summary.output_tokens
    assert sum(t.requests for t in run.tiers.values()) == len(tiers)
    assert run.tiers["flex"].revenue_usd < base.tiers["flex"].revenue_usd
    assert all(s.budget_w == pytest.approx(0.6 * sim.governor.static_cap_w)
               for s in run.samples if event.start_s <= s.at < 9.0)


def test_gpu_caps_hold_the_budget_with_full_size_steps():
    event = GridEvent(start_s=4.0, duration_s=6.0, cut_fraction=0.4, ramp_s=1.0)
    sim, capped, _ = power_sim((event,), gpu_caps=True)
    _, budgets, _ = power_sim((event,))
    assert capped.max_power_over_budget(event.start_s, event.start_s + event.duration_s) <= 1.0 + 1e-9
    assert all(w.scheduler.token_budget == 8192 for w in sim.workers)
    assert capped.tiers["priority"].shed == 0
    assert capped.tiers["priority"].slo_attainment >= budgets.tiers["priority"].slo_attainment


def test_a_power_cap_lowers_the_clock_until_the_step_fits():
    prefill = shape_of([(4096, 0)])
    capped = COST.capped(450.0)
    assert capped.step(prefill).power_w <= 450.0
    assert capped.step(prefill).power_w == pytest.approx(450.0, rel=0.01)
    assert capped.step(prefill).duration_s > COST.step(prefill).duration_s
    assert COST.capped(900.0).step(prefill) == COST.step(prefill)
    # Below what the lowest clock draws, the step runs at the lowest clock.
    assert COST.capped(80.0).step(prefill) == COST.at(0.3).step(prefill)


def test_tier_priority_reaches_the_scheduler():
    # Prompts at about 60% of what 2 H100 workers prefill: short queues, which priority orders.
    workload = poisson_workload(25.0, 300, LengthDistribution(1500, 0.5), LengthDistribution(60, 0.5), seed=1)
    _, run, tiers = power_sim(use_governor=False, workload=workload)
    ttft = {name: sorted(r.ttft for r, t in zip(run.result.records, tiers) if t == name and r.finish >= 0)
            for name in ("flex", "priority")}
    assert ttft["priority"][len(ttft["priority"]) // 2] < ttft["flex"][len(ttft["flex"]) // 2]
    assert run.tiers["priority"].slo_attainment > run.tiers["flex"].slo_attainment or \
        run.tiers["priority"].slo_attainment == 1.0


def test_energy_aware_clocks_save_energy_at_light_load():
    light = poisson_workload(4.0, 80, LengthDistribution(600, 0.5), LengthDistribution(100, 0.5), seed=2)
    policy = ClockPolicy(itl_s=0.1, ttft_s=2.0, levels=CLOCK_LEVELS)
    _, top, _ = power_sim(workload=light, use_governor=False)
    _, aware, _ = power_sim(workload=light, use_governor=False, clocks=policy)
    assert aware.joules_per_token < top.joules_per_token
    assert aware.output_tokens == top.output_tokens
    assert min(c for c, t in aware.clock_seconds.items() if t > 0) < 1.0
    assert math.isclose(sum(aware.clock_seconds.values()), 2 * aware.result.summary.duration_s, rel_tol=0.05)
    assert aware.result.summary.slo_attainment >= top.result.summary.slo_attainment - 0.01


def test_bad_inputs_are_refused():
    config = TwinConfig(BASE, num_workers=1)
    with pytest.raises(TypeError):
        PowerSimulator(config, None, builtin_config(), GovernorConfig(1000.0))
    with pytest.raises(ValueError, match="not in the factory config"):
        PowerSimulator(TwinConfig(COST, num_workers=1), None, builtin_config(), GovernorConfig(1000.0),
                       tier_of=["gold"])


def test_pacing_holds_the_budget_at_every_sample_with_whole_steps_and_idle_rests():
    event = GridEvent(start_s=4.0, duration_s=6.0, cut_fraction=0.4, ramp_s=1.0)
    sim, paced, _ = power_sim((event,), pacing=True)
    _, budgets, _ = power_sim((event,))
    assert paced.max_power_over_budget(event.start_s, event.start_s + event.duration_s) <= 1.0 + 1e-9
    pace_tokens = sim.powers[0].pace_tokens
    assert pace_tokens is not None and pace_tokens > 2 * sim.powers[0].max_tokens_per_step
    assert paced.tiers["priority"].shed == 0
    assert paced.tiers["priority"].slo_attainment >= budgets.tiers["priority"].slo_attainment


def test_paced_workers_keep_credit_for_priority_prompts_and_still_hold_every_sample():
    event = GridEvent(start_s=4.0, duration_s=6.0, cut_fraction=0.4, ramp_s=1.0)
    _, flat, tiers = power_sim((event,), pacing=True, pace_burst_s=0.0)
    _, burst, _ = power_sim((event,), pacing=True)
    for run in (flat, burst):
        assert run.max_power_over_budget(event.start_s, event.start_s + event.duration_s) <= 1.0 + 1e-9

    def priority_ttfts(run):
        return [r.ttft for r, tier in zip(run.result.records, tiers)
                if tier == "priority" and r.finish >= 0 and event.start_s <= r.arrival < event.end_s]

    # With credit kept for them, priority prompts run their chunks back to back: they start sooner.
    assert len(priority_ttfts(burst)) == len(priority_ttfts(flat)) > 10
    assert max(priority_ttfts(burst)) < 0.85 * max(priority_ttfts(flat))
    assert sum(priority_ttfts(burst)) < 0.85 * sum(priority_ttfts(flat))
    # The lower tiers pay: they run at a lower pace.
    assert burst.tiers["flex"].output_tokens <= flat.tiers["flex"].output_tokens
