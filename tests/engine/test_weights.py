"""Checkpoint loading: single and sharded files, tied heads, clear errors, dummy weights."""

from __future__ import annotations

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.engine.model_runner import ModelRunner
from tokenfactory.engine.outputs import ScheduledChunk
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.weights import WeightsError
from tests.factories import TINY_SHAPE

TINY = dict(
    **TINY_SHAPE,
    vocab_size=256,
    max_position_embeddings=128,
)
CACHE = CacheConfig(block_size=4, num_blocks=8)


def save_tiny(path, tied: bool = False, **save_kwargs) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    if tied:
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**TINY, tie_word_embeddings=True))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY))
    hf.save_pretrained(path, safe_serialization=True, **save_kwargs)
    return hf.state_dict()


def runner_for(path, **overrides) -> ModelRunner:
    return ModelRunner(EngineConfig.from_pretrained(path, cache=CACHE, **overrides))


def assert_same_params(runner: ModelRunner, expected: dict[str, torch.Tensor]) -> None:
    ours = runner.model.state_dict()
    for name, tensor in expected.items():
        torch.testing.assert_close(ours[name].float(), tensor.float(), atol=0, rtol=0)


def test_sharded_checkpoint_loads_every_tensor(tmp_path):
    expected = save_tiny(tmp_path, max_shard_size="40KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
    assert_same_params(runner_for(tmp_path), expected)


def test_tied_embeddings_share_one_tensor(tmp_path):
    expected = save_tiny(tmp_path, tied=True)
    runner = runner_for(tmp_path)
    assert runner.model.lm_head.weight is runner.model.model.embed_tokens.weight
    assert_same_params(runner, expected)


def test_weights_convert_to_engine_dtype(tmp_path):
    expected = save_tiny(tmp_path)
    runner = runner_for(tmp_path, dtype="bfloat16")
    weight = runner.model.model.layers[1].mlp.down_proj.weight
    assert weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight, expected["model.layers.1.mlp.down_proj.weight"].bfloat16())


def rewrite_checkpoint(path, edit) -> None:
    tensors = load_file(path / "model.safetensors")
    edit(tensors)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor_is_named(tmp_path):
    save_tiny(tmp_path)
    rewrite_checkpoint(tmp_path, lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    missing = r"lacks tensors: model\.layers\.1\.self_attn\.k_proj\.weight"
    with pytest.raises(WeightsError, match=missing):
        runner_for(tmp_path)


def test_wrong_shape_names_both_shapes(tmp_path):
    save_tiny(tmp_path)

    def shrink(tensors):
        tensors["model.norm.weight"] = torch.ones(32)

    rewrite_checkpoint(tmp_path, shrink)
    with pytest.raises(WeightsError, match=r"model\.norm\.weight.*\(32,\).*expects \(64,\)"):
        runner_for(tmp_path)


def test_folder_without_safetensors_is_rejected(tmp_path):
    save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(WeightsError, match="no safetensors files"):
        runner_for(tmp_path)


def test_dummy_weights_are_deterministic_and_finite(tmp_path):
    save_tiny(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # dummy needs only the config
    runner = runner_for(tmp_path, load_format="dummy", seed=3)
    first = runner.model.state_dict()
    again = runner_for(tmp_path, load_format="dummy", seed=3).model.state_dict()
    other = runner_for(tmp_path, load_format="dummy", seed=4).model.state_dict()
    for name, tensor in first.items():
        assert torch.equal(tensor, again[name]), name
    assert not torch.equal(first["model.embed_tokens.weight"], other["model.embed_tokens.weight"])
    assert torch.equal(first["model.norm.weight"], torch.ones(64))
    assert 0.01 < first["model.layers.0.mlp.up_proj.weight"].std() < 0.05
    prompt = Request("r", list(range(20)), SamplingParams())
    logits, _ = runner.compute_logits([ScheduledChunk(prompt, 20, [1, 2, 3, 4, 5])])
    assert torch.isfinite(logits).all()
