import json
import threading

import pytest
import torch
from transformers import AutoTokenizer, LlamaForCausalLM

from tokenfactory.engine.config import EngineConfig
from tokenfactory.engine.tiny import TINY_MODEL_NAME, default_cache_dir, ensure_tiny_model
from tokenfactory.engine.tokenizer import Tokenizer

FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


def test_checkpoint_has_the_hugging_face_layout(tiny_model_dir):
    assert sorted(p.name for p in tiny_model_dir.iterdir()) == sorted(FILES)
    assert tiny_model_dir.name.startswith(TINY_MODEL_NAME)
    config = EngineConfig.from_pretrained(tiny_model_dir).model
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    assert config.architecture == "LlamaForCausalLM"
    assert config.vocab_size == tok.vocab_size == 4096
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (256, 4, 8)
    assert (config.num_key_value_heads, config.head_dim, config.max_position_embeddings) == (4, 32, 4096)
    assert config.eos_token_ids == (tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>"))


def test_written_once_and_deterministic(tiny_model_dir, tmp_path):
    mtime = (tiny_model_dir / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_model(tiny_model_dir.parent) == tiny_model_dir
    assert (tiny_model_dir / "model.safetensors").stat().st_mtime_ns == mtime
    again = ensure_tiny_model(tmp_path)
    for name in FILES:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name


def test_racing_writers_leave_one_whole_copy(tmp_path):
    results = []
    threads = [threading.Thread(target=lambda: results.append(ensure_tiny_model(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(results)) == 1 and len(results) == 3
    assert list(tmp_path.iterdir()) == [results[0]]  # no temporary folders left behind
    assert sorted(p.name for p in results[0].iterdir()) == sorted(FILES)


def test_default_cache_dir_follows_tokenfactory_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TOKENFACTORY_HOME", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("TOKENFACTORY_HOME")
    assert default_cache_dir().parts[-2:] == (".cache", "tokenfactory")


def test_transformers_loads_it(tiny_model_dir):
    model, info = LlamaForCausalLM.from_pretrained(tiny_model_dir, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    # Norms are ones and everything else is small random noise with std 0.02.
    assert torch.equal(model.model.norm.weight, torch.ones(256))
    assert 0.015 < model.lm_head.weight.std().item() < 0.025
    hf_tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    ours = Tokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Make me a token."}]
    prompt = ours.apply_chat_template(messages)
    assert prompt == hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = torch.tensor([ours.encode(prompt)])
    with torch.no_grad():
        logits = model(ids).logits  # [1, seq, vocab]
    assert logits.shape == (1, ids.shape[1], 4096) and torch.isfinite(logits).all()


def test_generation_config_lists_both_eos_ids(tiny_model_dir):
    gen = json.loads((tiny_model_dir / "generation_config.json").read_text())
    tok = Tokenizer.from_pretrained(tiny_model_dir)
    assert gen["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]


@pytest.mark.parametrize("arch", ["llama_dir", "qwen2_dir"])
def test_factory_checkpoints_match_the_tokenizer(arch, request):
    model_dir = request.getfixturevalue(arch)
    config = EngineConfig.from_pretrained(model_dir).model
    assert config.vocab_size == Tokenizer.from_pretrained(model_dir).vocab_size
    assert config.tie_word_embeddings == (arch == "qwen2_dir")
    assert config.attention_bias == (arch == "qwen2_dir")
