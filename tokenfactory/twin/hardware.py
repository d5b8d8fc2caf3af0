"""The accelerator catalog: one frozen record per chip, datasheet numbers with their sources.

FLOP/s are dense (no 2:4 sparsity) tensor-core peaks per GPU. Bandwidths are decimal (1 TB/s =
1e12 B/s), as the datasheets print them; HBM capacities are binary: HBM stacks come in powers of
two of GiB, so the datasheets' "80 GB" is 80 GiB (five 16 GiB stacks; nvidia-smi shows 81,559 MiB
on an H100 SXM, 143,771 MiB, about 141 GiB, on an H200). Idle power and prices are not on
datasheets: they are estimates, marked as such, and meant to be overridden for a real plan.
"""

from __future__ import annotations

from dataclasses import dataclass

TERA = 1e12
GIGA = 1e9
GIB = 2**30


@dataclass(frozen=True, slots=True)
class Hardware:
    """One accelerator (per GPU, not per board)."""

    name: str
    peak_flops_bf16: float
    """Dense BF16 tensor FLOP/s."""
    peak_flops_fp8: float
    """Dense FP8 tensor FLOP/s."""
    hbm_bandwidth: float
    """Bytes/s."""
    hbm_capacity: float
    """Bytes."""
    interconnect_bandwidth: float
    """Bytes/s per GPU to its tensor-parallel peers (NVLink total, as the datasheet states it)."""
    tdp_w: float
    idle_w: float
    price_per_hour: float
    """US dollars per GPU-hour (estimate of on-demand cloud pricing)."""

    def peak_flops(self, precision: str) -> float:
        if precision == "bf16":
            return self.peak_flops_bf16
        if precision == "fp8":
            return self.peak_flops_fp8
        raise ValueError(f"precision must be 'bf16' or 'fp8', got {precision!r}")


HARDWARE: dict[str, Hardware] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM column): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS
    # "with sparsity" (dense is half), 80 GB HBM3 at 3.35 TB/s, NVLink 900 GB/s, max TDP 700 W.
    # Idle ~70 W: typical nvidia-smi reading of an idle SXM part (estimate). Price: estimate.
    "h100": Hardware(
        name="H100 SXM",
        peak_flops_bf16=989 * TERA,
        peak_flops_fp8=1979 * TERA,
        hbm_bandwidth=3.35 * TERA,
        hbm_capacity=80 * GIB,
        interconnect_bandwidth=900 * GIGA,
        tdp_w=700,
        idle_w=70,
        price_per_hour=2.50,
    ),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM): same tensor cores as H100 (BF16 1,979 / FP8 3,958
    # TFLOPS sparse), 141 GB HBM3e at 4.8 TB/s, NVLink 900 GB/s, TDP up to 700 W.
    # Idle ~75 W and price are estimates.
    "h200": Hardware(
        name="H200 SXM",
        peak_flops_bf16=989 * TERA,
        peak_flops_fp8=1979 * TERA,
        hbm_bandwidth=4.8 * TERA,
        hbm_capacity=141 * GIB,
        interconnect_bandwidth=900 * GIGA,
        tdp_w=700,
        idle_w=75,
        price_per_hour=3.50,
    ),
    # NVIDIA HGX B200 datasheet, per GPU: BF16 4.5 PFLOPS and FP8 9 PFLOPS sparse (dense half),
    # 180 GB HBM3e at 8 TB/s, NVLink 5 at 1.8 TB/s, TDP 1,000 W. Idle ~120 W and price: estimates.
    "b200": Hardware(
        name="B200",
        peak_flops_bf16=2250 * TERA,
        peak_flops_fp8=4500 * TERA,
        hbm_bandwidth=8.0 * TERA,
        hbm_capacity=180 * GIB,
        interconnect_bandwidth=1800 * GIGA,
        tdp_w=1000,
        idle_w=120,
        price_per_hour=6.00,
    ),
    # NVIDIA GB200 NVL72 datasheet divided by its 72 GPUs: BF16 180 PFLOPS and FP8 360 PFLOPS
    # dense (2.5 / 5 PFLOPS per GPU), 13.4 TB HBM3e (186 GB per GPU) at 576 TB/s (8 TB/s per GPU),
    # NVLink 5 at 1.8 TB/s per GPU. ~1,200 W per GPU is the commonly quoted share of the
    # superchip's power (estimate); idle ~150 W and price: estimates.
    "gb200": Hardware(
        name="GB200",
        peak_flops_bf16=2500 * TERA,
        peak_flops_fp8=5000 * TERA,
        hbm_bandwidth=8.0 * TERA,
        hbm_capacity=186 * GIB,
        interconnect_bandwidth=1800 * GIGA,
        tdp_w=1200,
        idle_w=150,
        price_per_hour=8.00,
    ),
    # This development machine: 2 AMD EPYC cores. Rough figures, not a datasheet: 2 cores x
    # ~2.5 GHz x 32 FP32 FLOP/cycle (AVX2, 2 FMA units) ~ 160 GFLOP/s, no fast BF16/FP8 path;
    # ~20 GB/s of memory bandwidth for two cores; 24 GB of RAM; no interconnect (TP=1 only
    # makes sense). Power is a two-core share of a server socket; price a small cloud VM.
    "cpu": Hardware(
        name="CPU (2 cores)",
        peak_flops_bf16=160 * GIGA,
        peak_flops_fp8=160 * GIGA,
        hbm_bandwidth=20 * GIGA,
        hbm_capacity=24 * GIGA,
        interconnect_bandwidth=10 * GIGA,
        tdp_w=30,
        idle_w=10,
        price_per_hour=0.10,
    ),
}


def get_hardware(name: str) -> Hardware:
    try:
        return HARDWARE[name.lower()]
    except KeyError:
        raise ValueError(f"unknown hardware {name!r}; known: {', '.join(HARDWARE)}") from None
