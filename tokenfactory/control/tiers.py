"""Service tiers: which tier serves a request, what its tokens cost, whether its key is over a limit.

Tiers follow the OpenAI API's `service_tier` convention: a request asks for `auto`, `default`, `flex`
or `priority` (or any tier the factory config adds), and the response says which tier served it.
A tier carries prices per million tokens (per model, with a default), SLO targets, the engine
scheduling priority of its requests, rate limits, a token quota per period and whether it may be
shed. A free plan is a tier priced at zero with a quota, and keys limited to it.

The config may also list the models the factory serves (`models`), each with its own pool of
workers; without that list, `tokenfactory serve`'s flags describe a factory of one model.

Pure policy: no I/O (the config arrives as YAML text, the clock as an argument), so the gateway
and the twin call the same code.
"""

from __future__ import annotations

import bisect
import math
from collections import deque
from dataclasses import dataclass, field
from pathlib import PurePath

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tokenfactory.control.disagg import DisaggConfig
from tokenfactory.control.governor import PowerSpec
from tokenfactory.control.router import ROUTERS
from tokenfactory.engine.config import DTYPES, CacheConfig, SchedulerConfig
from tokenfactory.engine.tiny import TINY_MODEL_NAME

AUTO = "auto"
"""The request lets the key's default tier serve it."""

DEFAULT_MODEL_PRICE = "default"
"""The key of `TierSpec.prices` used for models the tier does not price by name."""


class ConfigModel(BaseModel):
    """Config files are strict: an unknown or misspelled field is an error, not a silent default."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Prices(ConfigModel):
    """US dollars per million tokens."""

    input: float = Field(default=0.0, ge=0, description="per million uncached prompt tokens")
    cached_input: float = Field(default=0.0, ge=0, description="per million prompt tokens served from the prefix cache")
    output: float = Field(default=0.0, ge=0, description="per million completion tokens")


class SLO(ConfigModel):
    """Latency targets the tier promises (the admission and planner steps will act on them)."""

    ttft_s: float = Field(default=2.0, gt=0, description="time to first token, seconds")
    itl_s: float = Field(default=0.1, gt=0, description="inter-token latency, seconds")


class TierSpec(ConfigModel):
    prices: dict[str, Prices] = Field(default_factory=lambda: {DEFAULT_MODEL_PRICE: Prices()},
                                      description="per served model name, plus `default` for the rest")
    slo: SLO = Field(default_factory=SLO)
    priority: int = Field(default=0, ge=-1000, le=1000, description="engine scheduling priority: higher runs first")
    requests_per_minute: int | None = Field(default=None, ge=1, description="per key; none: unlimited")
    tokens_per_minute: int | None = Field(default=None, ge=1, description="per key, prompt + completion")
    token_quota: int | None = Field(default=None, ge=1, description="per key per quota period; none: unlimited")
    quota_period_s: float = Field(default=86400.0, gt=0, description="length of a quota period, seconds")
    sheddable: bool = Field(default=False, description="may be shed or preempted under overload")

    @model_validator(mode="after")
    def _has_default_price(self) -> TierSpec:
        if DEFAULT_MODEL_PRICE not in self.prices:
            raise ValueError(f"prices must include a `{DEFAULT_MODEL_PRICE}` entry for models not named")
        return self

    def prices_for(self, model: str) -> Prices:
        return self.prices.get(model, self.prices[DEFAULT_MODEL_PRICE])


TINY_PATH = "tiny"
"""A model's `path` that names the built-in tiny model (written on first start, nothing downloaded)."""


class ModelSpec(ConfigModel):
    """One served model and its own pool of workers: what `serve`'s per-model flags say for one."""

    name: str | None = Field(default=None, min_length=1,
                             description="the name clients send as `model` (default: the folder name)")
    path: str = Field(default=TINY_PATH, min_length=1,
                      description="checkpoint folder in the Hugging Face layout (relative: to the config "
                                  f"file), or `{TINY_PATH}` for the built-in model")
    workers: int = Field(default=1, ge=1, description="engine processes; more than one sit behind the router")
    prefill_workers: int = Field(default=0, ge=0, description="disaggregated: prefill-only engine processes")
    decode_workers: int = Field(default=0, ge=0, description="disaggregated: decode engine processes")
    disagg_min_prompt_tokens: int = Field(default=DisaggConfig().min_prompt_tokens, ge=1,
                                          description="shorter prompts are served whole on a decode worker")
    router: str = Field(default="kv", description=f"one of {', '.join(ROUTERS)}")
    session_affinity: bool = Field(default=True, description="keep a session on the worker of its last turn")
    transport: str = Field(default="local", pattern=r"^(local|ray)$",
                           description="local: engine processes on this machine; ray: Ray actors wherever the "
                                       "cluster places them (the `ray` extra)")
    device: str = Field(default="cpu", pattern=r"^(cpu|cuda(:\d+)?)$", description="cpu, cuda or cuda:N")
    dtype: str | None = Field(default=None, description="compute dtype (default: float32 on cpu, else bfloat16)")
    seed: int = 0
    max_model_len: int = Field(default=0, ge=0, description="context window; 0: the model's")
    max_num_seqs: int = Field(default=SchedulerConfig.max_num_seqs, ge=1)
    max_num_batched_tokens: int = Field(default=SchedulerConfig.max_num_batched_tokens, ge=1,
                                        description="the scheduler's token budget per step")
    block_size: int = Field(default=CacheConfig.block_size, ge=1, le=256)
    num_blocks: int | None = Field(default=None, ge=1, description="KV cache blocks per worker (default: sized "
                                                                   "from a memory budget)")

    @model_validator(mode="after")
    def _check_pool(self) -> ModelSpec:
        if self.router not in ROUTERS:
            raise ValueError(f"router {self.router!r} is not one of {', '.join(ROUTERS)}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {', '.join(DTYPES)}")
        if bool(self.prefill_workers) != bool(self.decode_workers):
            raise ValueError("disaggregated serving needs both prefill_workers and decode_workers")
        if self.prefill_workers and "workers" in self.model_fields_set:
            raise ValueError("give workers, or prefill_workers and decode_workers, not both")
        return self

    @property
    def served_name(self) -> str:
        """The name clients use: `name`, else the folder's name (the tiny model's own name)."""
        if self.name is not None:
            return self.name
        return TINY_MODEL_NAME if self.path == TINY_PATH else PurePath(self.path.rstrip("/")).name

    @property
    def num_workers(self) -> int:
        return self.prefill_workers + self.decode_workers if self.prefill_workers else self.workers


class FactoryConfig(ConfigModel):
    """The tiers a factory sells and the one a key gets when it names none; optionally its models."""

    tiers: dict[str, TierSpec] = Field(min_length=1)
    default_tier: str = "default"
    power: PowerSpec = Field(default_factory=PowerSpec, description="power cap and grid events (the governor)")
    models: list[ModelSpec] = Field(default_factory=list,
                                    description="the models served, each with its own pool (none: serve's flags)")

    @model_validator(mode="after")
    def _check_names(self) -> FactoryConfig:
        if AUTO in self.tiers:
            raise ValueError(f"`{AUTO}` is not a tier name: it asks for the key's default tier")
        if self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not one of the tiers {sorted(self.tiers)}")
        names = [m.served_name for m in self.models]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise ValueError(f"models served under the same name: {', '.join(repeated)}")
        if names:
            self.check_priced_models(names)
        return self

    def check_priced_models(self, served: list[str]) -> None:
        """Raise ValueError if a tier prices a model that is not served: a misspelled name would
        otherwise bill that model at the tier's `default` price without a word."""
        for tier, spec in self.tiers.items():
            unknown = sorted(set(spec.prices) - {DEFAULT_MODEL_PRICE, *served})
            if unknown:
                raise ValueError(f"tier {tier!r} prices {', '.join(unknown)}, which the factory does not serve "
                                 f"(it serves {', '.join(served)})")


def builtin_config() -> FactoryConfig:
    """The tiers with no config file: flex at half price and sheddable, priority at twice the price."""

    def tier(scale: float, priority: int, ttft_s: float, sheddable: bool) -> TierSpec:
        prices = Prices(input=0.10 * scale, cached_input=0.025 * scale, output=0.40 * scale)
        return TierSpec(prices={DEFAULT_MODEL_PRICE: prices}, priority=priority,
                        slo=SLO(ttft_s=ttft_s, itl_s=0.1 if not sheddable else 1.0), sheddable=sheddable)

    return FactoryConfig(tiers={
        "flex": tier(0.5, -10, 30.0, True),
        "default": tier(1.0, 0, 2.0, False),
        "priority": tier(2.0, 10, 0.5, False),
    })


class ConfigError(ValueError):
    """A factory config that does not parse or validate; the message names the source and the field."""


def parse_factory_config(text: str, source: str = "<config>") -> FactoryConfig:
    """Parse and validate a factory config file's YAML text (the caller reads the file)."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with a `tiers` key, got {type(data).__name__}")
    try:
        return FactoryConfig.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(str(p) for p in err['loc']) or 'top level'}: {err['msg']}"
                             for err in e.errors())
        raise ConfigError(f"{source}: {problems}") from None


# ---------------------------------------------------------------- choosing a tier


@dataclass(frozen=True, slots=True)
class KeyPolicy:
    """What a key may ask for."""

    default_tier: str
    allowed_tiers: frozenset[str]


@dataclass(frozen=True, slots=True)
class TierRefusal:
    """Why a request's `service_tier` was refused: `status` 400 for a tier that does not exist,
    403 for a real tier this key may not use (the request is valid; the key lacks the right)."""

    status: int
    code: str
    message: str


def pick_tier(config: FactoryConfig, key: KeyPolicy, requested: str | None) -> str | TierRefusal:
    """The tier that serves the request, or why not. Never upgrades or downgrades silently."""
    if requested is None or requested == AUTO:
        name = key.default_tier if key.default_tier in config.tiers else config.default_tier
        if name not in key.allowed_tiers:
            return TierRefusal(403, "tier_not_allowed", f"This API key's default tier `{name}` is not available.")
        return name
    if requested not in config.tiers:
        return TierRefusal(400, "invalid_service_tier",
                           f"Unknown service_tier `{requested}`; choose one of "
                           f"{', '.join([AUTO, *sorted(config.tiers)])}.")
    if requested not in key.allowed_tiers:
        return TierRefusal(403, "tier_not_allowed",
                           f"This API key may not use service_tier `{requested}`; it may use "
                           f"{', '.join(sorted(key.allowed_tiers & config.tiers.keys())) or 'no tier'}.")
    return requested


# ---------------------------------------------------------------- pricing


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def price_usage(tier: TierSpec, model: str, usage: TokenUsage) -> float:
    """The cost in US dollars: cached prompt tokens at the cached price, the rest at the input price."""
    p = tier.prices_for(model)
    uncached = usage.prompt_tokens - usage.cached_tokens
    return (uncached * p.input + usage.cached_tokens * p.cached_input + usage.completion_tokens * p.output) / 1e6


# ---------------------------------------------------------------- rate limits and quotas


@dataclass(slots=True)
class _KeyWindow:
    requests: deque[float] = field(default_factory=deque)  # admission times in the last minute
    tokens: deque[tuple[float, int]] = field(default_factory=deque)  # (time, tokens) in the last minute
    tokens_sum: int = 0  # the sum of `tokens`, kept as they come and go (admit is asked per request)
    quota_period: int = -1  # index of the quota period `quota_used` counts
    quota_used: int = 0


@dataclass(frozen=True, slots=True)
class LimitExceeded:
    """A 429: which limit, and after how many seconds a retry can succeed."""

    limit: str
    retry_after_s: float
    message: str


class RateLimiter:
    """Per (key, tier): requests and tokens in a sliding minute, tokens in fixed quota periods.

    `admit` is asked before a request runs; `record` adds its tokens once they are known, so a
    key at its token limit gets 429 on its next request, not in the middle of one.
    """

    WINDOW_S = 60.0

    def __init__(self, config: FactoryConfig) -> None:
        self.config = config
        self._windows: dict[tuple[str, str], _KeyWindow] = {}

    def admit(self, key_id: str, tier: str, now: float) -> LimitExceeded | None:
        spec = self.config.tiers[tier]
        w = self._window(key_id, tier, spec, now)
        if spec.token_quota is not None and w.quota_used >= spec.token_quota:
            period_end = (w.quota_period + 1) * spec.quota_period_s
            return LimitExceeded("token_quota", period_end - now,
                                 f"You exceeded your token quota of {spec.token_quota} tokens per "
                                 f"{spec.quota_period_s:g} s on tier `{tier}`.")
        if spec.requests_per_minute is not None and len(w.requests) >= spec.requests_per_minute:
            return LimitExceeded("requests_per_minute", w.requests[0] + self.WINDOW_S - now,
                                 f"Rate limit reached: {spec.requests_per_minute} requests per minute "
                                 f"on tier `{tier}`.")
        if spec.tokens_per_minute is not None and w.tokens_sum >= spec.tokens_per_minute:
            return LimitExceeded("tokens_per_minute", w.tokens[0][0] + self.WINDOW_S - now,
                                 f"Rate limit reached: {spec.tokens_per_minute} tokens per minute on tier `{tier}`.")
        w.requests.append(now)
        return None

    def record(self, key_id: str, tier: str, num_tokens: int, now: float) -> None:
        spec = self.config.tiers[tier]
        w = self._window(key_id, tier, spec, now)
        if num_tokens:  # a zero entry would only date the window's Retry-After too early
            w.tokens.append((now, num_tokens))
            w.tokens_sum += num_tokens
        w.quota_used += num_tokens

    # A restarted gateway reads back from its ledger what the previous one counted (the ledger
    # holds every request), so restarting never refills a quota or resets a rate window.

    def restore_quota(self, key_id: str, tier: str, num_tokens: int, now: float) -> None:
        """Count tokens already used in the quota period that holds `now`."""
        w = self._window(key_id, tier, self.config.tiers[tier], now)
        w.quota_used += num_tokens

    def restore_request(self, key_id: str, tier: str, admitted_at: float, ended_at: float, num_tokens: int,
                        now: float) -> None:
        """Put a past request back into the per-minute windows (not the quota: `restore_quota`)."""
        w = self._window(key_id, tier, self.config.tiers[tier], now)
        if admitted_at > now - self.WINDOW_S:
            bisect.insort(w.requests, admitted_at)
        if ended_at > now - self.WINDOW_S:
            bisect.insort(w.tokens, (ended_at, num_tokens))
            w.tokens_sum += num_tokens

    def _window(self, key_id: str, tier: str, spec: TierSpec, now: float) -> _KeyWindow:
        w = self._windows.setdefault((key_id, tier), _KeyWindow())
        horizon = now - self.WINDOW_S
        while w.requests and w.requests[0] <= horizon:
            w.requests.popleft()
        while w.tokens and w.tokens[0][0] <= horizon:
            w.tokens_sum -= w.tokens.popleft()[1]
        period = math.floor(now / spec.quota_period_s)
        if period != w.quota_period:
            w.quota_period, w.quota_used = period, 0
        return w


def retry_after_header(limit: LimitExceeded) -> str:
    """Whole seconds, at least 1 (HTTP's Retry-After takes an integer)."""
    return str(max(1, math.ceil(limit.retry_after_s)))
