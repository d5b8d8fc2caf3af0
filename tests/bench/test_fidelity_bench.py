"""`bench fidelity`: the workload, the live replay, and the whole comparison on tiny sizes."""

from __future__ import annotations

import dataclasses
import json
import math
import multiprocessing

import pytest

from tokenfactory.bench.fidelity_bench import (
    DRAWS,
    Comparison,
    ReplayClock,
    RoundMachine,
    at_utilisation,
    fidelity_workload,
    live_prompt,
    merge_profiles,
    pooled,
    replay_live,
    round_machines,
    run_fidelity,
    sweep_levels,
)
from tokenfactory.cli import main as cli_main
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.twin.cost_model import shape_of
from tokenfactory.twin.metrics import RequestRecord, summarize
from tokenfactory.twin.profile import FEATURES, Profile, ProfilePoint, Slowdown, StepTimeFit, build_runner
from tokenfactory.twin.workloads import LengthDistribution, TraceRequest, prompt_token_ids

PROMPTS = LengthDistribution(48, 0.8, maximum=160)
OUTPUTS = LengthDistribution(8, 0.5, maximum=24)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def test_the_workload_mixes_unique_and_shared_prompts():
    workload = fidelity_workload(400, 5.0, PROMPTS, OUTPUTS, shared_fraction=0.5, num_groups=2, seed=1)
    assert workload == fidelity_workload(400, 5.0, PROMPTS, OUTPUTS, shared_fraction=0.5, num_groups=2, seed=1)
    arrivals = [r.arrival_time for r in workload]
    assert arrivals == sorted(arrivals) and arrivals[0] == 0.0
    assert 1 / 5.0 * 0.85 < arrivals[-1] / (len(arrivals) - 1) < 1 / 5.0 * 1.15
    shared = [r for r in workload if r.hash_ids]
    assert 0.4 < len(shared) / len(workload) < 0.6
    assert {r.hash_ids for r in shared} == {(400,), (401,)}
    assert all(1 <= r.input_length <= 160 and 1 <= r.output_length <= 24 for r in workload)
    with pytest.raises(ValueError):
        fidelity_workload(10, 0.0, PROMPTS, OUTPUTS)


def test_live_prompts_share_exactly_what_the_twins_share():
    workload = fidelity_workload(30, 5.0, PROMPTS, OUTPUTS, seed=2)
    for a in workload:
        for b in workload:
            if a is not b:
                twin = common_prefix(prompt_token_ids(a), prompt_token_ids(b))
                live = common_prefix(live_prompt(a, 4096), live_prompt(b, 4096))
                assert live == twin
    assert all(max(live_prompt(r, 4096)) < 4096 for r in workload)
    with pytest.raises(ValueError, match="below the vocabulary"):
        live_prompt(TraceRequest(0.0, 10, 2, uid=5000), 4096)


def test_the_cpu_replay_clock_jumps_over_idle_time():
    clock = ReplayClock("cpu")
    clock.wait_until(3.0)
    assert 3.0 <= clock.now() < 3.5
    with pytest.raises(KeyError):
        ReplayClock("sundial")


@pytest.fixture(scope="module")
def tiny_config(tiny_model_dir) -> EngineConfig:
    return EngineConfig.from_pretrained(tiny_model_dir, cache=CacheConfig(num_blocks=256),
                                        scheduler=SchedulerConfig(max_num_batched_tokens=64, max_num_seqs=8))


def test_the_live_replay_waits_for_arrivals_and_records_every_token(tiny_config):
    runner = build_runner(tiny_config, threads=1)
    workload = [TraceRequest(0.0, 20, 3, uid=0), TraceRequest(0.5, 30, 4, uid=1)]
    run = replay_live(EngineCore(tiny_config, runner), runner, workload, clock="wall")
    first, second = run.records
    assert 0.0 < first.first_token <= first.finish < 0.5  # served while the second is not there yet
    assert second.first_token > 0.5 and len(run.wake_late_s) == 1
    assert run.arrived_idle == {0, 1}
    assert [r.num_output_tokens for r in run.records] == [3, 4]
    assert len(run.shapes) == len(run.step_s) == 2 + 2 + 3  # two prefills, then one decode per token
    assert run.shapes[0].num_tokens == 20 and run.shapes[-1].num_tokens == 1


def test_requests_arriving_behind_work_are_told_from_those_finding_the_engine_idle(tiny_config):
    runner = build_runner(tiny_config, threads=1)
    # The second arrives a millisecond in, while the first's prefill runs; the third long after.
    workload = [TraceRequest(0.0, 40, 2, uid=0), TraceRequest(1e-3, 30, 2, uid=1), TraceRequest(5.0, 20, 2, uid=2)]
    run = replay_live(EngineCore(tiny_config, runner), runner, workload, clock="cpu")
    assert run.arrived_idle == {0, 2}
    assert run.records[1].first_token > run.records[0].first_token


def test_fidelity_with_a_given_profile_compares_both_sides(tiny_config, tiny_model_dir):
    per_token = 2 * 4 * 4 * 32 * 4
    profile = Profile(
        points=[], fit=StepTimeFit((0.004, 1e-4, 2e-7, 1e-6, 0.0, 5e-4, 5e-4, 3e-4, 2e-6, 1e-4, 2e-4)),
        model=json.loads((tiny_model_dir / "config.json").read_text()),
        engine={"dtype": "float32", "clock": "cpu", "kv_cache_bytes": 256 * 16 * per_token},
        slowdown=Slowdown((0.004, 0.012)),
    )
    workload = fidelity_workload(12, 40.0, PROMPTS, OUTPUTS, seed=3)
    result = run_fidelity(tiny_config, workload, grid=None, profile=profile, clock="cpu", rounds=2)
    # Two rounds pooled on each side, each live round matched by DRAWS twin runs.
    assert result.live.num_finished == result.twin.num_finished / DRAWS == 24
    assert result.live.output_tokens == result.twin.output_tokens / DRAWS == 2 * sum(r.output_length for r in workload)
    assert [r.num_finished for r in result.live_rounds] == [12, 12]
    assert result.live.duration_s == pytest.approx(sum(r.duration_s for r in result.live_rounds))
    assert [c.name.split(" (")[0] for c in result.comparisons] == [
        "throughput", "TTFT p50", "TTFT p90", "inter-token latency p50", "inter-token latency p90"]
    assert all(r.first_token >= r.arrival for r in result.run.records)
    assert result.slowdown_by_second(min_steps=1) and all(x > 0 for x in result.slowdown_by_second(min_steps=1))
    assert result.step_model_error_where(lambda shape: True) == result.step_model_error
    assert math.isnan(result.step_model_error_where(lambda shape: False))  # no such steps
    ratios = result.ttft_ratios(arrived_idle=True) + result.ttft_ratios(arrived_idle=False)
    assert len(ratios) == 24 and all(r > 0 for r in ratios)
    # Each live round gets DRAWS twin runs, each walking the series from its own point.
    assert len(result.twin_rounds) == 2 * DRAWS and len({s.ttft.p90 for s in result.twin_rounds}) > 1
    # The same twin with every step at its mean price, beside it: same tokens, other latencies.
    assert result.at_mean is not None and len(result.at_mean) == len(result.twin_rounds)
    assert [s.output_tokens for s in result.at_mean] == [s.output_tokens for s in result.twin_rounds]
    assert result.at_mean[0].ttft != result.twin_rounds[0].ttft
    # Each metric is its median over the rounds (of two: their mean) on either side.
    ttft = [1000 * s.ttft.p50 for s in result.live_rounds]
    assert result.comparisons[1].live == pytest.approx(sum(ttft) / 2)
    with pytest.raises(ValueError, match="clock"):
        run_fidelity(tiny_config, workload, grid=None, profile=profile, clock="wall")


def test_two_sweeps_merge_into_one_profile_with_both_slowdown_series():
    shapes = [shape_of([(n, 0)]) for n in (4, 16, 64, 128, 256, 512)] + [shape_of([(1, 64)] * b) for b in (1, 4, 16, 32)]
    shapes.append(dataclasses.replace(shapes[-1], num_first_decodes=1))

    def sweep(seconds: float, slowdown: Slowdown | None) -> Profile:
        points = [ProfilePoint("prefill" if s.num_prefill_chunks else "decode", s, seconds, (seconds,))
                  for s in shapes]
        return Profile(points, StepTimeFit((seconds,) + (0,) * (len(FEATURES) - 1)), {}, {}, slowdown=slowdown)

    merged = merge_profiles([sweep(0.01, Slowdown((1.0, 2.0))), sweep(0.03, Slowdown((3.0,)))])
    assert [p.samples for p in merged.points] == [(0.01, 0.03)] * len(shapes)
    assert merged.fit.predict(shapes[0]) == pytest.approx(0.02)
    assert merged.slowdown == Slowdown((1.0, 2.0, 3.0))
    assert merge_profiles([sweep(0.01, None), sweep(0.03, None)]).slowdown is None


def test_each_round_gets_the_speed_and_slowdown_of_the_sweeps_either_side():
    shapes = [shape_of([(n, 0)]) for n in (4, 16, 64, 128, 256, 512)] + [shape_of([(1, 64)] * b) for b in (1, 4, 16, 32)]
    shapes.append(dataclasses.replace(shapes[-1], num_first_decodes=1))

    def sweep(seconds: float, slowdown: Slowdown) -> Profile:
        points = [ProfilePoint("prefill" if s.num_prefill_chunks else "decode", s, seconds * (i + 1),
                               (seconds * (i + 1),)) for i, s in enumerate(shapes)]
        return Profile(points, StepTimeFit((seconds,) + (0,) * (len(FEATURES) - 1)), {}, {}, slowdown=slowdown)

    # The machine ran at 1, 2, then 4 times the speed of its first sweep.
    sweeps = [sweep(0.04, Slowdown((1.0,))), sweep(0.02, Slowdown((2.0,))), sweep(0.01, Slowdown((3.0, 4.0)))]
    merged = merge_profiles(sweeps)
    levels = sweep_levels(sweeps, merged)
    assert levels == pytest.approx([2.0, 1.0, 0.5])  # against their geometric middle
    machines = round_machines(merged, sweeps, rounds=2)
    assert [m.scale for m in machines] == pytest.approx([2 ** 0.5, 0.5 ** 0.5])
    assert [m.slowdown for m in machines] == [Slowdown((1.0, 2.0)), Slowdown((2.0, 3.0, 4.0))]
    # A profile file has no sweeps: every round gets its own series, at its own speed.
    assert round_machines(merged, [], rounds=3) == [RoundMachine(1.0, merged.slowdown)] * 3


def test_rounds_pool_into_one_run_one_after_the_other():
    def record(arrival: float, first: float, finish: float, tokens: int) -> RequestRecord:
        return RequestRecord(arrival, 10, first, finish, finish, tokens)

    first = [record(0.0, 0.1, 1.0, 5), record(0.5, 0.7, 2.0, 5)]
    second = [record(0.0, 0.3, 4.0, 10), record(1.0, 1.1, 1.5, 2)]
    both = pooled([first, second])
    assert [r.arrival for r in both] == [0.0, 0.5, 2.0, 3.0]  # the second round starts where the first ended
    assert [r.ttft for r in both] == pytest.approx([0.1, 0.2, 0.3, 0.1])
    summary = summarize(both, num_rejected=0, num_gpus=1, energy_j=0.0, price_per_gpu_hour=0.0)
    assert summary.duration_s == pytest.approx(2.0 + 4.0)
    assert summary.output_tokens_per_s == pytest.approx(22 / 6.0)
    unfinished = pooled([[RequestRecord(0.0, 10)], first])
    assert unfinished[0].first_token == -1.0 and unfinished[1].arrival == 0.0


def test_a_comparison_passes_within_ten_percent():
    assert Comparison("x", 100.0, 109.0).passed and not Comparison("x", 100.0, 89.0).passed
    assert Comparison("x", 100.0, 89.0).error == pytest.approx(-0.11)


def test_bench_fidelity_runs_end_to_end(tiny_model_dir, tmp_path, capsys):
    args = ["bench", "fidelity", "--model", str(tiny_model_dir), "--quick", "--requests", "10", "--rounds", "2",
            "--input-mean", "32", "--output-mean", "6", "--num-blocks", "256", "--clock", "cpu",
            "--plots", str(tmp_path / "plots")]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    for text in ("TTFT p90", "inter-token latency p50", "twin busy", "fitted model prices them", "fidelity goal",
                 "every step at its round's mean price", "the live engine against itself",
                 "the machine's speed"):
        assert text in out
    assert "PASS" in out or "MISS" in out
    plot = tmp_path / "plots" / "fidelity.png"
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 20_000


def test_bench_fidelity_refuses_a_bad_profile(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "profile.json"
    bad.write_text(json.dumps({"format": "something else"}))
    assert cli_main(["bench", "fidelity", "--model", str(tiny_model_dir), "--profile", str(bad)]) == 2
    assert "cannot use the profile" in capsys.readouterr().out


def test_arrivals_are_spread_to_the_asked_utilisation():
    workload = fidelity_workload(50, 1.0, PROMPTS, OUTPUTS, seed=4)
    work = 20.0  # seconds of engine time the workload needs, whatever its arrival times

    def busy(w: list[TraceRequest]) -> float:
        return min(1.0, work / (w[-1].arrival_time + 1.0))

    spread = at_utilisation(workload, 0.5, busy)
    assert busy(spread) == pytest.approx(0.5, rel=0.03)
    assert [r.input_length for r in spread] == [r.input_length for r in workload]
    with pytest.raises(ValueError, match="utilisation"):
        at_utilisation(workload, 1.5, busy)
