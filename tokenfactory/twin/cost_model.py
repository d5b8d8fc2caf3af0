"""A roofline cost model of one engine step: its duration and power on given hardware.

Per step and per GPU of a tensor-parallel group:
    time  = max(FLOPs / (peak x compute_efficiency), bytes / (HBM bandwidth x bandwidth_efficiency))
            + all-reduce time + a fixed per-step overhead (kernel launches, scheduling, sampling)
    FLOPs = 2 x layer params x tokens + 2 x lm_head params x sampled rows + attention FLOPs
    bytes = weights (read once per step) + KV read for every chunk's context + KV written
Attention FLOPs count QK^T and PV: 4 x layers x heads x head_dim per (query, key) pair; a chunk
of n tokens after s computed ones has n*s + n(n+1)/2 pairs (quadratic for prefill, linear per
decode token). Power is idle + (TDP - idle) x utilisation, the utilisation being how close the
step runs to whichever roof binds it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from tokenfactory.engine.config import ModelConfig
from tokenfactory.twin.hardware import Hardware

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


@dataclass(frozen=True)
class CostModel:
    model: ModelConfig
    hardware: Hardware
    precision: str = "bf16"
    tp: int = 1
    compute_efficiency: float = 0.6
    """Fraction of peak FLOP/s real GEMMs and attention kernels reach."""
    bandwidth_efficiency: float = 0.8
    """Fraction of peak HBM bandwidth reached by streaming weights and KV."""
    step_overhead_s: float = 3e-4
    """Per step: launches, sampling, the scheduler; mostly hidden by CUDA graphs, not entirely."""
    activation_reserve: float = 0.1
    """Fraction of each GPU's memory kept for activations, CUDA context and fragmentation."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISION_BYTES:
            raise ValueError(f"precision must be one of {', '.join(PRECISION_BYTES)}, got {self.precision!r}")
        if self.tp < 1 or self.model.num_key_value_heads % self.tp and self.tp % self.model.num_key_value_heads:
            raise ValueError(f"tp={self.tp} does not divide the model's {self.model.num_key_value_heads} KV heads")

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
        """Tokens of KV the group can hold: (HBM x TP - weights - reserve) / KV bytes per token."""
        hbm = self.hardware.hbm_capacity * self.tp
        free = hbm * (1 - self.activation_reserve) - self.weight_bytes
        if free <= 0:
            raise ValueError(
                f"{self.weight_bytes / 1e9:.1f} GB of weights do not fit {self.tp} x "
                f"{self.hardware.name} ({hbm / 1e9:.0f} GB with a {self.activation_reserve:.0%} reserve)"
            )
        return int(free // self.kv_bytes_per_token)

    def kv_num_blocks(self, block_size: int) -> int:
        return self.kv_capacity_tokens() // block_size

    # --- a step -----------------------------------------------------------------------------

    def step(self, batch: BatchShape) -> StepCost:
        """Duration and power of one step (all numbers per GPU of the TP group)."""
        m, hw, tp = self.model, self.hardware, self.tp
        attention_flops = 4 * m.num_hidden_layers * m.num_attention_heads * m.head_dim * batch.attention_pairs
        flops = (
            2 * self.layer_params * batch.num_tokens
            + 2 * self.lm_head_params * batch.num_sampled
            + attention_flops
        ) / tp
        kv_bytes = self.kv_bytes_per_token * (batch.kv_read_tokens + batch.num_tokens)
        bytes_moved = (self.weight_bytes + kv_bytes) / tp
        compute_s = flops / hw.peak_flops(self.precision)
        memory_s = bytes_moved / hw.hbm_bandwidth
        roof_s = max(compute_s / self.compute_efficiency, memory_s / self.bandwidth_efficiency)
        duration = roof_s + self._allreduce_s(batch.num_tokens) + self.step_overhead_s
        utilisation = min(1.0, max(compute_s, memory_s) / duration)
        power = tp * (hw.idle_w + (hw.tdp_w - hw.idle_w) * utilisation)
        return StepCost(duration, power)

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


def shape_of(chunks: Iterable[tuple[int, int]]) -> BatchShape:
    """The BatchShape of chunks given as (tokens to compute, tokens already computed), all sampling."""
    num_tokens = pairs = kv_read = count = 0
    for n, start in chunks:
        num_tokens += n
        pairs += n * start + n * (n + 1) // 2
        kv_read += start + n
        count += 1
    return BatchShape(num_tokens, pairs, kv_read, count)
