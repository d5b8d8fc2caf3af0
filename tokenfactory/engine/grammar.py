"""Constrained decoding: grammars that the sampled tokens must follow, as token masks.

We use llguidance (a small Rust wheel with no Python dependencies): a grammar is a JSON string
(from a JSON schema, a Lark grammar or a regex) that travels inside `SamplingParams.grammar` from
the gateway to the engine. In the engine, `GrammarMasks` keeps one matcher per constrained
request (like the sampler's seeded generators: made on first sample, dropped on finish), computes
the allowed-token bitmasks of all constrained rows of a step at once (in Rust, on a thread of its
own while the model runs), applies them to the logits in one tensor op, and advances each matcher
with its row's sampled token.

The token vocabulary is our own tokenizer's: llguidance reads the same `tokenizer.json`.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import llguidance

if TYPE_CHECKING:
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
    """The grammar state of every constrained request of one worker.

    The masks of a step depend only on the tokens sampled before it, so `prepare` starts them on
    a worker thread as the step begins and `apply` picks them up when the logits are there, and
    `advance` hands the sampled tokens to the same thread, which feeds them to the matchers
    before it computes the next step's masks. llguidance works without holding the GIL, so
    grammar work costs a step nothing while the model runs longer than it takes. Without
    `prepare` (or for other rows) `apply` computes the masks itself."""

    def __init__(self, make_tokenizer: Callable[[], llguidance.LLTokenizer], vocab_size: int) -> None:
        # The tokenizer is built on the first constrained request: unconstrained serving (and
        # engines without tokenizer files, as in some tests) never pays for it.
        self._make_tokenizer = make_tokenizer
        self._tokenizer: llguidance.LLTokenizer | None = None
        self.vocab_size = vocab_size
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        # Compiled grammars in their start state, most recently used last: requests with the same
        # schema (an agent's tools, a batch job's format) copy one in microseconds instead of
        # compiling it again in milliseconds.
        self._compiled: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        # A pool of threads pays off only with cores to spare beside the model and the mask thread.
        self._executor = llguidance.LLExecutor() if _allowed_cores() > 2 else None
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="grammar-masks")
        self._pending: tuple[dict[str, int], Future[torch.Tensor]] | None = None  # request id -> mask row
        self._advancing: Future[None] | None = None
        self.work_s = 0.0
        """Time spent computing masks and advancing grammars, wherever it ran (for benchmarks)."""
        self.wait_s = 0.0
        """Time the steps spent on grammar masks: waiting for them and applying them."""

    def forget(self, request_ids: Iterable[str]) -> None:
        # No waiting: finished requests are in no step the mask thread works on.
        for rid in request_ids:
            self._matchers.pop(rid, None)

    def prepare(self, requests: Sequence[Request]) -> None:
        """Start computing the masks of the constrained ones among a step's sampling `requests`."""
        self._pending = None  # masks prepared for a step that did not sample (the thread keeps order)
        constrained = [r for r in requests if r.sampling.grammar is not None]
        if constrained:
            rows = {r.request_id: i for i, r in enumerate(constrained)}
            self._pending = (rows, self._thread.submit(self._fill, constrained))

    def apply(self, logits: torch.Tensor, requests: Sequence[Request]) -> None:
        """Set every token a constrained row's grammar forbids to -inf, in place; rows without a
        grammar are untouched. logits [num_rows, vocab]."""
        import torch  # here, not at the top: the gateway checks grammars without loading torch

        rows = [row for row, r in enumerate(requests) if r.sampling.grammar is not None]
        if not rows:
            self._settle()
            return
        start = time.perf_counter()
        pending, self._pending = self._pending, None
        prepared = pending[1].result() if pending is not None else None
        ids = [requests[row].request_id for row in rows]
        if pending is not None and all(rid in pending[0] for rid in ids):
            order = [pending[0][rid] for rid in ids]
            bitmask = prepared if order == list(range(len(prepared))) else prepared[order]
        else:
            self._settle()
            bitmask = self._fill([requests[row] for row in rows])  # not prepared (or for other rows)
        allowed = unpack_bitmask(bitmask.to(logits.device, non_blocking=True), logits.shape[1])
        if len(rows) == len(requests):
            logits.masked_fill_(~allowed, float("-inf"))
        else:
            index = torch.tensor(rows, device=logits.device)
            logits[index] = logits[index].masked_fill(~allowed, float("-inf"))
        self.wait_s += time.perf_counter() - start

    def advance(self, requests: Sequence[Request], tokens: Sequence[int]) -> None:
        """Feed each constrained row its sampled token (on the mask thread, before its next masks)."""
        fed = [(self._matchers[req.request_id], token)
               for req, token in zip(requests, tokens, strict=True) if req.sampling.grammar is not None]
        if fed:
            self._advancing = self._thread.submit(self._consume, fed)

    def _consume(self, fed: list[tuple[llguidance.LLMatcher, int]]) -> None:
        start = time.perf_counter()
        for matcher, token in fed:
            matcher.consume_token(token)
        self.work_s += time.perf_counter() - start

    def _fill(self, requests: Sequence[Request]) -> torch.Tensor:
        """The allowed-token bitmasks of `requests`: int32 [rows, words]."""
        import llguidance.torch

        start = time.perf_counter()
        matchers = [(self._matcher(req), i) for i, req in enumerate(requests)]
        bitmask = llguidance.torch.allocate_token_bitmask(len(matchers), self.vocab_size)
        if self._executor is not None and len(matchers) > 1:
            llguidance.torch.fill_next_token_bitmask_par(self._executor, matchers, bitmask)
        else:
            for matcher, i in matchers:
                llguidance.torch.fill_next_token_bitmask(matcher, bitmask, i)
        self.work_s += time.perf_counter() - start
        return bitmask

    def _settle(self) -> None:
        """Wait until the mask thread is done, so only this thread touches the matchers."""
        pending, self._pending = self._pending, None
        advancing, self._advancing = self._advancing, None
        for future in (pending[1] if pending else None, advancing):
            if future is not None:
                future.result()

    def _matcher(self, req: Request) -> llguidance.LLMatcher:
        matcher = self._matchers.get(req.request_id)
        if matcher is None:
            matcher = self._compile(req.sampling.grammar).deep_copy()
            # Tokens sampled elsewhere (a prefill worker's first token) already count.
            matcher.consume_tokens(list(req.output_token_ids))
            self._matchers[req.request_id] = matcher
        return matcher


    def _compile(self, grammar: str) -> llguidance.LLMatcher:
        start = self._compiled.get(grammar)
        if start is None:
            if self._tokenizer is None:
                self._tokenizer = self._make_tokenizer()
            start = self._compiled[grammar] = llguidance.LLMatcher(self._tokenizer, grammar)
            if len(self._compiled) > COMPILED_GRAMMARS:
                self._compiled.popitem(last=False)
        self._compiled.move_to_end(grammar)
        return start


COMPILED_GRAMMARS = 64
"""How many distinct grammars a worker keeps compiled."""


def _allowed_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_BIT_SHIFTS: dict[torch.device, torch.Tensor] = {}


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """int32 [rows, words], bit j of word w = token 32 w + j -> bool [rows, vocab_size]."""
    import torch

    shifts = _BIT_SHIFTS.get(bitmask.device)
    if shifts is None:
        shifts = _BIT_SHIFTS[bitmask.device] = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [rows, words, 32]
    return bits.view(bitmask.shape[0], -1)[:, :vocab_size].bool()
