"""Constrained decoding: grammars that the sampled tokens must follow, as token masks.

We use llguidance (a small Rust wheel with no Python dependencies): a grammar is a JSON string
(from a JSON schema, a Lark grammar or a regex) that travels inside `SamplingParams.grammar` from
the gateway to the engine. In the engine, `GrammarMasks` keeps one matcher per constrained
request (like the sampler's seeded generators: made on first sample, dropped on finish), computes
the allowed-token bitmasks of all constrained rows of a step at once (in parallel, in Rust), applies
them to the logits in one tensor op, and advances each matcher with its row's sampled token.

The token vocabulary is our own tokenizer's: llguidance reads the same `tokenizer.json`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import llguidance
import llguidance.torch
import torch

from tokenfactory.engine.request import Request
from tokenfactory.engine.tokenizer import Tokenizer


class GrammarError(ValueError):
    """A grammar or JSON schema that cannot constrain decoding; the message says why."""


# ---------------------------------------------------------------- building grammars (gateway side)


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """Output that is one JSON value valid under `schema` (None: any JSON object). Checked here,
    so a bad schema fails the request, not the engine step."""
    if schema is None:
        schema = {"type": "object"}
    if not isinstance(schema, dict):
        raise GrammarError(f"a JSON schema must be an object, got {type(schema).__name__}")
    # Compact JSON unless the caller says otherwise: flexible whitespace lets a weak model pad
    # its output with newlines until max_tokens cuts it off.
    schema = {"x-guidance": {"whitespace_flexible": False}, **schema}
    return checked(llguidance.LLMatcher.grammar_from_json_schema(schema))


def lark_grammar(lark: str) -> str:
    """Output matching a Lark grammar (llguidance's dialect: `%json{...}` embeds a JSON schema)."""
    return checked(llguidance.LLMatcher.grammar_from_lark(lark))


def checked(grammar: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise GrammarError(error)
    return grammar


# ---------------------------------------------------------------- masks (engine side)


def build_ll_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of our tokenizer: the same tokenizer.json, EOS ids and logits width."""
    return llguidance.LLTokenizer(
        tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=list(tokenizer.eos_token_ids)
    )


class GrammarMasks:
    """The grammar state of every constrained request of one worker."""

    def __init__(self, make_tokenizer: Callable[[], llguidance.LLTokenizer], vocab_size: int) -> None:
        # The tokenizer is built on the first constrained request: unconstrained serving (and
        # engines without tokenizer files, as in some tests) never pays for it.
        self._make_tokenizer = make_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.vocab_size = vocab_size
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._executor = llguidance.LLExecutor()

    def forget(self, request_ids: Iterable[str]) -> None:
        for rid in request_ids:
            self._matchers.pop(rid, None)

    def apply(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """Set every token a constrained row's grammar forbids to -inf, in place; rows without a
        grammar are untouched. logits [num_rows, vocab]."""
        rows = [row for row, r in enumerate(requests) if r.sampling.grammar is not None]
        if not rows:
            return
        matchers = [(self._matcher(requests[row]), i) for i, row in enumerate(rows)]
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)  # [rows, words] int32
        llguidance.torch.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        index = torch.tensor(rows, device=logits.device)
        logits[index] = logits[index].masked_fill(~allowed, float("-inf"))

    def advance(self, requests: Sequence[Request], tokens: Sequence[int]) -> None:
        """Feed each constrained row its sampled token."""
        for req, token in zip(requests, tokens, strict=True):
            if req.sampling.grammar is not None:
                self._matchers[req.request_id].consume_token(token)

    def _matcher(self, req: Request) -> llguidance.LLMatcher:
        matcher = self._matchers.get(req.request_id)
        if matcher is None:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            matcher = llguidance.LLMatcher(self._tokenizer, req.sampling.grammar)
            # Tokens sampled elsewhere (a prefill worker's first token) already count.
            matcher.consume_tokens(list(req.output_token_ids))
            self._matchers[req.request_id] = matcher
        return matcher


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [rows, words], bit j of word w = token 32 w + j -> bool [rows, vocab_size]."""
    shifts = _BIT_SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
