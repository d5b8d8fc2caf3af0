"""Batched sampling: greedy, temperature, top-k/top-p, seeds, logprobs and min_tokens."""

from __future__ import annotations

from collections import Counter

import torch

from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.sampler import Sampler

VOCAB = 32


def req(rid: str, **params) -> Request:
    return Request(rid, [1, 2, 3], SamplingParams(**params), eos_token_ids=(0,))


def random_logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_rows_take_the_argmax_even_beside_sampled_rows():
    logits = random_logits(4)
    requests = [req("a", temperature=0.0), req("b"), req("c", top_k=1), req("d", temperature=0.0)]
    tokens, logprobs = Sampler("cpu").sample(logits, requests)
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[0], tokens[2], tokens[3]] == [argmax[0], argmax[2], argmax[3]]
    assert logprobs == [None] * 4


def test_sampling_follows_the_softmax_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().repeat(6000, 1)
    tokens, _ = Sampler("cpu", seed=1).sample(logits, [req(str(i)) for i in range(6000)])
    freq = Counter(tokens)
    for token, p in enumerate(probs.tolist()):
        assert abs(freq[token] / 6000 - p) < 0.03


def test_top_k_and_top_p_restrict_the_support():
    # probabilities 0.5, 0.25, 0.125, ... so the nucleus of top_p=0.7 is exactly tokens {0, 1}.
    logits = torch.tensor([0.5**i for i in range(1, VOCAB + 1)]).log()
    batch = logits.repeat(400, 1)
    sampler = Sampler("cpu")
    top_k, _ = sampler.sample(batch, [req(f"k{i}", top_k=3) for i in range(400)])
    top_p, _ = sampler.sample(batch, [req(f"p{i}", top_p=0.7) for i in range(400)])
    assert set(top_k) == {0, 1, 2}
    assert set(top_p) == {0, 1}
    unrestricted, _ = sampler.sample(batch, [req(f"u{i}") for i in range(400)])
    assert len(set(unrestricted)) > 3


def test_high_temperature_flattens_and_low_temperature_sharpens():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    sampler = Sampler("cpu")
    cold, _ = sampler.sample(logits, [req(f"c{i}", temperature=0.05) for i in range(2000)])
    hot, _ = sampler.sample(logits, [req(f"h{i}", temperature=5.0) for i in range(2000)])
    assert Counter(cold)[0] > 1990
    assert Counter(hot)[0] < 800


def test_seeded_request_is_reproducible_whatever_shares_its_batch():
    steps = [random_logits(1, seed=s) for s in range(6)]

    def run(batch_size: int, sampler_seed: int) -> list[int]:
        sampler = Sampler("cpu", seed=sampler_seed)
        seeded = req("seeded", seed=1234)
        out = []
        for step, row in enumerate(steps):
            others = [req(f"o{step}-{i}") for i in range(batch_size)]
            logits = torch.cat([random_logits(batch_size, seed=100 + step), row])
            tokens, _ = sampler.sample(logits, others + [seeded])
            out.append(tokens[-1])
        return out

    alone = run(0, sampler_seed=0)
    assert run(5, sampler_seed=1) == alone
    assert run(17, sampler_seed=2) == alone
    assert len(set(alone)) > 1  # really sampled, not greedy


def test_finished_request_forgets_its_generator():
    sampler = Sampler("cpu")
    logits = torch.zeros(1, VOCAB)
    first = [sampler.sample(logits, [req("r", seed=5)])[0][0] for _ in range(8)]
    sampler.forget(["r"])
    again = [sampler.sample(logits, [req("r", seed=5)])[0][0] for _ in range(8)]
    assert again == first


def test_logprobs_are_raw_log_softmax_with_top_alternatives():
    logits = random_logits(3)
    requests = [req("a", logprobs=3, temperature=0.5), req("b"), req("c", logprobs=0, temperature=0.0)]
    tokens, logprobs = Sampler("cpu").sample(logits, requests)
    expected = torch.log_softmax(logits, dim=-1)
    a = logprobs[0]
    assert a.chosen.token_id == tokens[0]
    assert abs(a.chosen.logprob - expected[0, tokens[0]].item()) < 1e-5
    top_values, top_ids = expected[0].topk(3)
    assert [lp.token_id for lp in a.top] == top_ids.tolist()
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in a.top]), top_values)
    assert logprobs[1] is None
    assert logprobs[2].top == [] and logprobs[2].chosen.token_id == int(logits[2].argmax())


def test_min_tokens_holds_back_eos_and_stop_tokens():
    logits = torch.full((1, VOCAB), -5.0)
    logits[0, 0] = 10.0  # EOS is by far the most likely
    logits[0, 7] = 9.0  # then a stop token
    logits[0, 4] = 1.0
    early = req("r", temperature=0.0, min_tokens=2, stop_token_ids=(7,))
    sampler = Sampler("cpu")
    assert sampler.sample(logits, [early])[0] == [4]
    early.append_output_token(4)
    early.append_output_token(4)
    assert sampler.sample(logits, [early])[0] == [0]
