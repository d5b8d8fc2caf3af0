"""Power sensors: NVML readings on a GPU, the twin's power model elsewhere, each labelled."""

from __future__ import annotations

import pytest
import torch

from tokenfactory.meter.power import ModeledPowerSensor, load_nvml, sensor_for
from tokenfactory.twin.hardware import get_hardware


def test_the_cpu_is_modeled_with_the_twins_power_model_of_this_machine():
    sensor = sensor_for("cpu")
    reading = sensor.read()
    cpu = get_hardware("cpu")
    assert sensor.source == reading.source == "modeled"
    assert reading.watts == cpu.tdp_w and reading.energy_counter_j is None  # a busy step: full use
    assert ModeledPowerSensor(cpu, utilisation=0.5).read().watts == pytest.approx((cpu.idle_w + cpu.tdp_w) / 2)


def test_a_configured_accelerator_is_modeled_when_nvml_does_not_answer():
    if load_nvml() is not None:
        pytest.skip("NVML answers here: the GPU is measured")
    sensor = sensor_for("cuda:0", hardware="h200")
    assert sensor.source == "modeled" and sensor.read().watts == get_hardware("h200").tdp_w


def test_utilisation_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="utilisation"):
        ModeledPowerSensor(get_hardware("cpu"), utilisation=1.5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available() or load_nvml() is None, reason="needs a GPU with NVML")
def test_a_gpu_is_measured_through_nvml():
    sensor = sensor_for("cuda:0")
    first, second = sensor.read(), sensor.read()
    assert sensor.source == first.source == "measured"
    assert 10.0 < first.watts < 2000.0
    if first.energy_counter_j is not None:
        assert second.energy_counter_j >= first.energy_counter_j
