"""Conditional disaggregation: prefill a request on a prefill worker and move its KV to a decode
worker, or serve it whole on the decode worker. Pure: numbers in, decision out.

A split pays for the KV transfer to save the decode worker a long prefill that would stall its
running requests' steps. It is worth it only for long prompts, and not when the decode worker
already caches most of the prompt (its prefill is then short anyway).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DisaggConfig:
    """When a request goes through the prefill/decode split."""

    min_prompt_tokens: int = 256
    """Prompts shorter than this are served whole on a decode worker (>= 1)."""
    max_cached_fraction: float = 0.5
    """Served whole when the decode worker caches more than this fraction of the prompt [0, 1]."""

    def __post_init__(self) -> None:
        if self.min_prompt_tokens < 1:
            raise ValueError(f"min_prompt_tokens must be at least 1, got {self.min_prompt_tokens}")
        if not 0.0 <= self.max_cached_fraction <= 1.0:
            raise ValueError(f"max_cached_fraction must be in [0, 1], got {self.max_cached_fraction}")


def should_split(num_prompt_tokens: int, num_cached_on_decode: int, config: DisaggConfig) -> bool:
    """True: prefill on a prefill worker and move the KV; False: serve whole on the decode worker.

    `num_cached_on_decode` is the prompt prefix (tokens) the chosen decode worker holds.
    """
    if num_prompt_tokens < config.min_prompt_tokens:
        return False
    return num_cached_on_decode <= config.max_cached_fraction * num_prompt_tokens
