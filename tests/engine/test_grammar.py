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
