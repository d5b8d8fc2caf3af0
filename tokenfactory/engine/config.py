"""Frozen, per-component configuration for one worker's engine.

Every field says what it is and its bounds; `__post_init__` rejects bad values loudly.
Nothing here does I/O on construction except `ModelConfig.from_pretrained`, which reads one
`config.json` and says clearly what is wrong with it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class ConfigError(ValueError):
    """A configuration or checkpoint the engine cannot use; the message says why."""


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3.1 style RoPE frequency scaling (`rope_type: llama3`); None means plain RoPE."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a Llama-family decoder, read from a Hugging Face `config.json`."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    attention_bias: bool = False
    """q/k/v projections carry a bias (Qwen2)."""
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    torch_dtype: str = "float32"
    """The dtype the checkpoint was saved in (the engine may run in another)."""

    def __post_init__(self) -> None:
        if self.architecture not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"unsupported architecture {self.architecture!r}; "
                f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers, at 2 bytes per value."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 2

    @classmethod
    def from_dict(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        if not archs:
            raise ConfigError("config.json names no architecture ('architectures' is missing)")
        arch = archs[0]
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            # transformers >= 5 writes rope_theta and rope_scaling together as `rope_parameters`.
            rope = cfg.get("rope_parameters") or {}
            eos = cfg.get("eos_token_id")
            eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
            return cls(
                architecture=arch,
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_hidden_layers=int(cfg["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope_theta=float(cfg.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=_parse_rope_scaling(cfg.get("rope_scaling") or rope),
                # Qwen2 always has q/k/v bias; Llama and Mistral say so with attention_bias.
                attention_bias=bool(cfg.get("attention_bias", arch == "Qwen2ForCausalLM")),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
                torch_dtype=str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32"),
            )
        except KeyError as e:
            raise ConfigError(f"config.json lacks the required field {e.args[0]!r}") from None

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        if not path.is_file():
            raise ConfigError(f"no config.json in {model_dir}")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path} is not valid JSON: {e}") from None


def _parse_rope_scaling(raw: dict | None) -> RopeScaling | None:
    if not raw:
        return None
    kind = raw.get("rope_type") or raw.get("type")
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (supported: llama3)")
    return RopeScaling(
        factor=float(raw["factor"]),
        low_freq_factor=float(raw.get("low_freq_factor", 1.0)),
        high_freq_factor=float(raw.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(raw["original_max_position_embeddings"]),
    )


@dataclass(frozen=True)
class CacheConfig:
    """The paged KV cache of one worker."""

    block_size: int = 16
    """Tokens per KV block (1..256); prefix caching works at this granularity."""
    num_blocks: int | None = None
    """Blocks to allocate; None sizes the cache from `memory_bytes`."""
    memory_bytes: int = 512 * 2**20
    """KV memory budget when num_blocks is None (bytes)."""
    enable_prefix_caching: bool = True
    """Reuse KV blocks of identical prompt prefixes across requests."""

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 256:
            raise ConfigError(f"block_size must be in 1..256, got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ConfigError(f"num_blocks must be positive, got {self.num_blocks}")


@dataclass(frozen=True)
class SchedulerConfig:
    """Continuous batching limits of one worker."""

    max_num_batched_tokens: int = 2048
    """Token budget of one step (prefill chunks plus decodes), >= 1."""
    max_num_seqs: int = 128
    """Most requests running at once, >= 1."""
    long_prefill_token_threshold: int = 0
    """A single request's prefill chunk is capped at this many tokens; 0 means no cap."""
    enable_chunked_prefill: bool = True
    """Split prompts longer than the remaining budget across steps."""

    def __post_init__(self) -> None:
        if self.max_num_batched_tokens < 1:
            raise ConfigError("max_num_batched_tokens must be at least 1")
        if self.max_num_seqs < 1:
            raise ConfigError("max_num_seqs must be at least 1")


DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}
"""Compute dtypes by name, with their bytes per element (torch loads only where tensors are made)."""


@dataclass(frozen=True)
class EngineConfig:
    """Everything one worker's engine needs; built once, passed down, never mutated."""

    model_path: str
    """A local checkpoint folder in the Hugging Face layout."""
    model: ModelConfig
    served_model_name: str = ""
    """The name clients use in `model`; defaults to the folder name."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    device: str = "cpu"
    """"cpu" or "cuda" (or "cuda:N")."""
    dtype: str = "float32"
    """Compute dtype: float32 or bfloat16 on the CPU; bfloat16 or float16 on CUDA."""
    load_format: str = "auto"
    """"auto" reads safetensors; "dummy" fills weights from `seed` (benchmarking shapes)."""
    seed: int = 0
    max_model_len: int = 0
    """Context window (prompt plus output); 0 means the model's max_position_embeddings."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.load_format not in ("auto", "dummy"):
            raise ConfigError(f"load_format must be 'auto' or 'dummy', got {self.load_format!r}")
        if not (self.device == "cpu" or self.device.startswith("cuda")):
            raise ConfigError(f"device must be 'cpu' or 'cuda[:N]', got {self.device!r}")

    @property
    def torch_dtype(self) -> torch.dtype:
        import torch

        return getattr(torch, self.dtype)

    @property
    def context_len(self) -> int:
        return self.max_model_len or self.model.max_position_embeddings

    @property
    def name(self) -> str:
        return self.served_model_name or Path(self.model_path).name

    @classmethod
    def from_pretrained(cls, model_path: str | Path, **overrides) -> EngineConfig:
        return cls(model_path=str(model_path), model=ModelConfig.from_pretrained(model_path), **overrides)
