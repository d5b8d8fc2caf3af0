"""A roofline cost model of one engine step: its duration and power on given hardware.

A step runs two kinds of kernels one after the other in every layer: the dense projections
(GEMMs over all the step's tokens, streaming the weights) and attention (each chunk against its
own context, streaming the KV cache). Each kind is bound by its own roof, and since they do not
overlap their times add. Per step and per GPU of a tensor-parallel group:
    time  = max(GEMM FLOPs / (peak x compute_efficiency), weight bytes / (HBM x bandwidth_efficiency))
          + max(attention FLOPs / (peak x compute_efficiency), KV bytes / (HBM x kv_bandwidth_efficiency))
          + all-reduce time + a fixed per-step overhead (kernel launches, scheduling, sampling)
    GEMM FLOPs = 2 x layer params x tokens + 2 x lm_head params x sampled rows
    weight bytes: read once per step; KV bytes: read for every chunk's context, plus written
Attention FLOPs count QK^T and PV: 4 x layers x heads x head_dim per (query, key) pair; a chunk
of n tokens after s computed ones has n*s + n(n+1)/2 pairs (quadratic for prefill, linear per
decode token). One roof over the whole step (the max of all FLOPs and all bytes) would let a
mixed step hide its decodes' KV reads under its prefill's GEMMs, which a GPU running the kernels
in sequence cannot do. Power is idle + (TDP - idle) x utilisation, the utilisation being the share
of the step spent at the roofs (a GPU running its kernels as fast as they go draws about TDP; the
fixed overhead and all-reduces draw about idle).

A stretch of pure-decode steps (the same sequences, one more context token each per step) is
priced in closed form: the GEMM term is the same every step, and each attention roof is affine in
the step number, so the sum over a range of steps is a constant times the count plus two
arithmetic series split where the attention roofs cross (`CostModel.decode_stretch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, ClassVar

from tokenfactory.engine.config import ModelConfig
from tokenfactory.engine.outputs import prefill_gather_blocks, shared_decode_blocks
from tokenfactory.twin.hardware import Hardware

if TYPE_CHECKING:
    from tokenfactory.engine.outputs import SchedulerOutput

PRECISION_BYTES = {"bf16": 2, "fp8": 1}
"""Bytes per weight and per KV value; fp8 means fp8 weights and an fp8 KV cache."""

LLAMA_3_8B = {
    "architectures": ["LlamaForCausalLM"],
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "max_position_embeddings": 131072,
    "rope_theta": 500000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    },
    "tie_word_embeddings": False,
    "eos_token_id": [128001, 128008, 128009],
}
"""Llama-3.1-8B's shape (128k context, so long Mooncake prompts fit): the twin's default model."""


LLAMA_3_70B = {
    **LLAMA_3_8B,
    "hidden_size": 8192,
    "intermediate_size": 28672,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
}
"""Llama-3.1/3.3-70B's shape (same vocabulary, context and 8 KV heads as the 8B)."""


def default_model() -> ModelConfig:
    return ModelConfig.from_dict(LLAMA_3_8B)


@dataclass(frozen=True, slots=True)
class StepCost:
    duration_s: float
    power_w: float
    """Average power of the whole tensor-parallel group during the step."""

    @property
    def energy_j(self) -> float:
        return self.duration_s * self.power_w


@dataclass(frozen=True, slots=True)
class StretchCost:
    """Consecutive steps priced together."""

    num_steps: int
    duration_s: float
    energy_j: float


@dataclass(frozen=True, slots=True)
class BatchShape:
    """A step reduced to the sums the roofline needs (the simulator builds it in one pass)."""

    num_tokens: int
    """Tokens computed this step (prefill chunks plus one per decode)."""
    attention_pairs: int
    """(query, key) pairs over all chunks: sum of n*s + n(n+1)/2."""
    kv_read_tokens: int
    """Context tokens whose KV is read: sum of s + n over chunks."""
    num_sampled: int
    """Chunks that reach the end of their request and sample a token (they run the lm_head)."""
    num_prefill_chunks: int = 0
    """Chunks of more than one token: each takes the model runner's prefill path (its own
    attention call per layer, with a mask after a cached prefix). The roofline does not price
    it; a profile's fit does (per chunk, measured)."""
    num_decode_rows: int = 0
    """Chunks of one token: together they take the runner's decode path (block tables, a padded
    mask, one attention call per layer), which a step without any skips. The roofline does not
    price it; a profile's fit does (per step that has one, measured)."""
    num_first_decodes: int = 0
    """Decode rows making their request's first decode (the row just joined the batch from its
    prefill). On this CPU a step with one costs about 0.45 ms more than the same rows a step later.
    The roofline does not price it; a profile's fit does (per step that has one, measured)."""
    decode_extra_pairs: int = 0
    """(query, key) pairs this engine's model runner computes for its decode rows beyond their
    contexts: it pads every row to the longest row's own blocks (one batched attention call).
    Counted only when asked (`step_shape`'s `runner_block_size`): GPU kernels attend each row's
    own context, so the roofline never reads it; a profile of this engine prices it."""
    decode_extra_reads: int = 0
    """Key positions that runner reads beyond the decode rows' contexts: the same padding, less
    the blocks all rows share (read once for the batch), so it can be negative."""
    prefill_gathered_tokens: int = 0
    """Key positions that runner gathers from the paged cache for prefill chunks after a cached
    prefix (whole blocks up to the chunk's end; a chunk from a prompt's start needs none). Counted
    only with `runner_block_size`, like the decode padding."""
    num_prefill_gathers: int = 0
    """Prefill chunks after a cached prefix: each builds its block table and offset mask and
    takes the runner's masked attention path, a fixed cost beside the gather's per-token one.
    Counted only with `runner_block_size`, like the decode padding."""


@dataclass(frozen=True)
class CostModel:
    model: ModelConfig
    hardware: Hardware
    precision: str = "bf16"
    tp: int = 1
    counts_runner_work: ClassVar[bool] = False
    """Whether the simulator must count this engine's model runner's own work (its decode padding
    and prefill gathers, `BatchShape`): not for GPU kernels, which attend each row's own context."""
    # Where the factors come from (`tokenfactory bench twin --calibration` prints the check): NVIDIA's
    # published TensorRT-LLM throughput of one H200 (FP8, offline; twin_bench.ANCHORS), replayed
    # with the batch limits and CUDA graphs those runs had. Two Llama-3.1-8B anchors, each bound
    # mostly by one roof, set the two factors below; the ten other anchors (8B and 70B, 128 to
    # 20,000 prompt tokens) are predictions, all within 0.96-1.12 of the published figures. One
    # compute efficiency fits both sizes: the 70B's old shortfall (0.70) came from running twice
    # the batch its KV cache holds and recomputing the preempted prompts, not from its GEMMs.
    compute_efficiency: float = 0.52
    """Fraction of peak dense FLOP/s that the GEMMs and attention's matmuls reach end to end,
    the elementwise kernels between them (norms, activation, FP8 quantisation) included. From the
    prefill-bound anchor (Llama-3.1-8B, 2048 in / 128 out, 3,538 output tok/s: 27.6 prompts of
    2048 tokens a second, about 0.9 PFLOP/s of GEMMs plus the decodes' KV reads on top); FP8 GEMM
    benchmarks on Hopper reach 60-70% of the dense peak on large shapes, before those kernels."""
    bandwidth_efficiency: float = 0.8
    """Fraction of peak HBM bandwidth reached streaming the weights (large contiguous reads, as
    memory-copy benchmarks reach 80-90% of peak): an estimate no anchor contradicts."""
    kv_bandwidth_efficiency: float = 0.75
    """Fraction of peak HBM bandwidth reached by attention reading and writing the paged KV cache
    (scattered 16-token blocks, uneven sequence lengths, FP8 dequantisation). From the
    decode-bound anchor (Llama-3.1-8B, 1000 / 1000, 17,744 tok/s: about 950 sequences at once,
    reading some 90 GB of KV a step), below the weights' contiguous 0.8."""
    step_overhead_s: float = 3e-4
    """Per step: launches, sampling, the scheduler; mostly hidden by CUDA graphs, not entirely
    (an estimate: the live engine's profile, `twin profile`, measures its own)."""
    activation_reserve: float = 0.1
    """Fraction of the memory left after the weights kept for activations, CUDA context and
    fragmentation: the KV cache gets the rest, as TensorRT-LLM's kv_cache_free_gpu_mem_fraction
    (default 0.9) gives it."""
    graph_batch_sizes: tuple[int, ...] = ()
    """Batch sizes at which the engine captured CUDA graphs for decode-only steps: such a step
    runs the graph of the next size up, so its GEMMs compute the padding rows too (their
    attention reads next to nothing). A batch above the largest runs unpadded; () pads nothing.
    TensorRT-LLM pads this way (`cuda_graph_config.enable_padding`), vLLM to its capture sizes."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {self.precision!r}")
        if self.tp < 1 or self.model.num_key_value_heads % self.tp and self.tp % self.model.num_key_value_heads:
            raise ValueError(f"tp={self.tp} does not divide the model's {self.model.num_key_value_heads} KV heads")
        # Above 1 a step could beat its hardware's peak.
        for name in ("compute_efficiency", "bandwidth_efficiency", "kv_bandwidth_efficiency"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}")

    # --- shape of the model (cached: fixed by the fields, read by every step) ---------------

    @cached_property
    def layer_params(self) -> int:
        """Parameters in the decoder layers (attention and MLP projections)."""
        m = self.model
        q_and_o = 2 * m.hidden_size * m.num_attention_heads * m.head_dim
        k_and_v = 2 * m.hidden_size * m.num_key_value_heads * m.head_dim
        mlp = 3 * m.hidden_size * m.intermediate_size
        return m.num_hidden_layers * (q_and_o + k_and_v + mlp)

    @cached_property
    def lm_head_params(self) -> int:
        return self.model.hidden_size * self.model.vocab_size

    @cached_property
    def total_params(self) -> int:
        embeddings = 0 if self.model.tie_word_embeddings else self.lm_head_params
        return self.layer_params + self.lm_head_params + embeddings

    @cached_property
    def weight_bytes(self) -> float:
        return self.total_params * PRECISION_BYTES[self.precision]

    @cached_property
    def kv_bytes_per_token(self) -> int:
        """K and V of one token over all layers (the whole group, before the TP split)."""
        m = self.model
        return 2 * m.num_hidden_layers * m.num_key_value_heads * m.head_dim * PRECISION_BYTES[self.precision]

    def kv_capacity_tokens(self) -> int:
        """Tokens of KV the group can hold: (HBM x TP - weights) x (1 - reserve) / KV bytes per token."""
        hbm = self.hardware.hbm_capacity * self.tp
        free = (hbm - self.weight_bytes) * (1 - self.activation_reserve)
        if free <= 0:
            raise ValueError(
                f"{self.weight_bytes / 1e9:.1f} GB of weights do not fit {self.tp} x "
                f"{self.hardware.name} ({hbm / 1e9:.0f} GB with a {self.activation_reserve:.0%} reserve)"
            )
        return int(free // self.kv_bytes_per_token)

    def kv_num_blocks(self, block_size: int) -> int:
        return self.kv_capacity_tokens() // block_size

    # --- a step -----------------------------------------------------------------------------

    def kernel_roofs(self, batch: BatchShape) -> tuple[tuple[float, float], tuple[float, float]]:
        """((GEMM compute s, weight streaming s), (attention compute s, KV streaming s)) of a
        step, efficiencies applied: each kind of kernel takes the larger of its pair, and the
        step the sum of both (plus `fixed_s`)."""
        hw, tp = self.hardware, self.tp
        peak, bandwidth = hw.peak_flops(self.precision) * tp * self.compute_efficiency, hw.hbm_bandwidth * tp
        padding = self._graph_padding(batch.num_tokens) if not batch.num_prefill_chunks else 0
        gemm_flops = (2 * self.layer_params * (batch.num_tokens + padding)
                      + 2 * self.lm_head_params * (batch.num_sampled + padding))
        kv_bytes = self.kv_bytes_per_token * (batch.kv_read_tokens + batch.num_tokens)
        return ((gemm_flops / peak, self._weights_s),
                (self._attention_flops_per_pair * batch.attention_pairs / peak,
                 kv_bytes / (bandwidth * self.kv_bandwidth_efficiency)))

    def fixed_s(self, num_tokens: int) -> float:
        """The part of a step at no roof: all-reduces and the per-step overhead."""
        return self._allreduce_s(num_tokens) + self.step_overhead_s

    def step(self, batch: BatchShape) -> StepCost:
        """Duration and power of one step (all numbers per GPU of the TP group)."""
        (gemm_s, weights_s), (attention_s, kv_s) = self.kernel_roofs(batch)
        roof_s = max(gemm_s, weights_s) + max(attention_s, kv_s)
        duration = roof_s + self.fixed_s(batch.num_tokens)
        utilisation = min(1.0, roof_s / duration)
        hw = self.hardware
        return StepCost(duration, self.tp * (hw.idle_w + (hw.tdp_w - hw.idle_w) * utilisation))

    def _graph_padding(self, num_decodes: int) -> int:
        """Rows a decode-only step of `num_decodes` runs beyond them (`graph_batch_sizes`)."""
        return min((size for size in self.graph_batch_sizes if size >= num_decodes), default=num_decodes) - num_decodes

    @cached_property
    def _weights_s(self) -> float:
        """Streaming the weights once: the GEMMs' bandwidth roof."""
        return self.weight_bytes / (self.hardware.hbm_bandwidth * self.tp * self.bandwidth_efficiency)

    @cached_property
    def _attention_flops_per_pair(self) -> int:
        m = self.model
        return 4 * m.num_hidden_layers * m.num_attention_heads * m.head_dim

    def decode_stretch(self, first: BatchShape, max_steps: int, time_limit_s: float = math.inf) -> StretchCost:
        """The pure-decode steps that follow `first` (a decode-only step: one token per sequence),
        each sequence one token longer per step: as many as end strictly within `time_limit_s`,
        at most `max_steps`. The same sums as pricing each step with `step`, in O(log steps)."""
        hw, tp, n = self.hardware, self.tp, first.num_tokens
        peak, bandwidth = hw.peak_flops(self.precision) * tp, hw.hbm_bandwidth * tp
        ce, ke = self.compute_efficiency, self.kv_bandwidth_efficiency
        # Every step: the same GEMMs. Step k (k >= 1 after `first`): attention compute a0 + a1 k
        # (n more pairs a step) against KV streaming kv0 + kv1 k (n more tokens a step).
        padding = self._graph_padding(n)
        gemm = max((2 * self.layer_params * (n + padding) + 2 * self.lm_head_params * (first.num_sampled + padding))
                   / (peak * ce), self._weights_s)
        a0 = self._attention_flops_per_pair * first.attention_pairs / (peak * ce)
        a1 = self._attention_flops_per_pair * n / (peak * ce)
        kv0 = self.kv_bytes_per_token * (first.kv_read_tokens + n) / (bandwidth * ke)
        kv1 = self.kv_bytes_per_token * n / (bandwidth * ke)
        fixed = self.fixed_s(n)

        def roof(steps: int) -> float:
            return gemm * steps + _sum_max_affine(a0, a1, kv0, kv1, 1, steps)

        def duration(steps: int) -> float:
            return roof(steps) + fixed * steps

        low, high = 0, max(0, max_steps)  # the most steps ending within the limit: binary search
        if duration(high) >= time_limit_s:
            while low < high:
                middle = (low + high + 1) // 2
                if duration(middle) < time_limit_s:
                    low = middle
                else:
                    high = middle - 1
        steps = high
        total = duration(steps)
        # energy = duration x power = tp x (idle x duration + (tdp - idle) x time at the roofs)
        return StretchCost(steps, total, tp * (hw.idle_w * total + (hw.tdp_w - hw.idle_w) * roof(steps)))

    def _allreduce_s(self, num_tokens: int) -> float:
        """Two ring all-reduces of the activations per layer (after attention and after MLP)."""
        if self.tp == 1:
            return 0.0
        size = num_tokens * self.model.hidden_size * 2  # bf16 activations
        per_allreduce = 2 * (self.tp - 1) / self.tp * size / self.hardware.interconnect_bandwidth
        return 2 * self.model.num_hidden_layers * per_allreduce

    def batch_cost(self, prefills: Iterable[tuple[int, int]] = (), decodes: Iterable[int] = ()) -> StepCost:
        """A step from its parts: `prefills` as (tokens to compute, tokens already computed),
        `decodes` as the context length of each decoding sequence. Every part samples."""
        chunks = [*prefills, *((1, context) for context in decodes)]
        return self.step(shape_of(chunks))


def _sum_affine(c0: float, c1: float, first: int, last: int) -> float:
    """sum of c0 + c1 k for k = first..last (0 for an empty range)."""
    count = last - first + 1
    return c0 * count + c1 * (first + last) * count / 2 if count > 0 else 0.0


def _sum_max_affine(a0: float, a1: float, b0: float, b1: float, first: int, last: int) -> float:
    """sum of max(a0 + a1 k, b0 + b1 k) for k = first..last: one series on each side of the crossing."""
    if a1 == b1:
        return _sum_affine(max(a0, b0), a1, first, last)
    if a1 < b1:  # make `a` the one that wins for large k
        a0, a1, b0, b1 = b0, b1, a0, a1
    crossing = math.floor((b0 - a0) / (a1 - b1))  # b wins up to here, a after
    split = min(max(crossing, first - 1), last)
    return _sum_affine(b0, b1, first, split) + _sum_affine(a0, a1, split + 1, last)


def step_shape(sched: SchedulerOutput, runner_block_size: int | None = None) -> BatchShape:
    """A scheduled step as the twin prices it (read before the scheduler updates the requests,
    so contexts are the step's own). With `runner_block_size`, what this engine's model runner
    does beyond that is counted too: the decode rows' padding and the prefill chunks' gathers
    (`BatchShape.decode_extra_pairs` and after)."""
    num_tokens = pairs = kv_read = num_sampled = num_prefill = num_first = 0
    for chunk in sched.chunks:
        n, start = chunk.num_tokens, chunk.request.num_computed_tokens
        num_tokens += n
        pairs += n * start + n * (n + 1) // 2
        kv_read += start + n
        num_sampled += start + n == chunk.request.num_tokens
        num_prefill += n > 1
        num_first += n == 1 and chunk.request.num_output_tokens == 1
    num_decodes = len(sched.chunks) - num_prefill
    extra_pairs = extra_reads = gathered = gathers = 0
    bs = runner_block_size
    if bs is not None and num_prefill:
        blocks = [b for c in sched.chunks if c.num_tokens > 1 and (b := prefill_gather_blocks(c, bs))]
        gathered, gathers = sum(blocks) * bs, len(blocks)
    if bs is not None and num_decodes:
        decodes = [c for c in sched.chunks if c.num_tokens == 1]
        shared = shared_decode_blocks(decodes, bs)
        width = max(-(-c.end // bs) for c in decodes) - shared  # every row's own blocks, padded
        context = sum(c.end for c in decodes)
        extra_pairs = num_decodes * (shared + width) * bs - context
        extra_reads = (shared + num_decodes * width) * bs - context
    return BatchShape(num_tokens, pairs, kv_read, num_sampled, num_prefill, num_decodes, num_first,
                      extra_pairs, extra_reads, gathered, gathers)


def shape_of(chunks: Iterable[tuple[int, int]]) -> BatchShape:
    """The BatchShape of chunks given as (tokens to compute, tokens already computed), all sampling."""
    num_tokens = pairs = kv_read = count = num_prefill = 0
    for n, start in chunks:
        num_tokens += n
        pairs += n * start + n * (n + 1) // 2
        kv_read += start + n
        count += 1
        num_prefill += n > 1
    return BatchShape(num_tokens, pairs, kv_read, count, num_prefill, count - num_prefill)
