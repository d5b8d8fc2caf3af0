"""The built-in tiny model: what `tokenfactory serve` runs with no arguments, with nothing downloaded.

A small Llama with deterministic random weights and the ChatML tokenizer shipped in
`tokenfactory/assets/tiny/`. Its text is gibberish, but it exercises every part of the factory
(tokenizer, chat template, paged KV cache, batching, streaming) on a laptop CPU. It is written
once into a cache folder in the Hugging Face layout, so `transformers` can load it too.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

TINY_MODEL_NAME = "tokenfactory-tiny"
TINY_MODEL_VERSION = 1
"""Bump when the weights, config or tokenizer change, so old caches are not reused."""
TINY_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
WEIGHTS_SEED = 0
INIT_STD = 0.02

HIDDEN_SIZE = 256
NUM_LAYERS = 4
NUM_HEADS = 8
NUM_KV_HEADS = 4
HEAD_DIM = 32
INTERMEDIATE_SIZE = 768


def default_cache_dir() -> Path:
    """`$TOKENFACTORY_HOME`, else `~/.cache/tokenfactory`."""
    home = os.environ.get("TOKENFACTORY_HOME")
    return Path(home) if home else Path.home() / ".cache" / "tokenfactory"


def ensure_tiny_model(cache_dir: Path | None = None) -> Path:
    """Return the tiny model's checkpoint folder, writing it first if it is not there yet.

    The folder is built in a temporary sibling and renamed into place, so a process that
    finds it sees it whole, and two processes racing to write it both end up using one copy.
    """
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = root / f"{TINY_MODEL_NAME}-v{TINY_MODEL_VERSION}"
    if (target / "model.safetensors").is_file():
        return target
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=root))
    staging.chmod(0o755)  # mkdtemp makes it private; a shared cache should stay readable
    try:
        _write_checkpoint(staging)
        os.rename(staging, target)
    except OSError as e:
        # Lost the race (the target exists and is not empty): the winner's copy is identical.
        if not (target / "model.safetensors").is_file():
            raise OSError(f"cannot write the tiny model to {target} ({e}); delete that folder and retry") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def tiny_model_config(vocab_size: int, eos_token_ids: list[int], bos_token_id: int | None) -> dict:
    """The Hugging Face `config.json` of the tiny model."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": HIDDEN_SIZE,
        "intermediate_size": INTERMEDIATE_SIZE,
        "num_hidden_layers": NUM_LAYERS,
        "num_attention_heads": NUM_HEADS,
        "num_key_value_heads": NUM_KV_HEADS,
        "head_dim": HEAD_DIM,
        "hidden_act": "silu",
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_ids,
        "pad_token_id": bos_token_id,
        "torch_dtype": "float32",
    }


def tiny_model_weights(config: dict) -> dict[str, torch.Tensor]:
    """Deterministic random weights with Hugging Face Llama parameter names."""
    import torch  # only when the weights are made: a gateway process never needs torch

    gen = torch.Generator().manual_seed(WEIGHTS_SEED)
    hidden, inter, vocab = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_out = config["num_attention_heads"] * config["head_dim"]
    kv_out = config["num_key_value_heads"] * config["head_dim"]

    def normal(*shape: int) -> torch.Tensor:
        return torch.empty(shape).normal_(0.0, INIT_STD, generator=gen)

    weights = {"model.embed_tokens.weight": normal(vocab, hidden)}  # [vocab, hidden]
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        weights[p + "self_attn.q_proj.weight"] = normal(q_out, hidden)
        weights[p + "self_attn.k_proj.weight"] = normal(kv_out, hidden)
        weights[p + "self_attn.v_proj.weight"] = normal(kv_out, hidden)
        weights[p + "self_attn.o_proj.weight"] = normal(hidden, q_out)
        weights[p + "mlp.gate_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.up_proj.weight"] = normal(inter, hidden)
        weights[p + "mlp.down_proj.weight"] = normal(hidden, inter)
        weights[p + "input_layernorm.weight"] = torch.ones(hidden)
        weights[p + "post_attention_layernorm.weight"] = torch.ones(hidden)
    weights["model.norm.weight"] = torch.ones(hidden)
    weights["lm_head.weight"] = normal(vocab, hidden)  # [vocab, hidden]
    return weights


def _write_checkpoint(folder: Path) -> None:
    from safetensors.torch import save_file

    tokenizer = json.loads((TINY_ASSETS_DIR / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    vocab_size = max(len(tokenizer["model"]["vocab"]), max(ids.values()) + 1)
    eos = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    config = tiny_model_config(vocab_size, eos, bos_token_id=ids["<|endoftext|>"])
    save_file(tiny_model_weights(config), str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", config)
    _write_json(
        folder / "generation_config.json",
        {"bos_token_id": config["bos_token_id"], "eos_token_id": eos, "pad_token_id": config["pad_token_id"]},
    )
    for name in TOKENIZER_FILES:
        shutil.copyfile(TINY_ASSETS_DIR / name, folder / name)


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
