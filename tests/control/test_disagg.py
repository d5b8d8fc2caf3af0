from __future__ import annotations

import pytest

from tokenfactory.control.disagg import DisaggConfig, should_split

CONFIG = DisaggConfig(min_prompt_tokens=100, max_cached_fraction=0.5)


def test_short_prompts_stay_local():
    assert not should_split(99, 0, CONFIG)
    assert should_split(100, 0, CONFIG)


def test_a_mostly_cached_prompt_stays_on_the_decode_worker():
    assert should_split(1000, 500, CONFIG)
    assert not should_split(1000, 501, CONFIG)


def test_bad_thresholds_are_refused():
    with pytest.raises(ValueError, match="min_prompt_tokens"):
        DisaggConfig(min_prompt_tokens=0)
    with pytest.raises(ValueError, match="max_cached_fraction"):
        DisaggConfig(max_cached_fraction=1.5)
