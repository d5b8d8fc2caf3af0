"""Energy attribution: a step's joules shared by tokens, carried to the ledger, summed by tier."""

from __future__ import annotations

import time

import pytest

from tokenfactory.cli import main
from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.meter.energy import EnergyBook, StepEnergyMeter, attribute_step, energy_by_tier, step_joules
from tokenfactory.meter.ledger import Ledger, LedgerEntry
from tokenfactory.meter.power import ModeledPowerSensor, PowerReading
from tokenfactory.twin.hardware import get_hardware


def test_a_steps_joules_are_shared_by_tokens_and_add_up():
    shares = attribute_step(10.0, {"long-prefill": 30, "decode-a": 1, "decode-b": 1, "idle": 0})
    assert shares["long-prefill"] == pytest.approx(30 * shares["decode-a"])
    assert shares["idle"] == 0.0 and sum(shares.values()) == pytest.approx(10.0)
    assert attribute_step(5.0, {}) == {}


def test_a_device_energy_counter_wins_over_integrating_power():
    assert step_joules(PowerReading(100, "measured", 1000.0), PowerReading(300, "measured", 1002.5), 0.01) == 2.5
    assert step_joules(PowerReading(100, "modeled"), PowerReading(300, "modeled"), 0.5) == pytest.approx(100.0)


def test_an_engines_requests_get_their_steps_energy_by_tokens(tiny_model_dir):
    config = EngineConfig.from_pretrained(tiny_model_dir, max_model_len=256,
                                          cache=CacheConfig(block_size=16, num_blocks=64),
                                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=256))
    core = EngineCore(config)
    meter = StepEnergyMeter(ModeledPowerSensor(get_hardware("cpu")))
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
    core.add_request(Request("long", list(range(1, 101)), params))
    core.add_request(Request("short", list(range(1, 6)), params))
    joules: dict[str, float] = {}
    seconds = 0.0
    step_energy = []
    while core.has_work():
        meter.begin_step()
        outputs = core.step()
        seconds += core.last_step.duration_s
        meter.end_step(core.last_step.duration_s, core.last_step.tokens_by_request)
        step_energy.append(meter.total_j - sum(step_energy))
        joules |= meter.take_finished(o.request_id for o in outputs if o.finished)
    assert set(joules) == {"long", "short"} and len(step_energy) == 4  # one prefill step, three decodes
    # the decode steps are shared evenly; the prefill step 100 : 5
    assert joules["long"] - joules["short"] == pytest.approx(step_energy[0] * 95 / 105)
    assert joules["short"] > step_energy[0] * 5 / 105 > 0
    assert sum(joules.values()) == pytest.approx(meter.total_j)
    assert meter.total_j == pytest.approx(get_hardware("cpu").tdp_w * seconds)
    assert meter.take_finished(["long"]) == {"long": 0.0}  # handed over once


def test_the_book_sums_a_requests_choices_and_hands_them_over_once():
    book = EnergyBook(max_entries=2)
    book.add({"chatcmpl-abc-0": 1.5, "chatcmpl-abc-1": 2.0})
    book.add({"cmpl-x-0": 1.0})
    assert book.take("chatcmpl-abc") == pytest.approx(3.5)
    assert book.take("chatcmpl-abc") is None
    book.add({"a-0": 1.0, "b-0": 1.0})  # past max_entries: the oldest is dropped
    assert book.take("cmpl-x") is None and book.take("b") == 1.0


def test_usage_shows_joules_per_token_and_tokens_per_joule_by_tier(tmp_path, capsys):
    db = tmp_path / "factory.db"
    ledger = Ledger(db)
    now = time.time()
    rows = [("a", "default", 100, 20, 20, 50.0), ("b", "default", 10, 0, 10, 10.0), ("c", "flex", 0, 0, 80, 8.0),
            ("d", "flex", 0, 0, 99, None)]  # d: recorded before the meter, left out of the energy sums
    for request_id, tier, prompt, cached, completion, joules in rows:
        ledger.submit(LedgerEntry(request_id, now, "acme", "k", tier, "tiny", prompt, cached, completion, 0.0, 0.1,
                                  1.0, "completed", joules))
    ledger.close()
    by_tier = {t.tier: t for t in energy_by_tier(db)}
    assert by_tier["default"].tokens == 120 and by_tier["default"].energy_j == 60.0
    assert by_tier["default"].joules_per_token == pytest.approx(0.5)
    assert by_tier["flex"].requests_metered == 1 and by_tier["flex"].tokens_per_joule == pytest.approx(10.0)
    assert main(["usage", "--db", str(db), "--by", "tier"]) == 0
    out = capsys.readouterr().out
    assert "Energy by tier" in out
    flex_line = next(line for line in out.splitlines() if line.count("flex") and "8.000" in line)
    assert "0.1" in flex_line and "10" in flex_line
