"""The tokens-per-minute window: a running sum that must agree with the tokens it holds."""

from __future__ import annotations

import random

from tokenfactory.control.tiers import RateLimiter, parse_factory_config

CONFIG_YAML = """
default_tier: metered
tiers:
  metered: {priority: 0, tokens_per_minute: 1000}
"""


def test_the_token_window_admits_exactly_as_a_full_recount_would():
    limiter = RateLimiter(parse_factory_config(CONFIG_YAML))
    rng = random.Random(3)
    now, recorded = 0.0, []  # (time, tokens) of every request's tokens
    for _ in range(3000):
        now += rng.expovariate(1.0)
        in_window = sum(n for at, n in recorded if at > now - RateLimiter.WINDOW_S)
        refused = limiter.admit("k", "metered", now)
        assert (refused is not None) == (in_window >= 1000)
        if refused is None:
            tokens = rng.choice([0, rng.randrange(1, 120)])
            if rng.random() < 0.1:  # a request a restarted gateway reads back from its ledger
                ended = now - rng.uniform(0, 90)
                limiter.restore_request("k", "metered", ended, ended, tokens, now)
                recorded.append((ended, tokens))
            else:
                limiter.record("k", "metered", tokens, now)
                recorded.append((now, tokens))
    assert any(at > now - RateLimiter.WINDOW_S for at, _ in recorded)


def test_tokens_leave_the_window_a_minute_after_they_were_counted():
    limiter = RateLimiter(parse_factory_config(CONFIG_YAML))
    assert limiter.admit("k", "metered", now=0.0) is None
    limiter.record("k", "metered", 1000, now=5.0)
    refused = limiter.admit("k", "metered", now=30.0)
    assert refused is not None and refused.limit == "tokens_per_minute" and refused.retry_after_s == 35.0
    assert limiter.admit("k", "metered", now=65.0) is None
    limiter.record("k", "metered", 999, now=66.0)
    assert limiter.admit("k", "metered", now=67.0) is None  # 999 < 1000: the old 1000 are gone
