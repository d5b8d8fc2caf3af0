"""The whole engine against the reference: greedy tokens identical to `transformers` generate.

Covered paths: plain batched prefill and decode, prefix-cache hits (a second wave of requests
sharing the first wave's prompts), chunked prefill (a token budget smaller than the prompts),
and preemption under a KV cache too small for the whole batch.
"""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from tokenfactory.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from tokenfactory.engine.engine import LLMEngine
from tokenfactory.engine.request import SamplingParams

MAX_NEW = 12


def reference_greedy(model_dir, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([p])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                 min_new_tokens=max_new, do_sample=False, eos_token_id=None,
                                 pad_token_id=0)
            out.append(gen[0, len(p):].tolist())
    return out


def make_prompts(vocab: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    shared = [rng.randrange(3, vocab) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 30))] for _ in range(4)]
    prompts.append([rng.randrange(3, vocab) for _ in range(7)])  # a short one, no shared prefix
    return prompts


def engine_for(model_dir, **overrides) -> LLMEngine:
    defaults = dict(cache=CacheConfig(block_size=8, num_blocks=256))
    return LLMEngine(EngineConfig.from_pretrained(model_dir, **(defaults | overrides)))


def greedy(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    return [c.token_ids for c in engine.generate(prompts, params)]


@pytest.fixture(scope="module", params=["llama_dir", "qwen2_dir"])
def model_case(request):
    model_dir = request.getfixturevalue(request.param)
    engine = engine_for(model_dir)
    prompts = make_prompts(engine.config.model.vocab_size)
    return model_dir, prompts, reference_greedy(model_dir, prompts, MAX_NEW)


def test_greedy_matches_transformers(model_case):
    model_dir, prompts, expected = model_case
    assert greedy(engine_for(model_dir), prompts) == expected


def test_prefix_cache_hits_give_same_tokens(model_case):
    model_dir, prompts, expected = model_case
    engine = engine_for(model_dir)
    assert greedy(engine, prompts[:1]) == expected[:1]
    params = SamplingParams(max_tokens=MAX_NEW, temperature=0.0, ignore_eos=True)
    second = engine.generate(prompts, params)
    assert [c.token_ids for c in second] == expected
    # The shared 40-token prefix (5 full blocks of 8) was served from the cache.
    assert all(c.num_cached_tokens >= 40 for c in second[:4])


def test_chunked_prefill_gives_same_tokens(model_case):
    model_dir, prompts, expected = model_case
    engine = engine_for(model_dir, scheduler=SchedulerConfig(max_num_batched_tokens=16))
    assert greedy(engine, prompts) == expected
    assert max(s.num_tokens for s in engine.steps) <= 16


def test_preemption_recomputes_to_same_tokens(model_case):
    model_dir, prompts, expected = model_case
    # 14 blocks of 8 tokens: not enough for all five requests' full contexts at once.
    engine = engine_for(model_dir, cache=CacheConfig(block_size=8, num_blocks=14))
    assert greedy(engine, prompts) == expected
    assert engine.core.kv.num_free_blocks == 14


def test_dummy_weights_without_a_tokenizer_run_on_token_ids(llama_dir, tmp_path):
    (tmp_path / "config.json").write_text((llama_dir / "config.json").read_text())  # shape only
    config = EngineConfig.from_pretrained(tmp_path, load_format="dummy", cache=CacheConfig(block_size=8, num_blocks=64))
    engine = LLMEngine(config, detokenize=False)
    params = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    first, second = engine.generate([[5, 6, 7, 8], [5, 6, 7, 8]], params)
    assert len(first.token_ids) == 5 and first.token_ids == second.token_ids and first.text == ""
    with pytest.raises(ValueError, match="need a tokenizer"):
        engine.generate(["text"], params)
