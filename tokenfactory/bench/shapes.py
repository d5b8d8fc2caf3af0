"""Model shapes for dummy-weight benchmarks: a `config.json` without a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

SHAPES: dict[str, dict] = {
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256,
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
        "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
        "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128009,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    },
}


def write_shape(name: str, folder: Path) -> Path:
    """Write the shape's config.json into `folder` (a checkpoint folder with no weights)."""
    (folder / "config.json").write_text(json.dumps(SHAPES[name], indent=2))
    return folder
