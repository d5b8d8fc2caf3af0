"""Clock levels and activity-based power: a wrapper of the roofline cost model.

The roofline (`cost_model.CostModel`) draws nearly TDP for any busy step, since a step spends
nearly all its time at one roof. Real GPUs do not: a memory-bound decode step keeps HBM busy but
leaves most SM cycles stalled, and draws well under TDP; a compute-bound prefill draws about TDP
(POLCA, Patel et al., ASPLOS 2024: the token phase of LLM inference draws markedly less than the
prompt phase). And a lower SM clock slows compute-bound work about in proportion but memory-bound
work much less, while the SMs' dynamic power falls about as f^3 (DVFS lowers the voltage with the
clock, P ~ C V^2 f), which is what DynamoLLM (Stojkovic et al., HPCA 2025) exploits per instance
and what published H100 frequency sweeps show (energy per decode token falls as the SM clock is
lowered to about half, then the step time grows).

Assumptions of this model (stated, not measured here):
- step time at clock f: per kind of kernel (GEMMs, attention; they run in turn, their times
  add), the larger of compute roof / f and memory roof; the memory roof unchanged down to
  `memory_knee` of the clock, below it growing as knee / f (too few SM cycles left to keep HBM
  streaming); the fixed per-step overhead and all-reduces unchanged (host and links, not SM-bound);
- power = idle + (TDP - idle) x min(1, hbm_share x HBM activity + SM activity x f^3), activity =
  the share of the step spent at that roof: a compute-bound step draws TDP at full clock, a
  memory-bound one `hbm_share` of the dynamic power (the memory system streaming, at any SM
  clock) plus what its few SM cycles draw.
At f = 1 the step time equals `CostModel.step`'s (a test checks), only the power differs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfactory.twin.cost_model import BatchShape, CostModel, StepCost

MIN_CAPPED_CLOCK = 0.3
"""The lowest clock a power cap drives a GPU to (about an H100's lowest supported SM clock)."""

CLOCK_LEVELS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""SM clock as a fraction of its maximum (an H100's 1,980 MHz: about 990 to 1,980 MHz)."""


@dataclass(frozen=True, slots=True)
class ActivityPower:
    hbm_share: float = 0.35
    """Share of the dynamic power (TDP - idle) drawn by the memory system streaming at full rate."""
    sm_exponent: float = 3.0
    """SM dynamic power at full activity goes as clock^exponent (voltage scaled with the clock)."""
    memory_knee: float = 0.5
    """Below this clock fraction the SMs can no longer keep HBM streaming at full rate."""

    def __post_init__(self) -> None:
        if not 0 <= self.hbm_share <= 1 or self.sm_exponent < 1 or not 0 < self.memory_knee <= 1:
            raise ValueError("need hbm_share in [0, 1], sm_exponent >= 1 and memory_knee in (0, 1]")


@dataclass(frozen=True)
class ClockedCostModel:
    """`base`'s roofline at SM clock fraction `clock`, with activity-based power.

    Quacks like a `CostModel` for the simulator (`step`, `model`, `hardware`, `tp`, `kv_num_blocks`)."""

    base: CostModel
    clock: float = 1.0
    power: ActivityPower = field(default_factory=ActivityPower)
    power_cap_w: float | None = None
    """A power cap on the worker (all its GPUs), as NVML sets one: each step runs at the highest
    clock up to `clock` whose power fits, as the GPU's firmware lowers its clock under a cap
    (down to `MIN_CAPPED_CLOCK`; a step that does not fit even there runs there)."""

    def __post_init__(self) -> None:
        if not 0 < self.clock <= 1:
            raise ValueError(f"clock must be a fraction of the maximum in (0, 1], got {self.clock}")
        if self.power_cap_w is not None and self.power_cap_w <= 0:
            raise ValueError(f"power_cap_w must be positive, got {self.power_cap_w}")

    @property
    def model(self):  # noqa: ANN201 - the base's ModelConfig
        return self.base.model

    @property
    def hardware(self):  # noqa: ANN201 - the base's Hardware
        return self.base.hardware

    @property
    def tp(self) -> int:
        return self.base.tp

    def kv_num_blocks(self, block_size: int) -> int:
        return self.base.kv_num_blocks(block_size)

    def at(self, clock: float) -> ClockedCostModel:
        return ClockedCostModel(self.base, clock, self.power, self.power_cap_w)

    def capped(self, power_cap_w: float | None) -> ClockedCostModel:
        return ClockedCostModel(self.base, self.clock, self.power, power_cap_w)

    def roofs(self, batch: BatchShape) -> tuple[tuple[tuple[float, float], ...], float]:
        """((compute seconds, memory seconds) per kind of kernel, fixed seconds) of a step at full
        clock: `CostModel.kernel_roofs`, the same terms as `CostModel.step`."""
        return self.base.kernel_roofs(batch), self.base.fixed_s(batch.num_tokens)

    def step(self, batch: BatchShape) -> StepCost:
        roofs = self.roofs(batch)
        cost = self._at_clock(roofs, self.clock)
        if self.power_cap_w is None or cost.power_w <= self.power_cap_w:
            return cost
        low, high = MIN_CAPPED_CLOCK, self.clock  # power rises with the clock: bisect
        if self._at_clock(roofs, low).power_w > self.power_cap_w:
            return self._at_clock(roofs, low)
        for _ in range(12):
            middle = (low + high) / 2
            if self._at_clock(roofs, middle).power_w <= self.power_cap_w:
                low = middle
            else:
                high = middle
        return self._at_clock(roofs, low)

    def _at_clock(self, roofs: tuple[tuple[tuple[float, float], ...], float], f: float) -> StepCost:
        kernels, fixed_s = roofs
        p = self.power
        slowdown = max(1.0, p.memory_knee / f)
        duration = sum(max(c / f, m * slowdown) for c, m in kernels) + fixed_s  # the kinds run in turn
        compute_s = sum(c for c, _ in kernels) / f
        memory_s = sum(m for _, m in kernels) * slowdown
        activity = p.hbm_share * memory_s / duration + compute_s / duration * f ** p.sm_exponent
        hw = self.base.hardware
        return StepCost(duration, self.tp * (hw.idle_w + (hw.tdp_w - hw.idle_w) * min(1.0, activity)))


# ---------------------------------------------------------------- the energy-aware policy


@dataclass(frozen=True, slots=True)
class WorkerLoad:
    """What the clock policy reads of one worker."""

    num_running: int
    mean_context: float
    """Mean tokens of context of its running requests."""
    queued_prefill_tokens: int


def decode_shape(num_running: int, context: float, prefill_tokens: int = 0) -> BatchShape:
    """A step of `num_running` decodes at `context` tokens each plus one prefill chunk."""
    n, s = max(1, num_running), max(0, int(context))
    pairs = n * (s + 1) + prefill_tokens * (prefill_tokens + 1) // 2
    return BatchShape(n + prefill_tokens, pairs, n * (s + 1) + prefill_tokens, n + (1 if prefill_tokens else 0),
                      num_prefill_chunks=int(prefill_tokens > 1), num_decode_rows=n + int(prefill_tokens == 1))


def pick_clock(cost: ClockedCostModel, load: WorkerLoad, itl_s: float, ttft_s: float, chunk_tokens: int,
               levels: tuple[float, ...] = CLOCK_LEVELS, headroom: float = 0.5) -> float:
    """The lowest clock whose predicted step keeps the SLO with `headroom`: a step of the worker's
    running decodes plus a prefill chunk within `headroom` x the ITL target, and its queued prefill
    done within `headroom` x the TTFT target. The maximum when none does (pure policy)."""
    chunk = min(chunk_tokens, load.queued_prefill_tokens)
    shape = decode_shape(load.num_running, load.mean_context, chunk)
    for clock in sorted(levels):
        step_s = cost.at(clock).step(shape).duration_s
        drain_s = step_s * (load.queued_prefill_tokens / chunk) if chunk else 0.0
        if step_s <= headroom * itl_s and drain_s <= headroom * ttft_s:
            return clock
    return max(levels)
