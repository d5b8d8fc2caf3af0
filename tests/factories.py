"""Small helpers that build what tests need in one call: random checkpoints, tokenizers.

`make_checkpoint` writes a tiny random-initialised model with Hugging Face transformers itself,
so a test can compare our engine with the reference implementation on the very same folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tokenfactory.engine.tiny import TINY_ASSETS_DIR, TOKENIZER_FILES
from tokenfactory.engine.tokenizer import Tokenizer

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
}

LLAMA3_ROPE_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 256,
}
"""A `rope_scaling` override for a Llama-3.1 style checkpoint (fits max_position_embeddings 2048)."""

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
"""The layer shape of every tiny test model (transformers config fields)."""


def tiny_tokenizer() -> Tokenizer:
    """The shipped ChatML tokenizer of the tiny model (vocab 4096)."""
    return Tokenizer.from_pretrained(TINY_ASSETS_DIR)


def make_checkpoint(path: str | Path, arch: str = "llama", seed: int = 0, **config_overrides: Any) -> Path:
    """Write a small random model in the Hugging Face layout into `path` and return it.

    Llama: hidden 64, 2 layers, 4 heads, 2 KV heads, intermediate 128. Qwen2: the same shape
    with q/k/v biases and tied embeddings. Biases and norm weights are randomised too (HF
    initialises them to 0 and 1), so a loader that drops them gives different logits.
    `config_overrides` go to the transformers config (e.g. `rope_scaling=LLAMA3_ROPE_SCALING`).
    The tiny model's tokenizer files are copied in and `vocab_size` matches them.
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown arch {arch!r}; choose from {', '.join(ARCHITECTURES)}")
    config_cls, model_cls = ARCHITECTURES[arch]
    tokenizer = tiny_tokenizer()
    eos = [tokenizer.token_to_id("<|im_end|>"), tokenizer.token_to_id("<|endoftext|>")]
    fields: dict[str, Any] = {
        "vocab_size": tokenizer.vocab_size,
        **TINY_SHAPE,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "bos_token_id": eos[1],
        "eos_token_id": eos,
        "pad_token_id": eos[1],
        "tie_word_embeddings": arch == "qwen2",
        **config_overrides,
    }
    config = config_cls(**fields)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    _randomise_biases_and_norms(model)
    out = Path(path)
    model.save_pretrained(out, safe_serialization=True)
    _write_classic_rope_fields(out / "config.json", fields)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY_ASSETS_DIR / name, out / name)
    return out


@torch.no_grad()
def _randomise_biases_and_norms(model: torch.nn.Module) -> None:
    for name, param in model.named_parameters():
        if name.endswith(".bias"):
            param.normal_(0.0, 0.02)
        elif "norm" in name:
            param.normal_(1.0, 0.1)


def _write_classic_rope_fields(config_path: Path, fields: dict[str, Any]) -> None:
    """Store RoPE as most published checkpoints do (`rope_theta`, `rope_scaling` at top level).

    transformers 5 writes a `rope_parameters` dict instead; it still reads the classic fields.
    """
    config = json.loads(config_path.read_text())
    config.pop("rope_parameters", None)
    config["rope_theta"] = fields["rope_theta"]
    if fields.get("rope_scaling"):
        config["rope_scaling"] = fields["rope_scaling"]
    config_path.write_text(json.dumps(config, indent=2) + "\n")
