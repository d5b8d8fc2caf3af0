"""`tokenfactory twin profile`: measure the live engine's step times and fit the twin's cost model.

The twin prices a step from its `BatchShape`. Here the real `EngineCore` (scheduler, model
runner, sampler: a step end to end) is driven through a grid of batch shapes on this machine:
prefill chunks of several lengths after cached contexts of several lengths, decode batches of
several sizes and context lengths, and decode batches with a prefill chunk riding along. Each
grid point is stepped after warm-up steps and several times over; its mean time is kept, with
every sample.

Step time is then fitted as a non-negative sum over the shape's features

    seconds = a + b x tokens + c x attention pairs + d x KV tokens read + e x sampled rows
              + f x prefill chunks + g x [more than one token]

minimising relative error (a 10 ms decode step matters as much as a 1 s prefill), and
`ProfiledCostModel` stands in for the roofline: same interface, step time from the fit, power
still from the hardware's utilisation model. A profile also keeps the machine's `Slowdown`: one
reference step timed back to back, whose variation over busy time the twin applies to its steps,
since the upper percentiles of latency come from the stretches a busy machine runs slow.

Contexts are built cheaply through the prefix cache: each row of a decode batch extends its own
prompt computed once (distinct ones: rows sharing KV memory read faster than unrelated requests
do), with contexts spread evenly up to the grid's (the runner pads decode rows to the longest), and
a prefill chunk's context is a prompt cached once. The grid is swept `repeats` times over, so a burst of load from elsewhere on the machine
spoils one sample of many points (the median drops it) rather than every sample of one.
"""

from __future__ import annotations

import argparse
import bisect
import dataclasses
import itertools
import json
import os
import platform
import random
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from tokenfactory.engine.config import DTYPES, CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from tokenfactory.engine.engine import EngineCore
from tokenfactory.engine.model_runner import ModelRunner
from tokenfactory.engine.outputs import ModelRunnerOutput, SchedulerOutput
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.tiny import TINY_MODEL_NAME, ensure_tiny_model
from tokenfactory.twin.cost_model import BatchShape, CostModel, StepCost, step_shape
from tokenfactory.twin.hardware import HARDWARE, Hardware

PROFILE_FORMAT = "tokenfactory-step-profile"
PROFILE_VERSION = 7
"""2: the prefill_chunk feature (version 1 files lack it, and their fit would misprice prefills).
3: the multi_token feature. 4: the decode_path feature (and each point's decode rows). 5: the
first_decode feature (and each point's `num_first_decodes`, and the grid's joining points). 6: the
attention_pair and kv_read_token features count the runner's padding of decode rows, and the
prefill_gather_token feature (each point's `decode_extra_pairs`, `decode_extra_reads` and
`prefill_gathered_tokens`). 7: the prefill_gather feature (each point's `num_prefill_gathers`, and
the grid's prefills after a short cached prefix)."""

FEATURES = ("step", "token", "attention_pair", "kv_read_token", "sampled_row", "prefill_chunk", "multi_token",
            "decode_path", "prefill_gather_token", "prefill_gather", "first_decode")
"""What each fitted coefficient costs (seconds per step, per computed token, ...). A prefill
chunk takes the runner's own path (an attention call per layer, a mask after a cached prefix):
0.4-0.8 ms against a 3.4-4.4 ms step on a 2-core CPU. Without its own term that cost leaks into
the per-step and per-token prices: decode-only steps look dearer than they are, and the short
tail of a mostly cached prompt cheaper. A step of more than one token pays a fixed extra over a
lone token (on a 2-core CPU the second decode row added 0.8 ms, each one after it 0.2-0.4 ms:
likely the cheaper matrix-vector path a single row's products take). Without that term, one line through
both left the relative errors of a live run's one-row and three-row decode steps 10-11% apart
(the one-row ones, most steps of a lightly loaded engine, priced high); with it, 2-3%.
A step with decode rows takes the runner's decode path once (block tables, a padded mask, an
attention call per layer), one without skips it: a single per-step term charged pure prefills
for a path they never take and mixed steps (a prompt riding along with a few decodes, common in
a lightly loaded engine) for one path short, so the fit priced mixed grid points 4-9% low and
a live run's steps with a prefill chunk 5-15% low against its decode-only ones.
A decode step in which a row makes its first decode (its request just joined the batch from
its prefill) costs about 0.45 ms more than the same rows a step later (eight rows joined by a
ninth on this CPU: 8.06 ms, then 7.77 and 7.63 ms); priced without that term, a live run's
decode-only steps right after a step carrying a prompt came out 9-11% low. The grid measures it
on rows that a prompt joins, as a fixed extra per step (`fit_step_time`).
The attention pairs and KV reads are the runner's own: it pads every decode row to the longest
row's blocks (and reads blocks all rows share once), so eight rows of contexts spread up to 512
attend over as many keys as eight rows of 512. Counted as the contexts' sums, the fit learnt a KV price
inflated by the grid's spreads: a live run's steps of five to eight rows came out 13-22% low
(now within 4% for four to six). A prefill chunk after a cached prefix gathers that prefix's
blocks from the paged cache, at about 1.1 us a token on this CPU (a fit) against 0.54 us for a
decode row's batched read: priced at the decode rows' rate, four tokens after 512 cached ones came out
13% low, and a live run's steps with chunks under 32 tokens (most often the tail of a cached
prompt) 10% low. Gathering at all costs a fixed extra besides (a block table, an offset mask, the
masked attention path): four tokens after 16 cached ones took 0.14 ms more than four from a
prompt's start, where the per-token price says 0.04 ms. With the grid's cached prefixes all of
512 tokens the fit could not tell the two apart and priced the short prefixes most cached
prompts have (32-256 tokens in a live run) 8-20% low."""


def features(shape: BatchShape) -> tuple[float, ...]:
    """The fit's regressors, in FEATURES order."""
    return (1.0, shape.num_tokens, shape.attention_pairs + shape.decode_extra_pairs,
            shape.kv_read_tokens + shape.decode_extra_reads, shape.num_sampled,
            shape.num_prefill_chunks, float(shape.num_tokens > 1), float(shape.num_decode_rows > 0),
            shape.prefill_gathered_tokens, shape.num_prefill_gathers, float(shape.num_first_decodes > 0))


class ShapeRecordingRunner(ModelRunner):
    """The model runner, remembering the shape of the step it last executed (read before the
    scheduler updates the requests, so contexts are the step's own)."""

    last_shape: BatchShape | None = None

    def execute(self, sched: SchedulerOutput) -> ModelRunnerOutput:
        self.last_shape = step_shape(sched, self.block_size)
        return super().execute(sched)


# --- the fit --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StepTimeFit:
    """Step seconds as a non-negative combination of `features(shape)`."""

    coefficients: tuple[float, ...]
    rms_relative_error: float = float("nan")
    """Of the fit on the points it was fitted to."""

    def predict(self, shape: BatchShape) -> float:
        return sum(c * x for c, x in zip(self.coefficients, features(shape)))


def fit_step_time(samples: Sequence[tuple[BatchShape, float]]) -> StepTimeFit:
    """Non-negative least squares of relative error over (shape, seconds) samples, in two stages:
    every term but `first_decode` from the samples without a first decode, then `first_decode`
    as the mean of what the samples with one took beyond that fit's price (at least 0).

    A first decode is a fixed extra on top of a step, so it is measured as one: a last term in
    the same least-squares pass traded cost with the per-step and per-path terms, and their
    split moved from sweep to sweep.
    """
    if any(s <= 0 for _, s in samples):
        raise ValueError("step times must be positive")
    plain = [(shape, s) for shape, s in samples if not shape.num_first_decodes]
    joined = [(shape, s) for shape, s in samples if shape.num_first_decodes]
    coefficients, error = _fit_terms(plain, len(FEATURES) - 1)
    if not joined:
        return StepTimeFit((*coefficients, 0.0), error)
    base = StepTimeFit((*coefficients, 0.0))
    fit = StepTimeFit((*coefficients, max(0.0, statistics.fmean(s - base.predict(shape) for shape, s in joined))))
    residuals = [fit.predict(shape) / s - 1 for shape, s in samples]
    return StepTimeFit(fit.coefficients, float(np.sqrt(np.mean(np.square(residuals)))))


def _fit_terms(samples: Sequence[tuple[BatchShape, float]], num_terms: int) -> tuple[tuple[float, ...], float]:
    """The first `num_terms` FEATURES' coefficients and the rms relative error (step times positive).

    With ten terms, trying every subset of them (ordinary least squares on each, keeping the
    best whose coefficients are all non-negative) is exact and simpler than an active-set solver.
    """
    if len(samples) < num_terms:
        raise ValueError(f"need at least {num_terms} samples to fit, got {len(samples)}")
    seconds = np.array([s for _, s in samples], dtype=float)
    # Divide each row by its time: the residuals become relative errors.
    x = np.array([features(shape)[:num_terms] for shape, _ in samples], dtype=float) / seconds[:, None]
    y = np.ones(len(samples))
    scale = np.abs(x).max(axis=0)
    scale[scale == 0] = 1.0  # a feature that is always 0 (no attention pairs) stays at 0
    x = x / scale
    best, best_error = np.zeros(num_terms), np.inf
    for size in range(1, num_terms + 1):
        for subset in itertools.combinations(range(num_terms), size):
            cols = list(subset)
            solution, *_ = np.linalg.lstsq(x[:, cols], y, rcond=None)
            if (solution < 0).any():
                continue
            error = float(np.sum((x[:, cols] @ solution - y) ** 2))
            if error < best_error - 1e-15:
                best, best_error = np.zeros(num_terms), error
                best[cols] = solution
    return tuple(float(c) for c in best / scale), float(np.sqrt(best_error / len(samples)))


@dataclass(frozen=True)
class Slowdown:
    """How much slower than usual this machine ran, moment by moment: one reference step (a few
    decode rows) timed back to back by `twin profile`, each step standing for the stretch of busy
    time it took. A shared machine slows for stretches of tens to hundreds of steps (on a busy
    2-core machine a live step's time over its fitted price correlates 0.5 with the next step's
    and 0.2 with the 50th's); the requests that decode through a slow stretch make the upper
    percentiles of inter-token latency, which a twin pricing every step at its mean misses (by
    10-15% at p90 there, even with prices fitted to the live run's own steps).

    The twin prices a step starting at a worker's busy time t at its fitted price times the mean
    factor over [t, t + price) of this timeline (cycling): a long prefill averages the short
    bursts out as it does on the machine, where one factor per step would give it a short
    decode's variance. Factors are each reference step's time over their plain mean: the
    profile's prices are plain means over steps, which fall less often in slow stretches (each
    takes longer there), and the twin's steps, walking the same timeline, fall there as rarely."""

    seconds: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.seconds or min(self.seconds) <= 0:
            raise ValueError("a slowdown series needs at least one positive step time")

    @cached_property
    def factors(self) -> tuple[float, ...]:
        mean = statistics.fmean(self.seconds)
        return tuple(s / mean for s in self.seconds)

    @cached_property
    def _timeline(self) -> tuple[list[float], list[float]]:
        """Busy time at the end of each reference step, and the factor's integral up to there."""
        return (list(itertools.accumulate(self.seconds)),
                list(itertools.accumulate(s * f for s, f in zip(self.seconds, self.factors))))

    def _integral(self, t: float) -> float:
        ends, areas = self._timeline
        cycles, t = divmod(t, ends[-1])
        i = min(bisect.bisect_right(ends, t), len(ends) - 1)
        before_t, before_area = (ends[i - 1], areas[i - 1]) if i else (0.0, 0.0)
        return cycles * areas[-1] + before_area + (t - before_t) * self.factors[i]

    def factor(self, start_s: float, duration_s: float) -> float:
        """The mean factor over `duration_s` of busy time from `start_s`."""
        if duration_s <= 0:
            raise ValueError(f"a step lasts a positive time, got {duration_s}")
        return (self._integral(start_s + duration_s) - self._integral(start_s)) / duration_s

    def quantile(self, q: float) -> float:
        """The factor below which a fraction `q` of the reference steps ran."""
        ordered = sorted(self.factors)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    def apply(self, cost: StepCost, busy_s: float) -> StepCost:
        """`cost` (a step's price at the mean) as the machine pays it from `busy_s` of busy time."""
        return StepCost(cost.duration_s * self.factor(busy_s, cost.duration_s), cost.power_w)


# --- the profile ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfilePoint:
    """One grid point: the shape of its step and its time over the repeats."""

    kind: str
    """prefill, decode or mixed."""
    shape: BatchShape
    seconds: float
    """The mean: the twin adds step times up, so it needs their expectation. The median drops
    the bursts of load from elsewhere that a live run pays as well (7% less on average, on a busy
    2-core machine, which then makes the twin 7% optimistic)."""
    samples: tuple[float, ...]
    """Every repeat's time on the profile's clock (after the warm-up)."""


@dataclass(frozen=True)
class ProfileGrid:
    """The batch shapes to measure; the defaults take about a minute on two busy CPU cores."""

    prefill_lengths: tuple[int, ...] = (4, 16, 64, 128, 256, 512)
    """4: the tail of a prompt mostly served from the prefix cache (a chunk's own cost shows)."""
    prefill_contexts: tuple[int, ...] = (0, 32, 512)
    """Tokens already cached before the chunk (multiples of the block size). A short one beside a
    long one: gathering a cached prefix costs a fixed extra besides its per-token price."""
    decode_batches: tuple[int, ...] = (1, 2, 3, 4, 8, 16, 32)
    """2 and 3: at moderate load most steps decode a few rows, and there the time is not linear
    in rows (on a 2-core CPU the second row added 0.8 ms, the next ones 0.2-0.4 ms each)."""
    decode_contexts: tuple[int, ...] = (64, 512)
    mixed: tuple[tuple[int, int], ...] = ((1, 32), (2, 128), (4, 64), (16, 32), (16, 256), (32, 128))
    """(decode rows, prefill chunk tokens) stepped together; decodes at the first decode context.
    A prompt arriving at a lightly loaded engine rides along with one or two decoding rows."""
    joins: tuple[int, ...] = (1, 4, 16)
    """Decode batches (at the first decode context) that a fresh prompt joins: the point is the
    step after the prompt's prefill, in which its row makes its first decode (the `first_decode`
    term). A live engine has one whenever a prompt arrives while others decode."""
    warmup: int = 1
    repeats: int = 5
    decode_settle_s: float = 0.03
    """Decode steps let pass before timing a decode point last at least this long on the profile
    clock (and `DECODE_SETTLE` steps): after the rows' prompts were computed, one row's steps keep
    getting quicker for some 15 steps, 30 ms on a 2-core CPU (steps 3-4 5-10% slower than steps
    16-64, where two and four rows settle within 4 steps). A live engine decodes in long runs;
    timed after two steps, the profile priced a live run's one-row steps 8% high. 0: steps only."""
    slowdown_steps: int = 1000
    """Reference steps for the machine's `Slowdown`, timed back to back, a share after each pass
    over the grid (0: none)."""

    def __post_init__(self) -> None:
        if self.repeats < 1 or self.warmup < 0 or self.slowdown_steps < 0 or self.decode_settle_s < 0:
            raise ValueError(f"repeats must be >= 1, warmup, slowdown_steps and decode_settle_s >= 0, got "
                             f"{self.repeats}, {self.warmup}, {self.slowdown_steps} and {self.decode_settle_s}")
        values = [*self.prefill_lengths, *self.decode_batches, *self.joins, *(v for pair in self.mixed for v in pair)]
        if any(v < 1 for v in values):
            raise ValueError("prefill lengths, decode batches and mixed sizes must be positive")
        if any(c < 0 for c in self.prefill_contexts) or any(c < 1 for c in self.decode_contexts):
            raise ValueError("contexts must be non-negative (prefill) and positive (decode)")

    @property
    def num_points(self) -> int:
        decode = len(self.decode_batches) * len(self.decode_contexts)
        prefill = len(self.prefill_lengths) * len(self.prefill_contexts)
        return prefill + decode + len(self.mixed) + len(self.joins)

    def scheduler_config(self) -> SchedulerConfig:
        """Limits wide enough that every grid point runs as one step."""
        rows = max([*self.decode_batches, *(b + 1 for b in self.joins), *(b for b, _ in self.mixed)]) + 1
        tokens = max([*self.prefill_lengths, *(b + JOIN_PROMPT for b in self.joins),
                      *(b + n for b, n in self.mixed), rows])
        return SchedulerConfig(max_num_batched_tokens=tokens, max_num_seqs=rows)


@dataclass
class Profile:
    """A profile file's content: measured points, the fit, and what was measured where."""

    points: list[ProfilePoint]
    fit: StepTimeFit
    model: dict
    """The model's config.json, plus `name`."""
    engine: dict
    """device, dtype, clock, threads, block_size, num_blocks, kv_cache_bytes."""
    machine: dict = field(default_factory=dict)
    wall_s: float = 0.0
    slowdown: Slowdown | None = None

    def to_json(self) -> dict:
        return {
            "format": PROFILE_FORMAT,
            "version": PROFILE_VERSION,
            "machine": self.machine,
            "model": self.model,
            "engine": self.engine,
            "wall_s": self.wall_s,
            "fit": {
                "features": list(FEATURES),
                "coefficients": list(self.fit.coefficients),
                "rms_relative_error": self.fit.rms_relative_error,
            },
            "points": [
                {"kind": p.kind, **dataclasses.asdict(p.shape), "seconds": p.seconds, "samples": list(p.samples)}
                for p in self.points
            ],
            "slowdown_seconds": list(self.slowdown.seconds) if self.slowdown else [],
        }

    @classmethod
    def from_json(cls, data: dict) -> Profile:
        if data.get("format") != PROFILE_FORMAT or data.get("version") != PROFILE_VERSION:
            raise ValueError(f"not a {PROFILE_FORMAT} file of version {PROFILE_VERSION}")
        try:
            fit = data["fit"]
            if list(fit["features"]) != list(FEATURES):
                raise ValueError(f"the profile's fit uses features {fit['features']}, expected {list(FEATURES)}")
            points = [
                ProfilePoint(
                    p["kind"],
                    BatchShape(**{f.name: p[f.name] for f in dataclasses.fields(BatchShape)}),
                    float(p["seconds"]),
                    tuple(p["samples"]),
                )
                for p in data["points"]
            ]
            return cls(
                points,
                StepTimeFit(tuple(float(c) for c in fit["coefficients"]), float(fit["rms_relative_error"])),
                data["model"],
                data["engine"],
                data.get("machine", {}),
                float(data.get("wall_s", 0.0)),
                Slowdown(tuple(float(t) for t in data["slowdown_seconds"])) if data.get("slowdown_seconds") else None,
            )
        except (KeyError, TypeError) as e:
            raise ValueError(f"malformed profile: {e!r}") from None

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        try:
            return cls.from_json(json.loads(Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None

    def model_config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.model)


class _Prompts:
    """Prompt tokens in the model's vocabulary: every `fresh` sequence is unique from its first
    token pair on, so the prefix cache shares exactly what a grid point means to share."""

    def __init__(self, vocab_size: int, seed: int = 0) -> None:
        self.vocab = vocab_size
        self.rng = random.Random(seed)
        self.serial = itertools.count(1)

    def fresh(self, n: int) -> list[int]:
        k = next(self.serial)
        head = [k % self.vocab, k // self.vocab % self.vocab]
        return (head + [self.rng.randrange(self.vocab) for _ in range(max(0, n - 2))])[:n]


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.thread_time}
"""wall: what a client sees. cpu: this thread's CPU time, what a step would take with a core to
itself (with one torch thread the whole step runs on this thread); steady on a shared machine."""


def check_clock(config: EngineConfig, clock: str) -> None:
    if clock not in CLOCKS:
        raise ValueError(f"clock must be one of {', '.join(CLOCKS)}, got {clock!r}")
    if clock == "cpu" and config.device != "cpu":
        raise ValueError("the cpu clock times an engine computing on the CPU; use the wall clock on a GPU")


DECODE_SETTLE = 2
"""Decode steps let pass at least before timing a decode point: the first few after the rows'
prompts were computed run 10-15% slower than the long runs of decodes a live engine makes
(measured on this machine at 1 to 16 rows; the caches still hold the prompts' work). Timed right
after them, the profile priced a live run's decode-only steps 8-13% high. One row takes longer to
settle: `ProfileGrid.decode_settle_s`."""
MAX_SETTLE = 64
"""The most settling steps a decode point takes, whatever the clock says."""
DECODE_TIMED = 2
"""Decode steps averaged into one sample of a decode point."""

JOIN_PROMPT = 32
"""Tokens of the prompt that joins a decode batch at a `join` grid point."""


class _Driver:
    """Steps an `EngineCore` on a `ShapeRecordingRunner`, timing each step end to end."""

    def __init__(self, core: EngineCore, runner: ShapeRecordingRunner, clock: Callable[[], float],
                 settle_s: float = 0.0) -> None:
        self.core, self.runner, self.clock, self.settle_s = core, runner, clock, settle_s
        self.ids = itertools.count()
        self.prompts = _Prompts(core.config.model.vocab_size)
        self._prefixes: dict[tuple[int, int], list[int]] = {}

    def add(self, prompt: list[int], max_tokens: int) -> Request:
        request = Request(f"profile-{next(self.ids)}", prompt,
                          SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True))
        self.core.add_request(request)
        return request

    def step(self) -> tuple[BatchShape, float]:
        self.runner.last_shape = None
        start = self.clock()
        self.core.step()
        seconds = self.clock() - start
        if self.runner.last_shape is None:
            raise RuntimeError("the engine scheduled nothing: the KV cache is too small for the profile grid")
        return self.runner.last_shape, seconds

    def drain(self) -> None:
        while self.core.has_work():
            self.core.step()

    def cached_prefix(self, length: int, which: int = 0) -> list[int]:
        """A prompt of `length` tokens whose full blocks sit in the prefix cache (computed the
        first time it is asked for; the grid's few prefixes stay cached in an ample cache)."""
        if not length:
            return []
        prefix = self._prefixes.get((length, which))
        if prefix is None:
            prefix = self._prefixes[length, which] = self.prompts.fresh(length)
            self.add(prefix, 1)
            self.drain()
        return prefix

    def prefill(self, n: int, context: int, warmup: int) -> tuple[BatchShape, float]:
        """One step prefilling `n` new tokens after `context` cached ones, after `warmup` alike
        and a cool-down."""
        prefix = self.cached_prefix(context)
        for _ in range(warmup):
            self.add(prefix + self.prompts.fresh(n), 1)
            self.step()
        self.cool_down()
        self.add(prefix + self.prompts.fresh(n), 1)
        return self.step()

    def cool_down(self) -> None:
        """One short row decoding alone for `settle_s`, then gone: a step right after a long
        prefill runs 10-25% slower, and quickens over some 30 ms of light steps (on a 2-core CPU,
        a one-row decode 2.4 ms right after a 256-token prefill, 1.7 ms a dozen steps later; not
        the clock rate: plain arithmetic timed after a burst of matrix products keeps its speed).
        Most of a live engine's prefills follow light steps; measured after the grid's previous
        point (a 512-token prefill, say), a short chunk's point came out 7% above the fit."""
        if not self.settle_s:
            return
        row = self.add(self.prompts.fresh(JOIN_PROMPT), MAX_SETTLE + 1)
        self.settle(DECODE_SETTLE)
        self.core.abort([row.request_id])
        self.drain()

    def decode(self, batch: int, context: int, warmup: int, prefill: int = 0) -> tuple[BatchShape, float]:
        """A step decoding `batch` rows with contexts spread evenly up to `context`, with a fresh
        `prefill`-token prompt riding along if given: the mean of `DECODE_TIMED` steps after
        `warmup` steps alike and the settling ones (the shape of the first timed one; contexts
        grow by a token a step)."""
        return _mean_step(self.decode_steps(batch, context, DECODE_TIMED, prefill, settle=warmup + DECODE_SETTLE))

    def settle(self, steps: int, prefill: int = 0) -> None:
        """Step the running rows at least `steps` times and for at least `settle_s`."""
        began, n = self.clock(), 0
        while n < steps or (self.clock() - began < self.settle_s and n < MAX_SETTLE):
            if prefill:
                self.add(self.prompts.fresh(prefill), 1)
            self.step()
            n += 1

    def _rows(self, batch: int, context: int, max_tokens: int) -> list[Request]:
        """`batch` requests prefilled and decoding, contexts spread evenly up to `context`.

        Spread, as in a running batch: the runner pads every decode row to the longest one
        (30% dearer on this CPU than equal rows of the same total), and a `BatchShape` only
        carries the total, so the fit must see typical spreads. Row i's prompt extends its own
        cached prefix: every row reads its own KV memory, as unrelated requests do (rows sharing
        memory read faster), while only the last block of each prompt is computed per pass."""
        block = self.core.kv.block_size
        contexts = [max(1, round(context * (i + 1) / batch)) for i in range(batch)]
        shared = [(c - 1) // block * block for c in contexts]
        prefixes = [self.cached_prefix(s, i) for i, s in enumerate(shared)]  # before any row starts
        rows = [self.add(prefix + self.prompts.fresh(c - s), max_tokens)
                for prefix, c, s in zip(prefixes, contexts, shared)]
        while any(r.num_output_tokens == 0 for r in rows):
            self.core.step()
        return rows

    def join(self, batch: int, context: int, warmup: int) -> tuple[BatchShape, float]:
        """The mean of `DECODE_TIMED` steps in which a fresh `JOIN_PROMPT`-token prompt, prefilled
        the step before, makes its first decode beside `batch` settled rows (after `warmup` alike)."""
        joins = warmup + DECODE_TIMED
        rows = self._rows(batch, context, MAX_SETTLE + 3 * joins + batch + 1)  # three steps a join
        self.settle(DECODE_SETTLE)
        timed = []
        for _ in range(joins):
            joining = self.add(self.prompts.fresh(JOIN_PROMPT), 3)
            self.step()  # its prefill
            timed.append(self.step())
            self.core.abort([joining.request_id])
            self.step()  # the rows alone again
        self.core.abort([r.request_id for r in rows])
        self.drain()
        return _mean_step(timed)

    def decode_steps(self, batch: int, context: int, steps: int, prefill: int = 0,
                     settle: int = 0) -> list[tuple[BatchShape, float]]:
        """`steps` timed steps back to back of `batch` decode rows, contexts spread evenly up to
        `context` (each step one token longer), with a fresh `prefill`-token prompt riding along;
        after settling (`settle`: at least that many steps alike) unless `settle` is 0."""
        # The first rows may decode while the last prefill.
        rows = self._rows(batch, context, steps + batch + 1 + (MAX_SETTLE + settle if settle else 0))
        if settle:
            self.settle(settle, prefill)
        timed = []
        for _ in range(steps):
            if prefill:
                self.add(self.prompts.fresh(prefill), 1)
            timed.append(self.step())
        self.core.abort([r.request_id for r in rows])
        self.drain()
        return timed

    def slowdown(self, num_steps: int, batch: int = 4, context: int = 64, run: int = 64) -> Slowdown:
        """`num_steps` reference steps (`batch` decode rows), timed back to back in runs of `run`
        after the rows settled (then fresh rows, so contexts stay near `context`)."""
        seconds: list[float] = []
        while len(seconds) < num_steps:
            steps = self.decode_steps(batch, context, min(run, num_steps - len(seconds)), settle=DECODE_SETTLE)
            seconds += [t for _, t in steps]
        return Slowdown(tuple(seconds))


def _mean_step(timed: list[tuple[BatchShape, float]]) -> tuple[BatchShape, float]:
    """The last `DECODE_TIMED` steps as one sample: the first one's shape, their mean time."""
    last = timed[-DECODE_TIMED:]
    return last[0][0], statistics.fmean(seconds for _, seconds in last)


def measure(core: EngineCore, runner: ShapeRecordingRunner, grid: ProfileGrid, clock: str = "wall",
            on_step: Callable[[str], None] = lambda kind: None) -> tuple[list[ProfilePoint], Slowdown | None]:
    """Step the engine through the grid `repeats` times over; the engine must be idle and use
    `runner`. Passes over the whole grid, not repeats back to back, so that a burst of load from
    elsewhere spoils one sample of many points (the median drops it), not every sample of one.
    After each pass, its share of the `Slowdown` reference steps (so the series spans the
    profile's time, slow minutes and quick ones)."""
    if core.has_work():
        raise ValueError("the engine must be idle to be profiled")
    driver = _Driver(core, runner, CLOCKS[clock], grid.decode_settle_s)
    w = grid.warmup
    plan: list[tuple[str, Callable[[], tuple[BatchShape, float]]]] = [
        *(("prefill", lambda n=n, c=c: driver.prefill(n, c, w))
          for c in grid.prefill_contexts for n in grid.prefill_lengths),
        *(("decode", lambda b=b, c=c: driver.decode(b, c, w))
          for c in grid.decode_contexts for b in grid.decode_batches),
        *(("mixed", lambda b=b, n=n: driver.decode(b, grid.decode_contexts[0], w, prefill=n))
          for b, n in grid.mixed),
        *(("join", lambda b=b: driver.join(b, grid.decode_contexts[0], w)) for b in grid.joins),
    ]
    shapes: list[BatchShape] = []
    times: list[list[float]] = [[] for _ in plan]
    reference: list[float] = []
    for repeat in range(grid.repeats):
        for i, (kind, run) in enumerate(plan):
            shape, seconds = run()
            if repeat == 0:
                shapes.append(shape)
            times[i].append(seconds)
            on_step(kind)
        share = grid.slowdown_steps * (repeat + 1) // grid.repeats - len(reference)
        if share:
            reference += driver.slowdown(share, context=grid.decode_contexts[0]).seconds
        on_step("slowdown")
    points = [
        ProfilePoint(kind, shape, statistics.fmean(samples), tuple(samples))
        for (kind, _), shape, samples in zip(plan, shapes, times)
    ]
    return points, Slowdown(tuple(reference)) if reference else None


def build_runner(config: EngineConfig, threads: int) -> ShapeRecordingRunner:
    """The engine's model runner with torch held to `threads` CPU threads (profile and live run
    alike: the fit only holds for the threading it was measured with)."""
    runner = ShapeRecordingRunner(config)
    torch.set_num_threads(threads)
    return runner


def profile_engine(config: EngineConfig, grid: ProfileGrid = ProfileGrid(), threads: int = 1,
                   runner: ShapeRecordingRunner | None = None, clock: str = "wall",
                   on_step: Callable[[str], None] = lambda kind: None) -> Profile:
    """Measure `config`'s engine on `grid` and fit the step-time model."""
    check_clock(config, clock)
    runner = runner or build_runner(config, threads)
    profile_config = dataclasses.replace(config, scheduler=grid.scheduler_config())
    core = EngineCore(profile_config, runner)
    started = time.perf_counter()
    points, slowdown = measure(core, runner, grid, clock, on_step)
    wall = time.perf_counter() - started
    fit = fit_step_time([(p.shape, p.seconds) for p in points])
    model = json.loads((Path(config.model_path) / "config.json").read_text())
    model["name"] = config.name
    engine = {
        "device": config.device,
        "dtype": config.dtype,
        "clock": clock,
        "threads": torch.get_num_threads(),
        "block_size": config.cache.block_size,
        "num_blocks": runner.num_blocks,
        "kv_cache_bytes": runner.kv_cache.numel() * runner.kv_cache.element_size(),
    }
    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return Profile(points, fit, model, engine, machine, wall, slowdown)


# --- the cost model ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ProfiledCostModel:
    """The twin's cost model from a profile: step time from the fitted model of this machine's
    engine; power from the hardware's utilisation model (the roofline's ideal time over the
    measured time), labelled modeled like the roofline's. With the profile's `slowdown` the
    simulator prices each step at the machine's factor for it (`Slowdown.apply`)."""

    model: ModelConfig
    fit: StepTimeFit
    kv_cache_bytes: int
    """The profiled engine's KV cache size: `kv_num_blocks` follows from it."""
    kv_bytes_per_token: int
    hardware: Hardware = HARDWARE["cpu"]
    tp: int = 1
    slowdown: Slowdown | None = None
    counts_runner_work: ClassVar[bool] = True
    """The fit prices the model runner's own work (decode padding, prefill gathers): the simulator counts it."""

    @classmethod
    def from_profile(cls, profile: Profile, hardware: Hardware | None = None) -> ProfiledCostModel:
        model = profile.model_config()
        itemsize = DTYPES[profile.engine["dtype"]]
        per_token = 2 * model.num_hidden_layers * model.num_key_value_heads * model.head_dim * itemsize
        return cls(model, profile.fit, int(profile.engine["kv_cache_bytes"]), per_token,
                   hardware or HARDWARE["cpu"], slowdown=profile.slowdown)

    def __post_init__(self) -> None:
        if len(self.fit.coefficients) != len(FEATURES) or any(c < 0 for c in self.fit.coefficients):
            raise ValueError(f"a step-time fit needs {len(FEATURES)} non-negative coefficients")
        if self.tp != 1:
            raise ValueError("a profile measures one engine: tp must be 1")

    @cached_property
    def _ideal(self) -> CostModel:
        """The roofline at full efficiency and no overhead: a step's ideal time, for utilisation."""
        return CostModel(self.model, self.hardware, compute_efficiency=1.0, bandwidth_efficiency=1.0,
                         kv_bandwidth_efficiency=1.0,
                         step_overhead_s=0.0, activation_reserve=0.0)

    def step(self, batch: BatchShape) -> StepCost:
        duration = max(self.fit.predict(batch), 1e-9)
        utilisation = min(1.0, self._ideal.step(batch).duration_s / duration)
        hw = self.hardware
        return StepCost(duration, hw.idle_w + (hw.tdp_w - hw.idle_w) * utilisation)

    def kv_num_blocks(self, block_size: int) -> int:
        return self.kv_cache_bytes // (self.kv_bytes_per_token * block_size)


# --- the command ------------------------------------------------------------------------------


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """The engine to measure (shared with `bench fidelity`)."""
    p.add_argument("--model", help="checkpoint folder (default: the built-in tiny model)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", choices=list(DTYPES), help="compute dtype (default: float32 on cpu, bfloat16 on cuda)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads, fixed for the whole run (default 1: steadier on a shared machine)")
    p.add_argument("--block-size", type=int, default=CacheConfig.block_size)
    p.add_argument("--num-blocks", type=int, default=4096, help="KV cache blocks")
    p.add_argument("--clock", choices=list(CLOCKS), default="wall",
                   help="wall: elapsed time; cpu: the engine thread's CPU time, as if it had a core to "
                        "itself (steady on a busy machine)")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_engine_arguments(p)
    p.add_argument("--out", type=Path, default=Path("step_profile.json"), help="profile file to write")
    p.add_argument("--repeats", type=int, default=ProfileGrid.repeats, help="passes over the grid (timed steps per point)")
    p.add_argument("--warmup", type=int, default=ProfileGrid.warmup, help="untimed steps before each timed one")
    p.add_argument("--quick", action="store_true", help="a small grid (a few seconds; for smoke tests)")


QUICK_GRID = ProfileGrid(prefill_lengths=(8, 32, 64), prefill_contexts=(0, 32), decode_batches=(1, 4),
                         decode_contexts=(16, 48), mixed=((2, 16),), joins=(2,), warmup=1, repeats=2,
                         slowdown_steps=32, decode_settle_s=0.0)


def engine_config(args: argparse.Namespace) -> EngineConfig:
    model_dir = args.model or str(ensure_tiny_model())
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    return EngineConfig.from_pretrained(
        model_dir,
        served_model_name="" if args.model else TINY_MODEL_NAME,
        device=args.device,
        dtype=args.dtype or ("float32" if args.device == "cpu" else "bfloat16"),
        cache=CacheConfig(block_size=args.block_size, num_blocks=args.num_blocks),
    )


def grid_of(args: argparse.Namespace) -> ProfileGrid:
    if args.quick:
        return QUICK_GRID
    return ProfileGrid(repeats=args.repeats, warmup=args.warmup)


def run_profile(config: EngineConfig, grid: ProfileGrid, threads: int,
                runner: ShapeRecordingRunner | None = None, clock: str = "wall") -> Profile:
    """Profile with a progress bar on the terminal, drawn between grid points only: a bar that
    refreshes itself does so from a thread of its own, waking ten times a second to take the GIL
    and, with another process on the second core, the engine's own core in the middle of timed
    steps, where no such thread runs beside a live engine."""
    with Progress(TextColumn("profiling {task.description:8}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), transient=True, auto_refresh=False) as progress:
        task = progress.add_task("", total=(grid.num_points + 1) * grid.repeats)

        def advance(kind: str) -> None:
            progress.update(task, advance=1, description=kind)
            progress.refresh()

        return profile_engine(config, grid, threads, runner, clock, advance)


UNITS = dict(zip(FEATURES, ("s/step", "s/token", "s/attention pair", "s/KV token read", "s/sampled row",
                             "s/prefill chunk", "s/step of more than one token", "s/step with decode rows",
                             "s/token a prefill chunk gathers", "s/prefill chunk after a cached prefix",
                             "s/step with a first decode"), strict=True))
"""How `describe` names each fitted coefficient."""


def describe(profile: Profile) -> str:
    terms = ", ".join(f"{c:.3g} {UNITS[name]}" for c, name in zip(profile.fit.coefficients, FEATURES))
    return (f"{len(profile.points)} grid points in {profile.wall_s:.1f} s ({profile.engine.get('clock')} clock); "
            f"step time = {terms} "
            f"(rms relative error {profile.fit.rms_relative_error:.1%})"
            + (f"; slowdown over {len(profile.slowdown.seconds)} reference steps: p10 "
               f"{profile.slowdown.quantile(0.1):.2f}, p90 {profile.slowdown.quantile(0.9):.2f} of the mean"
               if profile.slowdown else ""))


def main(args: argparse.Namespace) -> int:
    config = engine_config(args)
    profile = run_profile(config, grid_of(args), args.threads, clock=args.clock)
    profile.save(args.out)
    print(f"{config.name} on {config.device} ({profile.engine['threads']} threads): {describe(profile)}")
    print(f"profile written to {args.out}")
    return 0
