"""A paced engine process rests between its steps: the power governor's lever without NVML. Its
bucket lets the protected tier's prompt run its chunks back to back."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tokenfactory.control.governor import GridEvent, Pace, PowerSpec
from tokenfactory.control.tiers import builtin_config
from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.engine.request import SamplingParams
from tokenfactory.gateway.admission import LiveGovernor, TierTraffic
from tokenfactory.meter.power import default_hardware
from tokenfactory.runtime.client import AsyncEngineClient

STEPS = 12
RESTS_PER_STEP = 9.0
"""The pace the test asks for: each step followed by nine times its length at rest."""


@pytest.fixture(scope="module")
def client(loop, tiny_model_dir: Path):
    config = EngineConfig.from_pretrained(tiny_model_dir, max_model_len=256,
                                          cache=CacheConfig(block_size=16, num_blocks=64))
    client = AsyncEngineClient(config)
    loop.run(client.start(), timeout_s=120)
    yield client
    loop.run(client.shutdown())


def generate(client: AsyncEngineClient, loop, request_id: str) -> tuple[float, float, int]:
    """(wall seconds from first to last token, seconds inside steps meanwhile, steps meanwhile)."""
    params = SamplingParams(max_tokens=STEPS + 1, temperature=0.0, ignore_eos=True)

    async def run() -> tuple[float, float, int]:
        first = None
        async for out in client.generate(request_id, [1, 2, 3, 4, 5], params):
            if first is None:
                first = (time.monotonic(), client.load.step_seconds, client.load.num_steps)
        assert first is not None
        return time.monotonic() - first[0], client.load.step_seconds - first[1], client.load.num_steps - first[2]

    return loop.run(run(), timeout_s=60)


def test_a_paced_engine_rests_after_each_step_then_runs_flat_out_again(client, loop):
    hw = default_hardware("cpu")
    # The CPU's modeled step draws its TDP; this pace asks for a rest of 9 step-lengths per step.
    pace_w = hw.idle_w + (hw.tdp_w - hw.idle_w) / (1.0 + RESTS_PER_STEP)
    generate(client, loop, "warm")
    client.set_pace(Pace(pace_w, hw.idle_w, capacity_j=0.0, step_j=0.0))
    wall, stepping, steps = generate(client, loop, "paced")
    assert steps >= STEPS - 1
    # Every step but the last is followed by its rest before the next one starts.
    assert wall >= 0.9 * RESTS_PER_STEP * stepping * (steps - 1) / steps
    client.set_pace(None)
    fast_wall, fast_stepping, _ = generate(client, loop, "unpaced")
    assert fast_wall < 0.5 * wall
    assert fast_wall < 0.5 * RESTS_PER_STEP * fast_stepping + 0.05


def time_to_first_token(client: AsyncEngineClient, loop, request_id: str, prompt: list[int],
                        priority: int) -> tuple[float, float]:
    """(seconds to the first token, seconds inside steps meanwhile)."""
    async def run() -> tuple[float, float]:
        start, stepped = time.monotonic(), client.load.step_seconds
        async for _ in client.generate(request_id, prompt, SamplingParams(max_tokens=1), priority=priority):
            break
        return time.monotonic() - start, client.load.step_seconds - stepped

    return loop.run(run(), timeout_s=60)


def test_a_protected_prompt_runs_its_chunks_back_to_back_from_the_bucket(client, loop):
    hw = default_hardware("cpu")
    # Half way between idle and TDP: a step at TDP needs a rest as long as itself to earn it back.
    pace_w = (hw.idle_w + hw.tdp_w) / 2
    # The bucket fills in two seconds of rest: ten chunks of up to 0.2 s each at TDP.
    capacity = 2.0 * (pace_w - hw.idle_w)
    client.set_token_budget(16)  # a 160-token prompt takes ten chunks
    client.set_pace(Pace(pace_w, hw.idle_w, capacity_j=capacity, step_j=capacity / 50, protect_priority=10))
    try:
        time.sleep(2.2)
        fast, fast_stepping = time_to_first_token(client, loop, "protected", list(range(1, 161)), priority=10)
        time.sleep(2.2)
        slow, slow_stepping = time_to_first_token(client, loop, "lower", list(range(300, 460)), priority=0)
    finally:
        client.set_pace(None)
        client.set_token_budget(512)
    # The lower tier's chunks each wait for a full bucket: a rest about as long as the chunk.
    assert slow - slow_stepping >= 0.7 * slow_stepping
    # The protected one's run back to back (what is left is messaging).
    assert fast - fast_stepping < 0.5 * (slow - slow_stepping)


def test_the_live_governor_paces_the_engine_under_a_cut_and_keeps_its_whole_steps(client):
    hw = default_hardware("cpu")
    spec = PowerSpec(static_cap_w=hw.tdp_w, pacing=True)
    governor = LiveGovernor(spec, client, TierTraffic(builtin_config()), "cpu", max_tokens_per_step=512,
                            clock=lambda: 100.0)
    governor.tick()
    assert client.pace.pace_w is None  # full power: no rests
    governor.add_event(GridEvent(start_s=100.0, duration_s=60.0, cut_fraction=0.5, ramp_s=0.0))
    decision = governor.tick()
    assert decision.budget_w == pytest.approx(hw.tdp_w / 2)
    assert client.pace.pace_w is not None and hw.idle_w < client.pace.pace_w <= hw.tdp_w / 2
    assert client.pace.rest_w == hw.idle_w
    # Its bucket keeps credit for the top tier's prompts, and every 1 s window holds the share.
    assert client.pace.protect_priority == builtin_config().tiers["priority"].priority
    assert client.pace.capacity_j == pytest.approx(decision.budget_w - client.pace.pace_w)
    assert client.token_budget == 512  # whole steps
    off = LiveGovernor(spec.model_copy(update={"pacing": False}), client, TierTraffic(builtin_config()), "cpu",
                       max_tokens_per_step=512, clock=lambda: 100.0, admin_events=governor.admin_events)
    off.tick()
    assert client.pace.pace_w is None and client.token_budget is not None and client.token_budget < 512
    client.set_token_budget(512)
