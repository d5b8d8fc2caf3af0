"""The model runner reproduces Hugging Face transformers' logits and greedy tokens, whether a
prompt arrives in one prefill, in chunks, after a shared cached prefix, or mixed with others."""

from __future__ import annotations

import math

import pytest
import torch
import transformers

from tokenfactory.engine.config import CacheConfig, EngineConfig
from tokenfactory.engine.model_runner import ModelRunner
from tokenfactory.engine.outputs import ScheduledChunk, SchedulerOutput
from tokenfactory.engine.request import Request, SamplingParams
from tests.factories import TINY_SHAPE

BLOCK_SIZE = 4
TINY = dict(
    **TINY_SHAPE,
    vocab_size=256,
    max_position_embeddings=256,
    # Wider than the default 0.02 so logits are well separated and argmax is stable.
    initializer_range=0.15,
)
LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def make_hf_model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        cfg = transformers.LlamaConfig(**TINY, rope_parameters=LLAMA3_ROPE, tie_word_embeddings=False)
        return transformers.LlamaForCausalLM(cfg).eval()
    cfg = transformers.Qwen2Config(**TINY, tie_word_embeddings=True)
    return transformers.Qwen2ForCausalLM(cfg).eval()


@pytest.fixture(scope="module", params=["llama", "qwen2"])
def checkpoint(request, tmp_path_factory):
    hf = make_hf_model(request.param)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path, safe_serialization=True)
    return hf, path


def make_runner(path, num_blocks: int = 64) -> ModelRunner:
    cache = CacheConfig(block_size=BLOCK_SIZE, num_blocks=num_blocks)
    return ModelRunner(EngineConfig.from_pretrained(path, cache=cache))


class BlockHandout:
    """Stands in for the KV cache manager: fresh block ids, grown as a request needs them."""

    def __init__(self) -> None:
        self.next_id = 1  # leave block 0 unused so padding reads never alias a live request
        self.tables: dict[str, list[int]] = {}

    def grow(self, req: Request, end: int) -> list[int]:
        table = self.tables.setdefault(req.request_id, [])
        while len(table) < math.ceil(end / BLOCK_SIZE):
            table.append(self.next_id)
            self.next_id += 1
        return list(table)


def run_step(runner, blocks, plan: list[tuple[Request, int]]) -> dict[str, tuple[int, torch.Tensor]]:
    """Compute `plan` (request, num_tokens) as one step, append the greedy token of every
    sampling request, and return {request_id: (position of the logits, logits [vocab])}."""
    chunks = [ScheduledChunk(r, n, blocks.grow(r, r.num_computed_tokens + n)) for r, n in plan]
    logits, sampled = runner.compute_logits(chunks)
    result = {}
    for req, row in zip(sampled, logits):
        result[req.request_id] = (req.num_tokens - 1, row)
    for req, n in plan:
        req.num_computed_tokens += n
    for req, row in zip(sampled, logits):
        req.append_output_token(int(row.argmax()))
    return result


def hf_logits(hf, token_ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([token_ids])).logits[0].float()  # [seq, vocab]


def assert_matches_hf(hf, requests: list[Request], seen: list[dict]) -> None:
    checked = 0
    for req in requests:
        expected = hf_logits(hf, req.all_token_ids[:-1])
        for step in seen:
            if req.request_id in step:
                pos, ours = step[req.request_id]
                torch.testing.assert_close(ours, expected[pos], atol=1e-4, rtol=1e-4)
                checked += 1
    assert checked >= len(requests)


def greedy_request(rid: str, prompt: list[int]) -> Request:
    return Request(rid, prompt, SamplingParams(temperature=0.0, max_tokens=8))


PROMPT = [3, 17, 99, 42, 7, 7, 250, 1, 64, 128, 5]


@pytest.mark.parametrize(
    "chunk_sizes", [[11], [4, 3, 4], [1] * 11], ids=["prefill", "chunked", "tokenwise"]
)
def test_prompt_logits_match_hf_however_the_prompt_is_split(checkpoint, chunk_sizes):
    hf, path = checkpoint
    runner, blocks = make_runner(path), BlockHandout()
    req = greedy_request("r", PROMPT)
    seen = [run_step(runner, blocks, [(req, n)]) for n in chunk_sizes]
    assert list(seen[-1]) == ["r"] and all(not s for s in seen[:-1])  # only the last chunk samples
    seen += [run_step(runner, blocks, [(req, 1)]) for _ in range(4)]  # decode
    assert_matches_hf(hf, [req], seen)


def test_mixed_batches_and_cached_prefix_match_hf(checkpoint):
    """Decodes, chunked prefills and a prefix-cache hit share steps; each request still gets
    exactly its own logits."""
    hf, path = checkpoint
    runner, blocks = make_runner(path), BlockHandout()
    a = greedy_request("a", PROMPT[:7])
    b = greedy_request("b", PROMPT[::-1] + [9, 9])
    seen = [run_step(runner, blocks, [(a, 7), (b, 5)])]
    # c shares a's first 4 prompt tokens, already cached in a's first block.
    c = greedy_request("c", PROMPT[:4] + [200, 201, 202])
    blocks.tables["c"] = blocks.tables["a"][:1]
    c.num_computed_tokens = 4
    seen.append(run_step(runner, blocks, [(a, 1), (b, 8), (c, 3)]))
    for _ in range(5):
        seen.append(run_step(runner, blocks, [(a, 1), (b, 1), (c, 1)]))
    assert_matches_hf(hf, [a, b, c], seen)


def test_greedy_execute_equals_transformers_generate(checkpoint):
    hf, path = checkpoint
    runner, blocks = make_runner(path), BlockHandout()
    req = greedy_request("g", PROMPT)
    new_tokens = []
    for n in [6, 5] + [1] * 5:
        chunk = ScheduledChunk(req, n, blocks.grow(req, req.num_computed_tokens + n))
        out = runner.execute(SchedulerOutput(chunks=[chunk]))
        req.num_computed_tokens += n
        if "g" in out.sampled_token_ids:
            token = out.sampled_token_ids["g"]
            req.append_output_token(token)
            new_tokens.append(token)
    with torch.no_grad():
        generated = hf.generate(
            torch.tensor([PROMPT]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
    assert new_tokens == generated[0, len(PROMPT) :].tolist()


def test_cache_size_follows_memory_budget(checkpoint):
    _, path = checkpoint
    # 2 layers * (K+V) * 2 kv heads * 16 head_dim * 4 bytes * 4 tokens = 2048 bytes per block.
    cache = CacheConfig(block_size=BLOCK_SIZE, memory_bytes=10 * 2048 + 100)
    runner = ModelRunner(EngineConfig.from_pretrained(path, cache=cache))
    assert runner.num_blocks == 10


def test_decodes_sharing_a_cached_prefix_match_hf(checkpoint):
    """Requests that reuse another's prompt blocks decode together (the prefix is read once)."""
    hf, path = checkpoint
    runner, blocks = make_runner(path), BlockHandout()
    prefix = PROMPT[:8]  # two full blocks
    a = greedy_request("a", prefix + [1, 2, 3])
    seen = [run_step(runner, blocks, [(a, 11)])]
    followers = [greedy_request("b", prefix + [60]), greedy_request("c", prefix + [70, 71, 72, 73])]
    for req in followers:
        blocks.tables[req.request_id] = blocks.tables["a"][:2]
        req.num_computed_tokens = 8
    seen.append(run_step(runner, blocks, [(r, r.num_tokens - 8) for r in followers]))
    for _ in range(6):
        seen.append(run_step(runner, blocks, [(r, 1) for r in [a, *followers]]))
    assert_matches_hf(hf, [a, *followers], seen)
