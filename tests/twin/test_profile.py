"""`twin profile`: the step-time fit, a real profile of the tiny engine, and the twin running on it."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from tokenfactory.cli import main as cli_main
from tokenfactory.control.router import RoundRobinRouter
from tokenfactory.engine.config import CacheConfig, EngineConfig, ModelConfig
from tokenfactory.twin.cost_model import BatchShape, StepCost, shape_of
from tokenfactory.twin.hardware import HARDWARE
from tokenfactory.twin.profile import (
    DECODE_SETTLE,
    FEATURES,
    Profile,
    QUICK_GRID,
    ProfiledCostModel,
    ProfileGrid,
    Slowdown,
    StepTimeFit,
    describe,
    features,
    fit_step_time,
    profile_engine,
)
from tokenfactory.twin.simulator import Simulator, TwinConfig
from tokenfactory.twin.workloads import TraceRequest

TRUE = (0.004, 2e-4, 3e-7, 5e-6, 8e-4, 1e-3, 6e-4, 7e-4, 2.5e-6, 1.5e-4, 4e-4)
"""Seconds per step, token, attention pair, KV token read, sampled row, prefill chunk, per step
of more than one token, per step with decode rows, per token a prefill chunk gathers from the
cache, per chunk after a cached prefix, and per step with a row's first decode."""


def prefill_after(n: int, cached: int) -> BatchShape:
    """`n` prompt tokens after `cached` ones, as the runner runs it (gathering whole 16-token blocks)."""
    gathered = -(-(n + cached) // 16) * 16 if cached else 0
    return dataclasses.replace(shape_of([(n, cached)]), prefill_gathered_tokens=gathered,
                               num_prefill_gathers=int(cached > 0))


def grid_shapes() -> list[BatchShape]:
    prefills = [prefill_after(n, s) for n in (4, 16, 64, 256, 512) for s in (0, 32, 512)]
    decodes = [shape_of([(1, c)] * b) for b in (1, 4, 16, 48) for c in (64, 512)]
    mixed = [shape_of([(1, 256)] * b + [(n, 0)]) for b, n in ((4, 64), (16, 256))]
    joined = [dataclasses.replace(shape, num_first_decodes=1) for shape in (decodes[2], mixed[0])]
    return prefills + decodes + mixed + joined


def exact(shape: BatchShape, coefficients=TRUE) -> float:
    return sum(c * x for c, x in zip(coefficients, features(shape)))


def test_the_fit_recovers_known_coefficients_from_exact_timings():
    fit = fit_step_time([(s, exact(s)) for s in grid_shapes()])
    assert fit.coefficients == pytest.approx(TRUE, rel=1e-6)
    assert fit.rms_relative_error < 1e-9
    # The first-decode term is measured on top of the rest, which the points with one do not move.
    plain = fit_step_time([(s, exact(s)) for s in grid_shapes() if not s.num_first_decodes])
    assert plain.coefficients[:-1] == fit.coefficients[:-1] and plain.coefficients[-1] == 0
    slow = fit_step_time([(s, exact(s) * (1.5 if s.num_first_decodes else 1)) for s in grid_shapes()])
    assert slow.coefficients[:-1] == fit.coefficients[:-1] and slow.coefficients[-1] > fit.coefficients[-1]


def test_the_fit_stays_close_under_noise():
    rng = random.Random(0)
    shapes = grid_shapes()
    fit = fit_step_time([(s, exact(s) * rng.uniform(0.97, 1.03)) for s in shapes])
    for shape in shapes:
        assert fit.predict(shape) == pytest.approx(exact(shape), rel=0.05)
    assert 0.005 < fit.rms_relative_error < 0.03


def test_the_fit_never_returns_a_negative_coefficient():
    # Timings that fall with attention pairs: plain least squares would give that a negative cost.
    shapes = grid_shapes()
    samples = [(s, max(1e-3, exact(s, (0.01, 3e-4, 0, 0, 0, 0, 0, 0)) - 1e-8 * s.attention_pairs)) for s in shapes]
    fit = fit_step_time(samples)
    assert all(c >= 0 for c in fit.coefficients)
    assert fit.coefficients[FEATURES.index("attention_pair")] == 0


def test_the_fit_refuses_too_few_or_non_positive_samples():
    shape = shape_of([(1, 10)])
    with pytest.raises(ValueError, match=f"at least {len(FEATURES) - 1} samples"):  # all but the switch term
        fit_step_time([(shape, 0.01)] * (len(FEATURES) - 2))
    with pytest.raises(ValueError, match="positive"):
        fit_step_time([(shape, 0.01)] * (len(FEATURES) - 1) + [(shape, 0.0)])


SMALL_GRID = ProfileGrid(prefill_lengths=(4, 16), prefill_contexts=(0, 16, 48), decode_batches=(1, 3),
                         decode_contexts=(8, 24), mixed=((2, 8),), joins=(2,), warmup=0, repeats=2,
                         slowdown_steps=20, decode_settle_s=0.0)


@pytest.fixture(scope="module")
def tiny_profile(tiny_model_dir) -> Profile:
    config = EngineConfig.from_pretrained(tiny_model_dir, cache=CacheConfig(num_blocks=64))
    return profile_engine(config, SMALL_GRID, threads=1)


def test_a_profile_steps_the_engine_through_the_grid_shapes(tiny_profile):
    shapes = {(p.kind, p.shape) for p in tiny_profile.points}
    assert len(tiny_profile.points) == SMALL_GRID.num_points
    assert ("prefill", prefill_after(16, 16)) in shapes  # 16 new tokens after 16 cached ones (two blocks gathered)
    assert ("prefill", shape_of([(4, 0)])) in shapes
    decode_rows = sorted(p.shape.num_tokens for p in tiny_profile.points if p.kind == "decode")
    assert decode_rows == [1, 1, 3, 3]
    for point in tiny_profile.points:
        if point.kind == "decode":  # one token per row, every row samples
            assert point.shape.num_sampled == point.shape.num_tokens
    # Three rows decoding at contexts spread evenly up to 8 (their prompts fit one setup step),
    # timed after the settling steps, each a token longer; the runner pads each to one 16-token
    # block (no block is shared: each row has a prompt of its own).
    settled = DECODE_SETTLE
    rows = shape_of([(1, 3 + settled), (1, 5 + settled), (1, 8 + settled)])
    padding = 3 * 16 - rows.kv_read_tokens
    assert ("decode", dataclasses.replace(rows, decode_extra_pairs=padding, decode_extra_reads=padding)) in shapes
    (mixed,) = [p for p in tiny_profile.points if p.kind == "mixed"]
    assert (mixed.shape.num_tokens, mixed.shape.num_sampled, mixed.shape.num_prefill_chunks) == (2 + 8, 3, 1)
    assert all(p.shape.num_prefill_chunks == (p.kind in ("prefill", "mixed")) for p in tiny_profile.points)
    # A prompt joins two settled rows: its first decode beside theirs, the only point with one.
    (join,) = [p for p in tiny_profile.points if p.shape.num_first_decodes]
    assert join.kind == "join" and (join.shape.num_tokens, join.shape.num_first_decodes) == (3, 1)
    assert all(p.seconds > 0 and len(p.samples) == 2 for p in tiny_profile.points)
    # The reference steps, timed back to back: twenty of them, their factors 1 on average.
    assert tiny_profile.slowdown is not None and len(tiny_profile.slowdown.seconds) == 20
    assert sum(tiny_profile.slowdown.factors) == pytest.approx(20)


def test_the_description_names_each_coefficient_by_its_feature(tiny_profile):
    text = describe(tiny_profile)
    coefficients = dict(zip(FEATURES, tiny_profile.fit.coefficients))
    assert f"{coefficients['prefill_gather_token']:.3g} s/token a prefill chunk gathers" in text
    assert f"{coefficients['first_decode']:.3g} s/step with a first decode" in text


def test_a_profile_file_round_trips(tiny_profile, tmp_path):
    path = tmp_path / "profile.json"
    tiny_profile.save(path)
    data = json.loads(path.read_text())
    assert data["format"] == "tokenfactory-step-profile" and data["fit"]["features"] == list(FEATURES)
    assert data["engine"]["num_blocks"] == 64 and data["engine"]["threads"] == 1
    loaded = Profile.load(path)
    assert loaded.points == tiny_profile.points and loaded.fit == tiny_profile.fit
    assert loaded.slowdown == tiny_profile.slowdown
    del data["slowdown_seconds"]  # written before the series existed: the twin prices steps at their mean
    path.write_text(json.dumps(data))
    assert Profile.load(path).slowdown is None
    assert loaded.model_config().hidden_size == 256
    # 1-6: fitted without the prefill-chunk, multi-token, decode-path, first-decode or
    # prefill-gather feature, or with the decode rows' attention counted without the runner's padding.
    for version in (1, 2, 3, 4, 5, 6, 99):
        path.write_text(json.dumps({**data, "version": version}))
        with pytest.raises(ValueError, match="version 7"):
            Profile.load(path)


def test_twin_profile_command_writes_a_profile(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "p.json"
    assert cli_main(["twin", "profile", "--model", str(tiny_model_dir), "--quick", "--num-blocks", "64",
                     "--out", str(out)]) == 0
    assert "profile written to" in capsys.readouterr().out
    profile = Profile.load(out)
    assert len(profile.points) == QUICK_GRID.num_points == 12 and all(c >= 0 for c in profile.fit.coefficients)


def tiny_model() -> ModelConfig:
    return ModelConfig("LlamaForCausalLM", 4096, 256, 768, 4, 8, 4, 32, 4096)


def cost_model(coefficients=TRUE) -> ProfiledCostModel:
    per_token = 2 * 4 * 4 * 32 * 4  # float32 K and V over 4 layers of 4 KV heads of 32
    return ProfiledCostModel(tiny_model(), StepTimeFit(coefficients), 64 * 16 * per_token, per_token)


def test_the_profiled_cost_model_prices_steps_by_the_fit():
    cost = cost_model()
    shape = shape_of([(1, 100)] * 8 + [(64, 0)])
    step = cost.step(shape)
    assert step.duration_s == pytest.approx(exact(shape))
    cpu = HARDWARE["cpu"]
    assert cpu.idle_w <= step.power_w <= cpu.tdp_w
    # The 4-token tail of a mostly cached prompt costs a prefill chunk more than a decode row,
    # less the decode path, which it skips.
    tail, row = shape_of([(4, 96)]), shape_of([(1, 99)])
    extra = 3 * TRUE[1] + (tail.attention_pairs - row.attention_pairs) * TRUE[2]  # same KV read, both sample
    assert cost.step(tail).duration_s - cost.step(row).duration_s == pytest.approx(extra + TRUE[5] + TRUE[6] - TRUE[7])
    # Riding along with that row, it pays for both paths.
    both = shape_of([(1, 99), (4, 96)])
    assert cost.step(both).duration_s == pytest.approx(exact(both))
    assert features(both)[FEATURES.index("decode_path")] == features(both)[FEATURES.index("prefill_chunk")] == 1
    assert cost.kv_num_blocks(16) == 64 and cost.kv_num_blocks(32) == 32
    with pytest.raises(ValueError, match="non-negative"):
        cost_model((1.0, -1.0, 0, 0, 0, 0, 0, 0))


def test_the_twin_runs_on_the_profiled_model():
    cost = cost_model()
    config = TwinConfig(cost=cost, num_workers=1, num_blocks=64, fast_forward=False)
    # One request alone: its first token comes after one prefill step, then a decode per token.
    result = Simulator(config, RoundRobinRouter()).run([TraceRequest(0.0, 40, 5)])
    (record,) = result.records
    prefill = exact(shape_of([(40, 0)]))
    # The first decode after the prefill is priced as one; each decode attends its row padded to
    # whole 16-token blocks, as the engine's runner does.
    decodes = sum(exact(dataclasses.replace(shape_of([(1, 40 + i)]), num_first_decodes=int(i == 0),
                                            decode_extra_pairs=48 - (41 + i), decode_extra_reads=48 - (41 + i)))
                  for i in range(4))
    assert record.first_token == pytest.approx(prefill)
    assert record.finish == pytest.approx(prefill + decodes)
    # A batch that has to queue: everything finishes, and later arrivals wait behind earlier ones.
    workload = [TraceRequest(0.001 * i, 30 + 7 * i, 6, uid=i) for i in range(12)]
    summary = Simulator(TwinConfig(cost=cost, num_workers=1, num_blocks=64), RoundRobinRouter()).run(workload).summary
    assert summary.num_finished == 12 and summary.output_tokens == 72
    assert summary.ttft.p90 > summary.ttft.p50 > prefill


def test_a_slowdown_prices_a_step_at_the_mean_factor_over_its_stretch_of_busy_time():
    slowdown = Slowdown((0.002, 0.006))  # factor 0.5 for 2 ms, then 1.5 for 6 ms
    assert slowdown.factors == pytest.approx((0.5, 1.5))
    assert slowdown.factor(0.0, 0.002) == pytest.approx(0.5) and slowdown.factor(0.002, 0.006) == pytest.approx(1.5)
    assert slowdown.factor(0.001, 0.003) == pytest.approx((0.001 * 0.5 + 0.002 * 1.5) / 0.003)
    assert slowdown.factor(0.009, 0.003) == pytest.approx(slowdown.factor(0.001, 0.003))  # it cycles
    assert slowdown.factor(0.005, 0.016) == pytest.approx(slowdown.factor(0.0, 0.008)) == pytest.approx(1.25)
    step = slowdown.apply(StepCost(0.002, 100.0), 0.0)
    assert (step.duration_s, step.power_w) == pytest.approx((0.001, 100.0))
    spread = Slowdown((1.0, 2.0, 3.0, 4.0))  # factors 0.4, 0.8, 1.2, 1.6
    assert (spread.quantile(0.1), spread.quantile(0.5), spread.quantile(1.0)) == pytest.approx((0.4, 1.2, 1.6))
    for bad in ((), (0.01, 0.0)):
        with pytest.raises(ValueError, match="positive"):
            Slowdown(bad)
    with pytest.raises(ValueError, match="positive"):
        slowdown.factor(0.0, 0.0)


def test_the_twin_prices_a_worker_s_steps_through_the_slowdown_of_its_busy_time():
    flat = (0.01,) + (0,) * (len(FEATURES) - 1)  # every step 10 ms at its mean
    steady = cost_model(flat)
    slowed = dataclasses.replace(cost_model(flat), slowdown=Slowdown((0.01, 0.03)))  # x0.5 for 10 ms, then x1.5
    request = [TraceRequest(0.0, 40, 4)]  # a prefill step, then three decodes
    # Slowed: 5 ms (all in the quick stretch), 10 ms (5 ms quick, 5 ms slow, of its price), then 15 ms twice.
    for cost, first_token, finish in ((steady, 0.01, 0.04), (slowed, 0.005, 0.005 + 0.01 + 0.015 + 0.015)):
        config = TwinConfig(cost=cost, num_workers=1, num_blocks=64)
        (record,) = Simulator(config, RoundRobinRouter()).run(request).records
        assert record.first_token == pytest.approx(first_token) and record.finish == pytest.approx(finish)
