"""Validation of ``features.rate_limiting`` into typed, frozen settings."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import quote

from llmproxy.config import ConfigError
from llmproxy.identity import fingerprint

PREFIX = "features.rate_limiting"
LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "requests_per_day", "tokens_per_day")
SCOPE_KINDS = ("global", "provider", "model", "key", "user")
OVERRIDE_KINDS = {"per_key": "key", "per_user": "user", "per_model": "model",
                  "per_provider": "provider"}
BACKENDS = ("memory", "redis")
ON_ERROR = ("open", "closed")
COUNT_TOKENS = ("input", "output", "total")


@dataclass(frozen=True, slots=True)
class Limits:
    """Limits of one scope; 0 = unlimited."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0
    requests_per_day: int = 0
    tokens_per_day: int = 0

    def merged(self, partial: Mapping[str, int]) -> Limits:
        return replace(self, **partial)

    def any(self) -> bool:
        return any(getattr(self, k) for k in LIMIT_KEYS)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    key_prefix: str = "llmproxy:"
    timeout_ms: int = 50
    on_error: str = "open"
    reconcile_delay_ms: int = 100


@dataclass(frozen=True, slots=True)
class Estimation:
    max_sample_bytes: int = 20000
    bytes_per_token: float = 4.0
    chars_per_token: float = 4.0
    # measured with scripts/token_estimation.py; the same defaults as configs/base.yml
    provider_chars_per_token: dict[str, float] = field(
        default_factory=lambda: {"openai": 5.0, "anthropic": 3.0})


_DEFAULT_REDIS = RedisSettings()
_DEFAULT_ESTIMATION = Estimation()


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    enabled: bool = False
    backend: str = "memory"
    redis: RedisSettings = field(default_factory=RedisSettings)
    count_tokens: str = "total"
    limits: Limits = field(default_factory=Limits)
    # scope kind -> limits for every scope of that kind (``limits`` merged with scope_limits)
    scope_limits: dict[str, Limits] = field(default_factory=dict)
    # scope kind -> scope id -> partial limits replacing the kind's defaults for that scope;
    # API keys are held as fingerprints only
    overrides: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    estimation: Estimation = field(default_factory=Estimation)

    def limits_for(self, kind: str, scope_id: str) -> Limits:
        """Effective limits of one scope: override > scope_limits[kind] > limits."""
        base = self.scope_limits.get(kind, self.limits)
        partial = self.overrides.get(kind, {}).get(scope_id)
        return base if partial is None else base.merged(partial)


def _mapping(value: Any, key: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a mapping")
    return value


def _no_unknown(section: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    for name in section:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key (allowed: {', '.join(allowed)})")


def _int(value: Any, key: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(key, f"must be an integer >= {minimum}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, f"must be at most {maximum}")
    return value


# A correction held longer would risk its bucket leaving the one-minute window meanwhile.
MAX_RECONCILE_DELAY_MS = 10_000


def _positive(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(key, "must be a number > 0")
    return float(value)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}")
    return str(value)


def _partial_limits(value: Any, key: str) -> dict[str, int]:
    section = _mapping(value, key)
    _no_unknown(section, key, LIMIT_KEYS)
    return {name: _int(v, f"{key}.{name}") for name, v in section.items()}


def _redis(section: Mapping[str, Any], environ: Mapping[str, str]) -> RedisSettings:
    key = f"{PREFIX}.redis"
    # address/password/db: the Go original's shape, still accepted
    _no_unknown(section, key, ("url", "key_prefix", "timeout_ms", "on_error",
                               "reconcile_delay_ms", "address", "password", "db"))
    url = section.get("url")
    if url is None and "address" in section:
        password = section.get("password") or ""
        auth = f":{quote(str(password), safe='')}@" if password else ""
        url = f"redis://{auth}{section['address']}/{_int(section.get('db', 0), f'{key}.db')}"
    url = environ.get("LLMPROXY_REDIS_URL") or url or _DEFAULT_REDIS.url
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(f"{key}.url", "must be a redis://, rediss:// or unix:// URL")
    prefix = section.get("key_prefix", _DEFAULT_REDIS.key_prefix)
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
        raise ConfigError(f"{key}.key_prefix", "must be a string without { or }")
    return RedisSettings(
        url=url,
        key_prefix=prefix,
        timeout_ms=_int(section.get("timeout_ms", _DEFAULT_REDIS.timeout_ms),
                        f"{key}.timeout_ms", 1),
        on_error=_choice(section.get("on_error", "open"), f"{key}.on_error", ON_ERROR),
        reconcile_delay_ms=_int(section.get("reconcile_delay_ms",
                                            _DEFAULT_REDIS.reconcile_delay_ms),
                                f"{key}.reconcile_delay_ms", maximum=MAX_RECONCILE_DELAY_MS),
    )


def _estimation(section: Mapping[str, Any]) -> Estimation:
    key = f"{PREFIX}.estimation"
    _no_unknown(section, key, ("max_sample_bytes", "bytes_per_token", "chars_per_token",
                               "provider_chars_per_token"))
    per_provider = _mapping(section.get("provider_chars_per_token",
                                        _DEFAULT_ESTIMATION.provider_chars_per_token),
                            f"{key}.provider_chars_per_token")
    d = _DEFAULT_ESTIMATION
    return Estimation(
        max_sample_bytes=_int(section.get("max_sample_bytes", d.max_sample_bytes),
                              f"{key}.max_sample_bytes"),
        bytes_per_token=_positive(section.get("bytes_per_token", d.bytes_per_token),
                                  f"{key}.bytes_per_token"),
        chars_per_token=_positive(section.get("chars_per_token", d.chars_per_token),
                                  f"{key}.chars_per_token"),
        provider_chars_per_token={
            str(name): _positive(v, f"{key}.provider_chars_per_token.{name}")
            for name, v in per_provider.items()
        },
    )


def parse(raw_config: Mapping[str, Any],
          environ: Mapping[str, str] | None = None) -> RateLimitSettings:
    """Validate the whole merged config's rate-limiting block; raises :class:`ConfigError`."""
    env = os.environ if environ is None else environ
    features = _mapping(raw_config.get("features"), "features")
    section = _mapping(features.get("rate_limiting"), PREFIX)
    _no_unknown(section, PREFIX, ("enabled", "backend", "redis", "count_tokens", "limits",
                                  "scope_limits", "overrides", "estimation"))
    enabled = section.get("enabled", False)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{PREFIX}.enabled", "must be true or false")
    limits = Limits().merged(_partial_limits(section.get("limits"), f"{PREFIX}.limits"))

    scope_section = _mapping(section.get("scope_limits"), f"{PREFIX}.scope_limits")
    _no_unknown(scope_section, f"{PREFIX}.scope_limits", SCOPE_KINDS)
    scope_limits = {
        kind: limits.merged(_partial_limits(value, f"{PREFIX}.scope_limits.{kind}"))
        for kind, value in scope_section.items()
    }

    overrides_section = _mapping(section.get("overrides"), f"{PREFIX}.overrides")
    _no_unknown(overrides_section, f"{PREFIX}.overrides", tuple(OVERRIDE_KINDS))
    overrides: dict[str, dict[str, dict[str, int]]] = {}
    for name, kind in OVERRIDE_KINDS.items():
        table = _mapping(overrides_section.get(name), f"{PREFIX}.overrides.{name}")
        parsed: dict[str, dict[str, int]] = {}
        for n, (scope_id, value) in enumerate(table.items()):
            # per_key entries may be raw API keys: name them by position, never by value
            label = f"[{n}]" if kind == "key" else f".{scope_id}"
            limits_ = _partial_limits(value, f"{PREFIX}.overrides.{name}{label}")
            scope = str(scope_id)
            if kind == "key" and not scope.startswith("fp_"):
                scope = fingerprint(scope)  # keep no raw key past start-up
            parsed[scope] = limits_
        overrides[kind] = parsed

    return RateLimitSettings(
        enabled=enabled,
        backend=_choice(section.get("backend", "memory"), f"{PREFIX}.backend", BACKENDS),
        redis=_redis(_mapping(section.get("redis"), f"{PREFIX}.redis"), env),
        count_tokens=_choice(section.get("count_tokens", "total"), f"{PREFIX}.count_tokens",
                             COUNT_TOKENS),
        limits=limits,
        scope_limits=scope_limits,
        overrides=overrides,
        estimation=_estimation(_mapping(section.get("estimation"), f"{PREFIX}.estimation")),
    )
