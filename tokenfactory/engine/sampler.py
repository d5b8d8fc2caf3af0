"""Batched token sampling: every row carries its own temperature, top-k, top-p and seed.

Sampling uses the exponential race (argmax of probs / Exp(1) noise), which draws exactly the
categorical distribution and lets each seeded row draw its noise from its own generator: a
seeded request yields the same tokens whatever else shares its batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tokenfactory.engine.grammar import GrammarMasks
from tokenfactory.engine.outputs import Logprob, TokenLogprobs
from tokenfactory.engine.request import Request


class Sampler:
    """Picks one token per row of logits; keeps each seeded request's generator across steps."""

    def __init__(self, device: torch.device | str, seed: int = 0, grammars: GrammarMasks | None = None) -> None:
        self.device = torch.device(device)
        self._unseeded = torch.Generator(self.device).manual_seed(seed)
        self._seeded: dict[str, torch.Generator] = {}
        self.grammars = grammars

    def forget(self, request_ids: Iterable[str]) -> None:
        """Drop the generators and grammar states of finished requests."""
        request_ids = list(request_ids)
        for rid in request_ids:
            self._seeded.pop(rid, None)
        if self.grammars is not None:
            self.grammars.forget(request_ids)

    def prepare(self, requests: Iterable[Request]) -> None:
        """A step with these sampling requests begins: start its grammar masks (see GrammarMasks)."""
        if self.grammars is not None:
            self.grammars.prepare(list(requests))

    @torch.inference_mode()
    def sample(
        self, logits: torch.Tensor, requests: Sequence[Request]
    ) -> tuple[list[int], list[TokenLogprobs | None]]:
        """logits [num_rows, vocab] float32, one row per request -> token ids and logprobs."""
        want_logprobs = [r.sampling.logprobs is not None for r in requests]
        raw_logprobs = torch.log_softmax(logits, dim=-1) if any(want_logprobs) else None
        logits = _mask_early_stops(logits, requests)
        constrained = self.grammars is not None and any(r.sampling.grammar is not None for r in requests)
        if constrained:
            self.grammars.apply(logits, requests)
        greedy = [r.sampling.greedy for r in requests]
        if all(greedy):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = self._sample_random(logits, requests, greedy)
        token_list = tokens.tolist()
        if constrained:
            self.grammars.advance(requests, token_list)
        if raw_logprobs is None:
            return token_list, [None] * len(requests)
        return token_list, _collect_logprobs(raw_logprobs, tokens, requests, want_logprobs)

    def _sample_random(self, logits: torch.Tensor, requests: Sequence[Request], greedy: list[bool]):
        """Temperature, top-k and top-p for all rows at once; greedy rows take the argmax."""
        num_rows, vocab = logits.shape
        temps = [1.0 if g else r.sampling.temperature for r, g in zip(requests, greedy)]
        scaled = logits / torch.tensor(temps, device=logits.device).unsqueeze(1)
        top_k = [r.sampling.top_k or vocab for r in requests]
        top_p = [r.sampling.top_p for r in requests]
        if min(top_k) < vocab or min(top_p) < 1.0:
            scaled = _restrict_support(scaled, top_k, top_p)
        probs = torch.softmax(scaled, dim=-1)
        noise = torch.empty_like(probs).exponential_(generator=self._unseeded)
        for row, req in enumerate(requests):
            if req.sampling.seed is not None and not greedy[row]:
                noise[row].exponential_(generator=self._generator(req))
        # An Exp(1) draw can be exactly 0; keep 0 / 0 (a masked token) from turning into NaN.
        sampled = (probs / noise.clamp_min_(1e-10)).argmax(dim=-1)
        greedy_mask = torch.tensor(greedy, device=logits.device)
        return torch.where(greedy_mask, logits.argmax(dim=-1), sampled)

    def _generator(self, req: Request) -> torch.Generator:
        gen = self._seeded.get(req.request_id)
        if gen is None:
            gen = torch.Generator(self.device).manual_seed(req.sampling.seed)
            self._seeded[req.request_id] = gen
        return gen


def _mask_early_stops(logits: torch.Tensor, requests: Sequence[Request]) -> torch.Tensor:
    """EOS and stop token ids cannot be chosen before a request has min_tokens outputs."""
    rows = [
        (row, r) for row, r in enumerate(requests) if r.num_output_tokens < r.sampling.min_tokens
    ]
    if not rows:
        return logits
    logits = logits.clone()
    for row, req in rows:
        stops = set(req.sampling.stop_token_ids)
        if not req.sampling.ignore_eos:
            stops.update(req.eos_token_ids)
        if stops:
            logits[row, list(stops)] = float("-inf")
    return logits


def _restrict_support(scaled: torch.Tensor, top_k: list[int], top_p: list[float]) -> torch.Tensor:
    """Set logits outside each row's top-k and top-p nucleus to -inf (one sort for both)."""
    device = scaled.device
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [rows, vocab]
    ranks = torch.arange(scaled.shape[1], device=device)
    k = torch.tensor(top_k, device=device).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(ranks >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # A token stays while the mass of the more likely ones is below top_p (the first always does).
    p = torch.tensor(top_p, device=device, dtype=probs.dtype).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(mass_before >= p, float("-inf"))
    return torch.full_like(scaled, float("-inf")).scatter_(1, order, sorted_logits)


def _collect_logprobs(
    raw_logprobs: torch.Tensor,
    tokens: torch.Tensor,
    requests: Sequence[Request],
    want: list[bool],
) -> list[TokenLogprobs | None]:
    """The chosen token's logprob and the `logprobs` most likely alternatives, per row."""
    chosen = raw_logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1).tolist()
    max_k = max(r.sampling.logprobs or 0 for r in requests)
    top_values: list[list[float]] = [[] for _ in requests]
    top_ids: list[list[int]] = [[] for _ in requests]
    if max_k:
        values, ids = raw_logprobs.topk(max_k, dim=-1)  # [rows, max_k], most likely first
        top_values, top_ids = values.tolist(), ids.tolist()
    token_list = tokens.tolist()
    result: list[TokenLogprobs | None] = []
    for row, req in enumerate(requests):
        if not want[row]:
            result.append(None)
            continue
        k = req.sampling.logprobs or 0
        top = [Logprob(top_ids[row][i], top_values[row][i]) for i in range(k)]
        result.append(TokenLogprobs(chosen=Logprob(token_list[row], chosen[row]), top=top))
    return result
