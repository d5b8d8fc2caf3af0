"""Fill a model's parameters: from a local Hugging Face safetensors checkpoint, or from a seed.

Names map one to one (our model uses Hugging Face's parameter names); tensors are converted to
the parameter's dtype and device as they are copied in. A tied LM head shares the embedding
parameter, so it is loaded once under `model.embed_tokens.weight`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from tokenfactory.engine.config import ConfigError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DUMMY_STD = 0.02
"""Std of dummy weights: small enough that activations stay finite through many layers."""


class WeightsError(ConfigError):
    """A checkpoint that does not fit the model; the message names the file and tensor."""


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    root = Path(model_dir)
    index = root / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return [root / name for name in sorted(set(weight_map.values()))]
    if (root / SINGLE_FILE).is_file():
        return [root / SINGLE_FILE]
    files = sorted(root.glob("*.safetensors"))
    if not files:
        raise WeightsError(f"no safetensors files in {root} (expected {SINGLE_FILE} or {INDEX_FILE})")
    return files


def _iter_tensors(files: list[Path]) -> Iterator[tuple[str, Path, torch.Tensor]]:
    for path in files:
        if not path.is_file():
            raise WeightsError(f"checkpoint shard {path} is listed in {INDEX_FILE} but missing")
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():
                yield name, path, f.get_tensor(name)


def _ignored(name: str, params: dict[str, nn.Parameter]) -> bool:
    # Rotary inverse frequencies are recomputed; a tied checkpoint may still store lm_head.
    return name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and name not in params)


@torch.no_grad()
def load_checkpoint(model: nn.Module, model_dir: str | Path) -> None:
    """Copy every parameter from the checkpoint in `model_dir`; raise WeightsError if any is
    missing or has the wrong shape."""
    params = dict(model.named_parameters())  # shared (tied) parameters appear once
    loaded: set[str] = set()
    for name, path, tensor in _iter_tensors(checkpoint_files(model_dir)):
        if _ignored(name, params) or name not in params:
            continue
        param = params[name]
        if tensor.shape != param.shape:
            raise WeightsError(
                f"tensor {name!r} in {path.name} has shape {tuple(tensor.shape)}, "
                f"but the model expects {tuple(param.shape)}"
            )
        param.copy_(tensor)
        loaded.add(name)
    missing = sorted(set(params) - loaded)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WeightsError(f"checkpoint in {model_dir} lacks tensors: {shown}")


@torch.no_grad()
def load_dummy(model: nn.Module, seed: int) -> None:
    """Deterministic random weights from `seed`: normal(0, DUMMY_STD), norm weights 1, biases 0.

    Drawn on the CPU in float32 in name order, so every device and dtype gets the same values.
    """
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if name.endswith("norm.weight"):
            param.fill_(1.0)
        elif name.endswith(".bias"):
            param.zero_()
        else:
            param.copy_(torch.randn(param.shape, generator=gen) * DUMMY_STD)
