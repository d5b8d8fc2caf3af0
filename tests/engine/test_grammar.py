from __future__ import annotations

import json

import pytest
import torch

from tokenfactory.engine.grammar import GrammarError, GrammarMasks, build_ll_tokenizer, json_schema_grammar
from tokenfactory.engine.request import Request, SamplingParams
from tokenfactory.engine.sampler import Sampler
from tokenfactory.engine.tiny import ensure_tiny_model
from tokenfactory.engine.tokenizer import Tokenizer

SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def test_bad_schema_is_a_grammar_error():
    with pytest.raises(GrammarError, match="nonsense"):
        json_schema_grammar({"type": "nonsense"})


def test_constrained_rows_follow_the_schema_and_free_rows_are_untouched():
    tokenizer = Tokenizer.from_pretrained(ensure_tiny_model())
    vocab = tokenizer.vocab_size
    sampler = Sampler("cpu", 0, GrammarMasks(lambda: build_ll_tokenizer(tokenizer, vocab), vocab))
    grammar = json_schema_grammar(SCHEMA)
    constrained = Request("c", [1], SamplingParams(temperature=1.0, seed=1, grammar=grammar), tokenizer.eos_token_ids)
    free = Request("f", [1], SamplingParams(temperature=0.0))
    gen = torch.Generator().manual_seed(0)
    favourite = 7  # the free row's logits always prefer one token the grammar never allows first
    for _ in range(40):
        logits = torch.randn(2, vocab, generator=gen)
        logits[1, favourite] = 100.0
        tokens, _ = sampler.sample(logits, [constrained, free])
        assert tokens[1] == favourite
        if tokens[0] in tokenizer.eos_token_ids:
            break
        constrained.append_output_token(tokens[0])
    assert json.loads(tokenizer.decode(constrained.output_token_ids)) in ({"ok": True}, {"ok": False})
    sampler.forget(["c"])
    assert not sampler.grammars._matchers


def test_masks_prepared_while_the_model_runs_equal_masks_computed_in_place():
    tokenizer = Tokenizer.from_pretrained(ensure_tiny_model())
    vocab = tokenizer.vocab_size

    def masks() -> GrammarMasks:
        return GrammarMasks(lambda: build_ll_tokenizer(tokenizer, vocab), vocab)

    def request(rid: str, schema: dict) -> Request:
        return Request(rid, [1], SamplingParams(grammar=json_schema_grammar(schema)), tokenizer.eos_token_ids)

    a, b = request("a", SCHEMA), request("b", {"enum": [12345]})
    free = Request("f", [1], SamplingParams())
    in_place, prepared = masks(), masks()
    expected = torch.zeros(3, vocab)
    in_place.apply(expected, [b, free, a])
    prepared.prepare([a, b])  # the runner's order differs from the step's
    got = torch.zeros(3, vocab)
    prepared.apply(got, [b, free, a])
    assert torch.equal(got, expected)
    assert torch.isinf(got[0]).any() and torch.isinf(got[2]).any() and not torch.equal(got[0], got[2])
    assert not torch.isinf(got[1]).any()
    allowed = [int(row.argmax()) for row in got]  # the first token each grammar allows
    prepared.advance([b, free, a], allowed)
    prepared.prepare([a])  # `b` is not prepared for this step: it is computed in place
    got = torch.zeros(2, vocab)
    prepared.apply(got, [a, b])
    in_place.advance([b, free, a], allowed)
    expected = torch.zeros(2, vocab)
    in_place.apply(expected, [a, b])
    assert torch.equal(got, expected)


def test_requests_with_one_grammar_compile_it_once():
    tokenizer = Tokenizer.from_pretrained(ensure_tiny_model())
    masks = GrammarMasks(lambda: build_ll_tokenizer(tokenizer, tokenizer.vocab_size), tokenizer.vocab_size)
    grammar = json_schema_grammar(SCHEMA)
    requests = [Request(f"r{i}", [1], SamplingParams(grammar=grammar), tokenizer.eos_token_ids) for i in range(3)]
    masks.apply(torch.zeros(3, tokenizer.vocab_size), requests)
    assert len(masks._compiled) == 1 and len(masks._matchers) == 3
    assert len({id(m) for m in masks._matchers.values()}) == 3  # each request has its own state
