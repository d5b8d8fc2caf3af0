"""Tier policy: choosing a tier for a key, refusing what it may not have, prices and limits."""

from __future__ import annotations

import pytest

from tokenfactory.control.tiers import (
    ConfigError,
    KeyPolicy,
    RateLimiter,
    TierRefusal,
    TokenUsage,
    builtin_config,
    parse_factory_config,
    pick_tier,
    price_usage,
    retry_after_header,
)

CONFIG_YAML = """
default_tier: default
tiers:
  default:
    prices: {default: {input: 1.0, cached_input: 0.25, output: 4.0}, big-model: {input: 3.0, output: 12.0}}
    priority: 0
  priority:
    prices: {default: {input: 2.0, cached_input: 0.5, output: 8.0}}
    priority: 10
    slo: {ttft_s: 0.3, itl_s: 0.05}
  free:
    prices: {default: {}}
    priority: -10
    token_quota: 100
    quota_period_s: 3600
    requests_per_minute: 2
    sheddable: true
"""


def test_builtin_tiers_follow_openai_names_and_order_by_priority():
    config = builtin_config()
    assert set(config.tiers) == {"flex", "default", "priority"} and config.default_tier == "default"
    assert config.tiers["flex"].priority < config.tiers["default"].priority < config.tiers["priority"].priority
    assert config.tiers["flex"].sheddable and not config.tiers["priority"].sheddable


def test_config_file_parses_and_bad_ones_fail_loudly():
    config = parse_factory_config(CONFIG_YAML, "factory.yaml")
    assert config.tiers["priority"].slo.ttft_s == 0.3 and config.tiers["free"].token_quota == 100
    with pytest.raises(ConfigError, match=r"factory.yaml: tiers.default.priorty: Extra inputs"):
        parse_factory_config("tiers: {default: {priorty: 3}}", "factory.yaml")
    with pytest.raises(ConfigError, match="default_tier 'gold' is not one of the tiers"):
        parse_factory_config("default_tier: gold\ntiers: {default: {}}")
    with pytest.raises(ConfigError, match="must include a `default` entry"):
        parse_factory_config("tiers: {default: {prices: {m: {input: 1}}}}")
    with pytest.raises(ConfigError, match="not valid YAML"):
        parse_factory_config("tiers: [unclosed")
    with pytest.raises(ConfigError, match="greater than or equal to 0"):
        parse_factory_config("tiers: {default: {prices: {default: {input: -1}}}}")


def test_pick_tier_honours_the_request_and_never_upgrades():
    config = parse_factory_config(CONFIG_YAML)
    everything = KeyPolicy("default", frozenset(config.tiers))
    free_plan = KeyPolicy("free", frozenset({"free"}))
    assert pick_tier(config, everything, None) == "default"
    assert pick_tier(config, everything, "auto") == "default"
    assert pick_tier(config, everything, "priority") == "priority"
    assert pick_tier(config, free_plan, "auto") == "free"
    refused = pick_tier(config, free_plan, "priority")
    assert isinstance(refused, TierRefusal) and refused.status == 403 and refused.code == "tier_not_allowed"
    unknown = pick_tier(config, everything, "platinum")
    assert isinstance(unknown, TierRefusal) and unknown.status == 400 and "auto, default, free" in unknown.message


def test_price_counts_cached_tokens_at_the_cached_price_and_uses_per_model_prices():
    tier = parse_factory_config(CONFIG_YAML).tiers["default"]
    usage = TokenUsage(prompt_tokens=1_000, cached_tokens=400, completion_tokens=500)
    assert price_usage(tier, "tiny", usage) == pytest.approx((600 * 1.0 + 400 * 0.25 + 500 * 4.0) / 1e6)
    assert price_usage(tier, "big-model", usage) == pytest.approx((600 * 3.0 + 500 * 12.0) / 1e6)
    assert price_usage(parse_factory_config(CONFIG_YAML).tiers["free"], "tiny", usage) == 0.0


def test_quota_and_request_rate_give_retry_after_from_the_injected_clock():
    limiter = RateLimiter(parse_factory_config(CONFIG_YAML))
    assert limiter.admit("k1", "free", now=7200.0) is None
    limiter.record("k1", "free", 100, now=7201.0)
    over = limiter.admit("k1", "free", now=7210.0)
    assert over.limit == "token_quota" and over.retry_after_s == pytest.approx(3600 - 10)
    assert limiter.admit("k2", "free", now=7210.0) is None  # limits are per key
    assert limiter.admit("k1", "free", now=10800.0) is None  # a new quota period
    assert limiter.admit("k1", "free", now=10801.0) is None
    rate = limiter.admit("k1", "free", now=10830.5)
    assert rate.limit == "requests_per_minute" and retry_after_header(rate) == "30"
    assert limiter.admit("k1", "free", now=10861.0) is None  # the first request left the minute
