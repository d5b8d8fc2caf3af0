"""Power sensors: what a worker's accelerator draws, measured where we can and modeled where not.

Every reading says where it came from. On a CUDA worker with NVIDIA's management library
(`nvidia-ml-py`) the sensor reads each GPU's power and its energy counter (read-only: this module
never changes a GPU setting) and labels them `measured`. Anywhere else (the CPU, a GPU without
NVML) a modeled sensor uses the twin's power model of the worker's hardware: idle power plus
(TDP - idle) x utilisation, the same line `twin/cost_model.py` draws, labelled `modeled`.

NVML is imported only when a CUDA sensor is built, so a CPU-only install never needs it.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Literal, Protocol

from tokenfactory.twin.hardware import Hardware, get_hardware

Source = Literal["measured", "modeled"]


@dataclass(frozen=True, slots=True)
class PowerReading:
    """Power at one moment, and the device's energy counter where it keeps one."""

    watts: float
    source: Source
    energy_counter_j: float | None = None
    """Joules since the device's counter started (NVML keeps one since Volta); None: no counter,
    integrate `watts` over time instead."""


class PowerSensor(Protocol):
    source: Source
    device: str

    def read(self) -> PowerReading:
        """The device's power now (for a modeled sensor: while the engine runs a step)."""


@dataclass(frozen=True, slots=True)
class ModeledPowerSensor:
    """The twin's power model: a busy engine draws idle + (TDP - idle) x utilisation.

    The engine asks for a reading while it steps, and a CPU or GPU running a forward pass is
    close to fully used, hence the default utilisation of 1.0.
    """

    hardware: Hardware
    utilisation: float = 1.0
    device: str = "cpu"
    source: Source = "modeled"

    def __post_init__(self) -> None:
        if not 0.0 <= self.utilisation <= 1.0:
            raise ValueError(f"utilisation must be in [0, 1], got {self.utilisation}")

    def read(self) -> PowerReading:
        hw = self.hardware
        return PowerReading(hw.idle_w + (hw.tdp_w - hw.idle_w) * self.utilisation, "modeled")


class NvmlPowerSensor:
    """One GPU's power and energy counter through NVML (read-only)."""

    source: Source = "measured"

    def __init__(self, nvml, index: int) -> None:
        self._nvml = nvml
        self._handle = nvml.nvmlDeviceGetHandleByIndex(index)
        self.device = f"cuda:{index}"
        self._has_counter = True

    def read(self) -> PowerReading:
        watts = self._nvml.nvmlDeviceGetPowerUsage(self._handle) / 1000.0  # milliwatts
        counter = None
        if self._has_counter:
            try:
                counter = self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handle) / 1000.0  # millijoules
            except self._nvml.NVMLError:  # pre-Volta parts keep no counter
                self._has_counter = False
        return PowerReading(watts, "measured", counter)


def load_nvml():
    """The initialised `pynvml` module (from `nvidia-ml-py`), or None without it or without a driver."""
    try:
        nvml = importlib.import_module("pynvml")
        nvml.nvmlInit()
    except Exception:  # no package, no driver, no GPU: the caller falls back to the model
        return None
    return nvml


def cuda_index(device: str) -> int:
    """`cuda` -> 0, `cuda:3` -> 3."""
    _, _, index = device.partition(":")
    return int(index) if index else 0


def default_hardware(device: str, hardware: str | None = None) -> Hardware:
    """The power model of an engine on `device`: `hardware` where configured, else the catalog's
    `cpu` entry on the CPU and `h100` on a GPU."""
    return get_hardware(hardware or ("h100" if device.startswith("cuda") else "cpu"))


def sensor_for(device: str, hardware: str | None = None) -> PowerSensor:
    """The sensor of an engine on `device` (`cpu`, `cuda[:N]`): NVML on a CUDA device where it
    answers, else the model of `default_hardware`."""
    if device.startswith("cuda"):
        nvml = load_nvml()
        if nvml is not None:
            return NvmlPowerSensor(nvml, cuda_index(device))
    return ModeledPowerSensor(default_hardware(device, hardware), device=device)
