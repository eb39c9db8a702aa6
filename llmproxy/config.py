"""Configuration: YAML files deep-merged, environment overrides, one typed settings tree.

This is the only module where YAML and environment variables become values: every section
has its parser here, every parser raises :class:`ConfigError` naming the key, and
``python -m llmproxy check-config`` runs exactly :func:`load_settings`, as the app does.
Each setting is described in README.md and configs/base.yml.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

from .identity import DEFAULT_USER_SOURCES, USER_SOURCES, fingerprint
from .providers import DIALECTS

_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_RESERVED_NAMES = {"health", "metrics", "meta", "static", "admin"}
#: gunicorn's worker_connections when WORKER_CONNECTIONS is unset (gunicorn.conf.py).
DEFAULT_WORKER_CONNECTIONS = 4096


class ConfigError(Exception):
    """An invalid setting; the message names the key and the problem in one line."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"invalid config: {key}: {problem}")
        self.key = key
        self.problem = problem


def deep_merge(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """Merge ``overlay`` into a copy of ``base``; keys the overlay does not mention are kept."""
    merged = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        with path.open(encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except OSError as exc:
        raise ConfigError(str(path.name), f"cannot read file ({exc.strerror})") from None
    except yaml.YAMLError as exc:
        raise ConfigError(str(path.name), f"not valid YAML ({exc})".replace("\n", " ")) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(str(path.name), "top level must be a mapping")
    return data


class ConfigDir(NamedTuple):
    path: Path
    source: str  # how it was found: "LLMPROXY_CONFIG_DIR", "./configs" or "packaged"


def config_dir(environ: Mapping[str, str] | None = None) -> ConfigDir:
    """The YAML directory: $LLMPROXY_CONFIG_DIR, else ./configs, else the packaged copy."""
    env = os.environ if environ is None else environ
    explicit = env.get("LLMPROXY_CONFIG_DIR")
    if explicit:
        if not Path(explicit).is_dir():
            raise ConfigError("LLMPROXY_CONFIG_DIR", f"not a directory: {explicit}")
        return ConfigDir(Path(explicit).resolve(), "LLMPROXY_CONFIG_DIR")
    # Only a ./configs that holds a base.yml: "configs" is a common name for other things.
    if Path("configs", "base.yml").is_file():
        return ConfigDir(Path("configs").resolve(), "./configs")
    package = Path(__file__).resolve().parent
    packaged = package / "configs"  # the wheel's package data
    if not packaged.is_dir():  # a source checkout, where pyproject maps the package to configs/
        packaged = package.parent / "configs"
    return ConfigDir(packaged, "packaged")


def load_raw(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """base.yml <- <LLMPROXY_ENV>.yml <- $LLMPROXY_CONFIG <- ``overrides`` <- env vars."""
    env = os.environ if environ is None else environ
    directory = config_dir(env).path
    raw = _read_yaml(directory / "base.yml")
    pricing = directory / "pricing.yml"  # the price table lives in its own file
    if pricing.exists():
        raw = deep_merge(raw, _read_yaml(pricing))
    env_name = env.get("LLMPROXY_ENV", "dev")
    if not _NAME_RE.match(env_name):
        raise ConfigError("LLMPROXY_ENV", f"invalid environment name {env_name!r}")
    overlay = directory / f"{env_name}.yml"
    if overlay.exists():
        raw = deep_merge(raw, _read_yaml(overlay))
    extra = env.get("LLMPROXY_CONFIG")
    if extra:
        raw = deep_merge(raw, _read_yaml(Path(extra)))
    if overrides:
        raw = deep_merge(raw, overrides)
    for name, provider in (raw.get("providers") or {}).items():
        url = env.get(f"LLMPROXY_{str(name).upper().replace('-', '_')}_BASE_URL")
        if url and isinstance(provider, dict):
            provider["base_url"] = url
    if env.get("LOG_LEVEL"):
        level = env["LOG_LEVEL"].lower()
        raw.setdefault("logging", {})["level"] = "warning" if level == "warn" else level
    if env.get("LOG_FORMAT"):
        raw.setdefault("logging", {})["format"] = env["LOG_FORMAT"]
    return raw



# ------------------------------------------------------------------------ typed settings


@dataclass(frozen=True, slots=True)
class ServerSettings:
    max_body_bytes: int
    inspect_max_bytes: int
    trusted_proxies: int
    # who may name the user, in order of precedence (identity.resolve_user)
    user_sources: tuple[str, ...] = DEFAULT_USER_SOURCES
    body_timeout: float = 30.0
    send_timeout: float = 60.0


@dataclass(frozen=True, slots=True)
class UpstreamSettings:
    connect_timeout: float
    read_timeout: float
    pool_maxsize: int
    health_failure_threshold: int
    health_window_seconds: float


class Secret:
    """A credential read from the environment or a file: its repr and str never show it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    base_url: str  # no trailing slash
    dialect: str
    # Where the provider's own key comes from (for calls made with a proxy key), and the key,
    # read at start-up when auth.mode is keys or mixed.
    api_key_env: str | None = None
    api_key_file: str | None = None
    api_key: Secret | None = None


@dataclass(frozen=True, slots=True)
class CorsSettings:
    origins: str | list[str]
    max_age: int


@dataclass(frozen=True, slots=True)
class LoggingSettings:
    level: str
    format: str


@dataclass(frozen=True, slots=True)
class MetricsSettings:
    enabled: bool = True
    bearer_token: str = ""
    max_models: int = 100


@dataclass(frozen=True, slots=True)
class UsageRecordSettings:
    enabled: bool = False
    path: str = "logs/usage.jsonl"
    max_bytes: int = 100 * 1024 * 1024
    backups: int = 5


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens for one prompt-length band."""

    input: float
    output: float
    cached_input: float
    cache_write: float


@dataclass(frozen=True, slots=True)
class ModelPrice:
    """A model's base rates and, where the provider prices by prompt length, higher bands."""

    name: str
    base: Rates
    tiers: tuple[tuple[int, Rates], ...] = ()  # (above_prompt_tokens, rates), ascending

    def rates_for(self, prompt_tokens: int) -> Rates:
        rates = self.base
        for threshold, tier in self.tiers:
            if prompt_tokens > threshold:
                rates = tier
        return rates


@dataclass(frozen=True, slots=True)
class PricingSettings:
    as_of: str | None = None
    models: dict[str, dict[str, ModelPrice]] = field(default_factory=dict)  # provider -> name
    aliases: dict[str, dict[str, str]] = field(default_factory=dict)  # provider -> alias -> name


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
    # Connections per worker: its concurrency (WORKER_CONNECTIONS) plus the correction sender,
    # so no call ever waits for one; see docs/rate-limiting.md.
    max_connections: int = DEFAULT_WORKER_CONNECTIONS + 1


#: Counters the memory backend keeps per worker before forgetting the least recently charged.
DEFAULT_MAX_COUNTERS = 50_000
# Below this, one request's own counters (up to 20) could push each other out.
MIN_MAX_COUNTERS = 100


@dataclass(frozen=True, slots=True)
class MemoryStoreSettings:
    max_counters: int = DEFAULT_MAX_COUNTERS


@dataclass(frozen=True, slots=True)
class Estimation:
    max_sample_bytes: int = 20000
    bytes_per_token: float = 4.0
    chars_per_token: float = 4.0
    # measured with scripts/token_estimation.py; the same defaults as configs/base.yml
    provider_chars_per_token: dict[str, float] = field(
        default_factory=lambda: {"openai": 5.0, "anthropic": 3.0})

    def divisor(self, route: str | None, dialect: str | None) -> float:
        """Characters per token for a provider route: by route name, then dialect."""
        per = self.provider_chars_per_token
        return per.get(route or "") or per.get(dialect or "") or self.chars_per_token


@dataclass(frozen=True, slots=True)
class RateLimitSettings:
    enabled: bool = False
    backend: str = "memory"
    redis: RedisSettings = field(default_factory=RedisSettings)
    memory: MemoryStoreSettings = field(default_factory=MemoryStoreSettings)
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



@dataclass(frozen=True, slots=True)
class AuthSettings:
    """Who may call: the caller's own provider key (passthrough) or a proxy key."""

    mode: str = "passthrough"  # passthrough | keys | mixed
    database_url: str = "sqlite:///data/llmproxy.db"  # may hold a password: never log it
    admin_token: str = ""  # empty: no /admin
    key_cache_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class BudgetSettings:
    """USD spend budgets (docs/budgets.md): reserved before a call, settled at its end."""

    enabled: bool = False
    default_output_tokens: int = 4096  # output assumed when a request sets no cap
    unpriced: str = "deny"  # deny | allow: a budgeted call to a model with no price
    ledger_flush_seconds: float = 1.0
    refresh_seconds: float = 5.0  # how often a worker reloads the user and team budgets
    hold_seconds: float = 3600.0  # a hold no worker settles is released after this long
    on_error: str = "closed"  # closed (503) | open: the budget store cannot be reached
    max_pending: int = 10_000  # ledger rows a worker queues while the database is down


@dataclass(frozen=True, slots=True)
class Settings:
    """Every setting, validated; built once at start-up by :func:`build_settings`."""

    providers: dict[str, ProviderSettings]
    server: ServerSettings
    upstream: UpstreamSettings
    cors: CorsSettings
    logging: LoggingSettings
    metrics: MetricsSettings
    usage_records: UsageRecordSettings
    pricing: PricingSettings
    ratelimit: RateLimitSettings
    telemetry: TelemetrySettings = field(default_factory=lambda: TelemetrySettings())
    auth: AuthSettings = field(default_factory=AuthSettings)
    budgets: BudgetSettings = field(default_factory=BudgetSettings)


# ------------------------------------------------------------------------- value checks


def _section(raw: Mapping[str, Any], key: str, where: str | None = None) -> Mapping[str, Any]:
    """``raw[key]`` as a mapping (missing or null: empty); ``where`` names it in errors."""
    value = raw.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(where or key, "must be a mapping")
    return value


def _no_unknown(section: Mapping[str, Any], key: str, allowed: tuple[str, ...]) -> None:
    for name in section:
        if name not in allowed:
            raise ConfigError(f"{key}.{name}", f"unknown key (allowed: {', '.join(allowed)})")


def _int(value: Any, key: str, minimum: int = 0, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(key, f"must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(key, f"must be >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise ConfigError(key, f"must be at most {maximum}, got {value!r}")
    return value


def _number(value: Any, key: str, minimum: float = 0.0, *, exclusive: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(key, f"must be a number, got {value!r}")
    if value < minimum or (exclusive and value == minimum):
        raise ConfigError(key, f"must be {'>' if exclusive else '>='} {minimum}, got {value!r}")
    return float(value)


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(key, f"must be true or false, got {value!r}")
    return value


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(key, f"must be one of {', '.join(choices)}, got {value!r}")
    return str(value)


def _str(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(key, f"must be a string, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------- section parsers


_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _provider_key(key: str, spec: Mapping[str, Any], environ: Mapping[str, str],
                  required: bool) -> tuple[str | None, str | None, Secret | None]:
    """``api_key_env`` / ``api_key_file`` and, when ``required``, the key they name (the
    file's, when both are set).

    Errors name the variable or file, never the value.
    """
    env_name, file_name = spec.get("api_key_env"), spec.get("api_key_file")
    if env_name is not None and (not isinstance(env_name, str)
                                 or not _ENV_NAME_RE.match(env_name)):
        raise ConfigError(f"{key}.api_key_env", "must be an environment variable name")
    if file_name is not None and (not isinstance(file_name, str) or not file_name):
        raise ConfigError(f"{key}.api_key_file", "must be a file path")
    if not required or not (env_name or file_name):
        return env_name, file_name, None
    if not file_name:  # a file, when given, wins: overlays add one over base.yml's variable
        value, where = environ.get(str(env_name), "").strip(), f"{key}.api_key_env"
        if not value:
            raise ConfigError(where, f"environment variable {env_name} is not set or empty "
                                     f"(auth.mode needs it; set {where}: null for no key)")
    else:
        where = f"{key}.api_key_file"
        try:
            value = Path(file_name).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise ConfigError(where, f"cannot read {file_name} ({reason})") from None
        if not value:
            raise ConfigError(where, f"{file_name} is empty")
    # A key that would break the header it is sent in: say so without echoing it.
    if any(ord(c) < 0x21 or ord(c) == 0x7f for c in value):
        raise ConfigError(where, "the key contains whitespace or control characters")
    return env_name, file_name, Secret(value)


def _provider(name: Any, spec: Any, environ: Mapping[str, str] | None = None,
              key_required: bool = False) -> ProviderSettings:
    key = f"providers.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES \
            or name.endswith("_meta"):  # "<name>_meta" is the blueprint of /meta/<user>/<name>
        raise ConfigError(key, "provider names are lower-case letters, digits, '-' or '_', "
                               f"not {', '.join(sorted(_RESERVED_NAMES))}, "
                               "and not ending in _meta")
    if not isinstance(spec, Mapping):
        raise ConfigError(key, "must be a mapping with base_url and dialect")
    url = spec.get("base_url")
    if not isinstance(url, str):
        raise ConfigError(f"{key}.base_url", "is required")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}.base_url", f"must be an http(s) URL, got {url!r}")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ConfigError(f"{key}.base_url", "must not contain a query, fragment or credentials")
    dialect = str(spec.get("dialect", "openai"))
    if dialect not in DIALECTS:
        raise ConfigError(f"{key}.dialect", f"must be one of {', '.join(DIALECTS)}")
    _no_unknown(spec, key, ("base_url", "dialect", "api_key_env", "api_key_file"))
    env_name, file_name, secret = _provider_key(key, spec, environ or {}, key_required)
    return ProviderSettings(name, url.rstrip("/"), dialect, env_name, file_name, secret)


def parse_providers(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                    keys_required: bool = False) -> dict[str, ProviderSettings]:
    """``providers``; their own keys are read only when ``keys_required`` (auth.mode keys or
    mixed), so a pass-through proxy needs none of them."""
    providers = {}
    for name, spec in _section(raw, "providers").items():
        if spec is None:  # an overlay may switch a provider off with `name: null`
            continue
        providers[name] = _provider(name, spec, environ, keys_required)
    if not providers:
        raise ConfigError("providers", "at least one provider is required")
    return providers


def _user_sources(value: Any, key: str) -> tuple[str, ...]:
    if value is None:
        return DEFAULT_USER_SOURCES
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(key, f"must be a list of sources ({', '.join(USER_SOURCES)})")
    for source in value:
        if source not in USER_SOURCES:
            raise ConfigError(key, f"unknown source {source!r} "
                                   f"(allowed: {', '.join(USER_SOURCES)})")
    if len(set(value)) != len(value):
        raise ConfigError(key, "lists a source twice")
    return tuple(value)


def parse_server(raw: Mapping[str, Any]) -> ServerSettings:
    s = _section(raw, "server")
    return ServerSettings(
        max_body_bytes=_int(s.get("max_body_bytes"), "server.max_body_bytes", 1),
        inspect_max_bytes=_int(s.get("inspect_max_bytes"), "server.inspect_max_bytes"),
        trusted_proxies=_int(s.get("trusted_proxies"), "server.trusted_proxies"),
        user_sources=_user_sources(s.get("user_sources"), "server.user_sources"),
        body_timeout=_number(s.get("body_timeout"), "server.body_timeout", 0, exclusive=True),
        send_timeout=_number(s.get("send_timeout"), "server.send_timeout", 0, exclusive=True),
    )


def parse_upstream(raw: Mapping[str, Any]) -> UpstreamSettings:
    s = _section(raw, "upstream")
    return UpstreamSettings(
        connect_timeout=_number(s.get("connect_timeout"), "upstream.connect_timeout", 0.001),
        read_timeout=_number(s.get("read_timeout"), "upstream.read_timeout", 0.001),
        pool_maxsize=_int(s.get("pool_maxsize"), "upstream.pool_maxsize", 1),
        health_failure_threshold=_int(s.get("health_failure_threshold"),
                                      "upstream.health_failure_threshold", 1),
        health_window_seconds=_number(s.get("health_window_seconds"),
                                      "upstream.health_window_seconds", 1),
    )


def parse_cors(raw: Mapping[str, Any]) -> CorsSettings:
    s = _section(raw, "cors")
    origins = s.get("origins", "*")
    if not (isinstance(origins, str) or (
        isinstance(origins, list) and all(isinstance(o, str) for o in origins)
    )):
        raise ConfigError("cors.origins", "must be \"*\" or a list of origins")
    return CorsSettings(origins, _int(s.get("max_age"), "cors.max_age"))


def parse_logging(raw: Mapping[str, Any]) -> LoggingSettings:
    s = _section(raw, "logging")
    return LoggingSettings(
        level=_choice(str(s.get("level", "")).lower(), "logging.level",
                      ("debug", "info", "warning", "error")),
        format=_choice(str(s.get("format", "")).lower(), "logging.format", ("text", "json")),
    )


def parse_metrics(raw: Mapping[str, Any], environ: Mapping[str, str]) -> MetricsSettings:
    s = _section(raw, "metrics")
    d = MetricsSettings()
    token = s.get("bearer_token") or environ.get("LLMPROXY_METRICS_TOKEN", "")
    return MetricsSettings(
        enabled=_bool(s.get("enabled", d.enabled), "metrics.enabled"),
        bearer_token=_str(token, "metrics.bearer_token"),
        max_models=_int(s.get("max_models", d.max_models), "metrics.max_models"),
    )


def parse_usage_records(raw: Mapping[str, Any]) -> UsageRecordSettings:
    s = _section(raw, "usage_records")
    d = UsageRecordSettings()
    return UsageRecordSettings(
        enabled=_bool(s.get("enabled", d.enabled), "usage_records.enabled"),
        path=_str(s.get("path") or d.path, "usage_records.path"),
        max_bytes=_int(s.get("max_bytes", d.max_bytes), "usage_records.max_bytes"),
        backups=_int(s.get("backups", d.backups), "usage_records.backups"),
    )


_PRICE_KEYS = ("input", "output", "cached_input", "cache_write")


def _price(entry: Mapping[str, Any], key: str, where: str, default: float | None) -> float:
    value = entry.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ConfigError(f"pricing.{where}.{key}", f"must be a number >= 0, got {value!r}")
    return float(value)


def _rates(entry: Mapping[str, Any], where: str, inherit: Rates | None) -> Rates:
    unknown = set(entry) - set(_PRICE_KEYS) - {"tiers", "above_prompt_tokens"}
    if unknown:
        raise ConfigError(f"pricing.{where}", f"unknown keys {sorted(unknown)}")
    input_ = _price(entry, "input", where, inherit.input if inherit else None)
    output = _price(entry, "output", where, inherit.output if inherit else None)
    # Without a discount listed, cached and cache-write tokens cost the input price.
    cached = _price(entry, "cached_input", where, inherit.cached_input if inherit else input_)
    write = _price(entry, "cache_write", where, inherit.cache_write if inherit else input_)
    return Rates(input_, output, cached, write)


def _model_price(name: str, entry: Any, where: str) -> ModelPrice:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"pricing.{where}", "must be a mapping of prices")
    base = _rates(entry, where, None)
    tiers = []
    for i, tier in enumerate(entry.get("tiers") or ()):
        tier_where = f"{where}.tiers[{i}]"
        if not isinstance(tier, Mapping):
            raise ConfigError(f"pricing.{tier_where}", "must be a mapping")
        threshold = tier.get("above_prompt_tokens")
        if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
            raise ConfigError(f"pricing.{tier_where}.above_prompt_tokens",
                              "must be an integer")
        tiers.append((threshold, _rates(tier, tier_where, base)))
    return ModelPrice(name, base, tuple(sorted(tiers, key=lambda t: t[0])))


def parse_pricing(raw: Mapping[str, Any]) -> PricingSettings:
    """The ``pricing`` section: USD per million tokens per provider route and model."""
    as_of: str | None = None
    models: dict[str, dict[str, ModelPrice]] = {}
    aliases: dict[str, dict[str, str]] = {}
    for provider, spec in _section(raw, "pricing").items():
        if provider == "as_of":
            as_of = str(spec)
            continue
        if spec is None:
            continue
        if not isinstance(spec, Mapping):
            raise ConfigError(f"pricing.{provider}", "must be a mapping with models")
        table = {
            str(name): _model_price(str(name), entry, f"{provider}.models.{name}")
            for name, entry in _section(spec, "models", f"pricing.{provider}.models").items()
        }
        names = {str(a): str(t) for a, t in
                 _section(spec, "aliases", f"pricing.{provider}.aliases").items()}
        for alias, target in names.items():
            if target not in table:
                raise ConfigError(f"pricing.{provider}.aliases.{alias}",
                                  f"unknown model {target!r}")
        models[str(provider)] = table
        aliases[str(provider)] = names
    return PricingSettings(as_of, models, aliases)


RL = "features.rate_limiting"
LIMIT_KEYS = ("requests_per_minute", "tokens_per_minute", "requests_per_day", "tokens_per_day")
SCOPE_KINDS = ("global", "provider", "model", "key", "user")
OVERRIDE_KINDS = {"per_key": "key", "per_user": "user", "per_model": "model",
                  "per_provider": "provider"}
# A correction held longer would risk its bucket leaving the one-minute window meanwhile.
MAX_RECONCILE_DELAY_MS = 10_000


def _partial_limits(value: Any, key: str) -> dict[str, int]:
    section = _section({"v": value}, "v", key)
    _no_unknown(section, key, LIMIT_KEYS)
    return {name: _int(v, f"{key}.{name}") for name, v in section.items()}


def _redis(section: Mapping[str, Any], environ: Mapping[str, str]) -> RedisSettings:
    key = f"{RL}.redis"
    d = RedisSettings()
    # address/password/db: an older shape, still accepted
    _no_unknown(section, key, ("url", "key_prefix", "timeout_ms", "on_error",
                               "reconcile_delay_ms", "max_connections", "address", "password",
                               "db"))
    url = section.get("url")
    if url is None and "address" in section:
        password = section.get("password") or ""
        auth = f":{quote(str(password), safe='')}@" if password else ""
        url = f"redis://{auth}{section['address']}/{_int(section.get('db', 0), f'{key}.db')}"
    url_key = "LLMPROXY_REDIS_URL" if environ.get("LLMPROXY_REDIS_URL") else f"{key}.url"
    url = environ.get("LLMPROXY_REDIS_URL") or url or d.url
    if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
        raise ConfigError(url_key, "must be a redis://, rediss:// or unix:// URL")
    _check_redis_url(url, url_key)
    prefix = section.get("key_prefix", d.key_prefix)
    if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
        raise ConfigError(f"{key}.key_prefix", "must be a string without { or }")
    return RedisSettings(
        url=url,
        key_prefix=prefix,
        timeout_ms=_int(section.get("timeout_ms", d.timeout_ms), f"{key}.timeout_ms", 1),
        on_error=_choice(section.get("on_error", d.on_error), f"{key}.on_error",
                         ("open", "closed")),
        reconcile_delay_ms=_int(section.get("reconcile_delay_ms", d.reconcile_delay_ms),
                                f"{key}.reconcile_delay_ms", maximum=MAX_RECONCILE_DELAY_MS),
        max_connections=_max_connections(section.get("max_connections"), environ,
                                         f"{key}.max_connections"),
    )


def _memory(section: Mapping[str, Any]) -> MemoryStoreSettings:
    key = f"{RL}.memory"
    _no_unknown(section, key, ("max_counters",))
    return MemoryStoreSettings(
        max_counters=_int(section.get("max_counters", DEFAULT_MAX_COUNTERS),
                          f"{key}.max_counters", MIN_MAX_COUNTERS),
    )

def _max_connections(value: Any, environ: Mapping[str, str], key: str) -> int:
    """The pool size: as set, else one per connection the gunicorn worker serves, plus one
    for the background correction sender."""
    if value is not None:
        return _int(value, key, 1)
    raw = environ.get("WORKER_CONNECTIONS", "").strip()
    if not raw:
        return DEFAULT_WORKER_CONNECTIONS + 1
    try:
        workers = int(raw)
    except ValueError:
        raise ConfigError("WORKER_CONNECTIONS", f"must be an integer, got {raw!r}") from None
    return _int(workers, "WORKER_CONNECTIONS", 1) + 1


def _check_redis_url(url: str, key: str) -> None:
    """Parse the URL as redis-py will, so a malformed one stops start-up here with one line
    naming the key (never echoing the URL: it may carry a password)."""
    from redis.connection import (
        Connection,
        SSLConnection,
        UnixDomainSocketConnection,
        parse_url,
    )

    scheme = url.split("://", 1)[0].lower()
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises for a port that is not a number in range
        options: dict[str, Any] = parse_url(url)  # type: ignore[no-untyped-call]
        if scheme == "unix":
            if not options.get("path"):
                raise ValueError("no socket path")
        elif unquote(parts.path).strip("/") and "db" not in parse_qs(parts.query) \
                and not unquote(parts.path).strip("/").isdigit():
            raise ValueError("the path after the host must be a database number")
        options.pop("connection_class", None)
        cls = {"unix": UnixDomainSocketConnection, "rediss": SSLConnection}.get(scheme,
                                                                              Connection)
        cls(**options)  # unknown query parameters would only fail at the first connection
    except (ValueError, TypeError) as exc:
        raise ConfigError(key, f"not a valid Redis URL ({_url_problem(exc, url)})") from None


def _url_problem(exc: Exception, url: str) -> str:
    """The parser's complaint, with the URL's credentials taken out should it quote them."""
    message = str(exc).split("\n", 1)[0]
    try:
        parts = urlsplit(url)
        secrets = [s for s in (parts.password, parts.username) if s]
    except ValueError:
        secrets = []
    for secret in [url, *secrets]:
        message = message.replace(secret, "***")
    return message[:200]


def _estimation(section: Mapping[str, Any]) -> Estimation:
    key = f"{RL}.estimation"
    _no_unknown(section, key, ("max_sample_bytes", "bytes_per_token", "chars_per_token",
                               "provider_chars_per_token"))
    d = Estimation()
    per_provider = section.get("provider_chars_per_token", d.provider_chars_per_token)
    per_provider = _section({"v": per_provider}, "v", f"{key}.provider_chars_per_token")
    return Estimation(
        max_sample_bytes=_int(section.get("max_sample_bytes", d.max_sample_bytes),
                              f"{key}.max_sample_bytes"),
        bytes_per_token=_number(section.get("bytes_per_token", d.bytes_per_token),
                                f"{key}.bytes_per_token", exclusive=True),
        chars_per_token=_number(section.get("chars_per_token", d.chars_per_token),
                                f"{key}.chars_per_token", exclusive=True),
        provider_chars_per_token={
            str(name): _number(v, f"{key}.provider_chars_per_token.{name}", exclusive=True)
            for name, v in per_provider.items()
        },
    )


def parse_ratelimit(raw: Mapping[str, Any], environ: Mapping[str, str]) -> RateLimitSettings:
    """The ``features.rate_limiting`` section (algorithm: docs/rate-limiting.md)."""
    section = _section(_section(raw, "features"), "rate_limiting", RL)
    _no_unknown(section, RL, ("enabled", "backend", "redis", "memory", "count_tokens",
                              "limits", "scope_limits", "overrides", "estimation"))
    limits = Limits().merged(_partial_limits(section.get("limits"), f"{RL}.limits"))

    scope_section = _section(section, "scope_limits", f"{RL}.scope_limits")
    _no_unknown(scope_section, f"{RL}.scope_limits", SCOPE_KINDS)
    scope_limits = {
        kind: limits.merged(_partial_limits(value, f"{RL}.scope_limits.{kind}"))
        for kind, value in scope_section.items()
    }

    overrides_section = _section(section, "overrides", f"{RL}.overrides")
    _no_unknown(overrides_section, f"{RL}.overrides", tuple(OVERRIDE_KINDS))
    overrides: dict[str, dict[str, dict[str, int]]] = {}
    for name, kind in OVERRIDE_KINDS.items():
        table = _section(overrides_section, name, f"{RL}.overrides.{name}")
        parsed: dict[str, dict[str, int]] = {}
        for n, (scope_id, value) in enumerate(table.items()):
            # per_key entries may be raw API keys: name them by position, never by value
            label = f"[{n}]" if kind == "key" else f".{scope_id}"
            limits_ = _partial_limits(value, f"{RL}.overrides.{name}{label}")
            scope = str(scope_id)
            if kind == "key" and not scope.startswith("fp_"):
                scope = fingerprint(scope)  # keep no raw key past start-up
            parsed[scope] = limits_
        overrides[kind] = parsed

    return RateLimitSettings(
        enabled=_bool(section.get("enabled", False), f"{RL}.enabled"),
        backend=_choice(section.get("backend", "memory"), f"{RL}.backend", ("memory", "redis")),
        redis=_redis(_section(section, "redis", f"{RL}.redis"), environ),
        memory=_memory(_section(section, "memory", f"{RL}.memory")),
        count_tokens=_choice(section.get("count_tokens", "total"), f"{RL}.count_tokens",
                             ("input", "output", "total")),
        limits=limits,
        scope_limits=scope_limits,
        overrides=overrides,
        estimation=_estimation(_section(section, "estimation", f"{RL}.estimation")),
    )


AUTH_MODES = ("passthrough", "keys", "mixed")
DATABASE_SCHEMES = ("sqlite", "postgresql", "postgres", "postgresql+pg8000")
PG_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
MIN_ADMIN_TOKEN_CHARS = 16
MAX_KEY_CACHE_SECONDS = 3600.0  # also the longest a revoked key keeps working


def _database_url(url: Any) -> None:
    key = "auth.database_url"  # the URL may carry a password: messages never quote it
    if not isinstance(url, str) or urlsplit(url).scheme not in DATABASE_SCHEMES:
        raise ConfigError(key, "must be a sqlite:///<path> or postgresql://... URL")
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if not parts.path.lstrip("/") or parts.query:
            raise ConfigError(key, "must name a file: sqlite:///relative/path or "
                                   "sqlite:////absolute/path")
        return
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigError(key, "has an invalid port") from None
    if not parts.hostname:
        raise ConfigError(key, "must name a host")
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name != "sslmode":
            raise ConfigError(key, f"unsupported parameter {name!r} (supported: sslmode)")
        if values[-1] not in PG_SSLMODES:
            raise ConfigError(key, f"sslmode must be one of {', '.join(PG_SSLMODES)}")


def parse_auth(raw: Mapping[str, Any], environ: Mapping[str, str]) -> AuthSettings:
    """The ``auth`` section: proxy keys, their database and the admin API (docs: README)."""
    s = _section(raw, "auth")
    _no_unknown(s, "auth", ("mode", "database_url", "admin_token", "key_cache_seconds"))
    d = AuthSettings()
    url = environ.get("LLMPROXY_DATABASE_URL") or s.get("database_url") or d.database_url
    _database_url(url)
    token = environ.get("LLMPROXY_ADMIN_TOKEN") or s.get("admin_token") or ""
    if not isinstance(token, str):
        raise ConfigError("auth.admin_token", "must be a string")
    if token and (len(token) < MIN_ADMIN_TOKEN_CHARS or token != token.strip()):
        raise ConfigError("auth.admin_token", f"must be at least {MIN_ADMIN_TOKEN_CHARS} "
                                              "characters without surrounding spaces")
    cache = _number(s.get("key_cache_seconds", d.key_cache_seconds), "auth.key_cache_seconds")
    if cache > MAX_KEY_CACHE_SECONDS:
        raise ConfigError("auth.key_cache_seconds", f"must be at most {MAX_KEY_CACHE_SECONDS:g}")
    return AuthSettings(
        mode=_choice(s.get("mode", d.mode), "auth.mode", AUTH_MODES),
        database_url=url,
        admin_token=token,
        key_cache_seconds=cache,
    )


BUDGET_UNPRICED = ("deny", "allow")
BUDGET_ON_ERROR = ("closed", "open")


def parse_budgets(raw: Mapping[str, Any]) -> BudgetSettings:
    """The ``budgets`` section (docs/budgets.md); budgets need the key database."""
    s = _section(raw, "budgets")
    d = BudgetSettings()
    _no_unknown(s, "budgets", ("enabled", "default_output_tokens", "unpriced",
                               "ledger_flush_seconds", "refresh_seconds", "hold_seconds",
                               "on_error", "max_pending"))
    return BudgetSettings(
        enabled=_bool(s.get("enabled", d.enabled), "budgets.enabled"),
        default_output_tokens=_int(s.get("default_output_tokens", d.default_output_tokens),
                                   "budgets.default_output_tokens", 1, 10_000_000),
        unpriced=_choice(s.get("unpriced", d.unpriced), "budgets.unpriced", BUDGET_UNPRICED),
        ledger_flush_seconds=_number(s.get("ledger_flush_seconds", d.ledger_flush_seconds),
                                     "budgets.ledger_flush_seconds", 0.0, exclusive=True),
        refresh_seconds=_number(s.get("refresh_seconds", d.refresh_seconds),
                                "budgets.refresh_seconds", 0.0, exclusive=True),
        hold_seconds=_number(s.get("hold_seconds", d.hold_seconds), "budgets.hold_seconds",
                             1.0),
        on_error=_choice(s.get("on_error", d.on_error), "budgets.on_error", BUDGET_ON_ERROR),
        max_pending=_int(s.get("max_pending", d.max_pending), "budgets.max_pending", 1),
    )


# ---------------------------------------------------------------- telemetry (OpenTelemetry)
# The `telemetry:` section and the standard OTEL_* variables (these win) -> TelemetrySettings.
# =============================================================================================

PROTOCOLS = ("http/protobuf", "grpc")
SAMPLERS = ("always_on", "always_off", "traceidratio", "parentbased_always_on",
            "parentbased_always_off", "parentbased_traceidratio")
_otel_KEYS = frozenset({"enabled", "endpoint", "protocol", "service_name", "traces", "metrics",
                   "metric_export_interval_ms", "propagate", "propagate_except"})
_otel_DEFAULT_ENDPOINT = {"http/protobuf": "http://localhost:4318", "grpc": "http://localhost:4317"}
_otel_HTTP_PATHS = {"traces": "/v1/traces", "metrics": "/v1/metrics"}


@dataclass(frozen=True, slots=True)
class TelemetrySettings:
    """Resolved telemetry settings; a signal whose endpoint is ``None`` is not exported."""

    enabled: bool = False
    traces_endpoint: str | None = None  # full URL (OTLP/HTTP: with /v1/traces)
    traces_protocol: str = "http/protobuf"
    metrics_endpoint: str | None = None
    metrics_protocol: str = "http/protobuf"
    service_name: str = "llmproxy"
    metric_export_interval_ms: int = 60000
    max_queue_size: int = 2048  # spans waiting for export, per worker; beyond it they drop
    # Spans per export. Encoding a batch holds the worker's CPU until it is done (the export
    # greenlet yields only on I/O), so small batches keep that pause short for the requests.
    export_batch_size: int = 64
    propagate: bool = True  # send a traceparent naming the proxy's span to the provider
    propagate_except: frozenset[str] = frozenset()  # provider routes that get none


def _otel_env_bool(environ: Mapping[str, str], name: str) -> bool:
    value = environ.get(name, "").strip().lower()
    if value not in ("", "true", "false"):
        raise ConfigError(name, f"must be true or false, got {value!r}")
    return value == "true"


def _otel_env_int(environ: Mapping[str, str], name: str, default: int) -> int:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(name, f"must be an integer >= 1, got {raw!r}")
    return value


def _otel_flag(section: Mapping[str, Any], key: str, default: bool) -> bool:
    value = section.get(key, default)
    if not isinstance(value, bool):
        raise ConfigError(f"telemetry.{key}", f"must be true or false, got {value!r}")
    return value


def _otel_url(value: str, where: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(where, f"must be an http(s) URL, got {value!r}")
    return value


def _otel_protocol(value: str, where: str) -> str:
    if value not in PROTOCOLS:
        raise ConfigError(where, f"must be one of {', '.join(PROTOCOLS)}, got {value!r}")
    return value


def _otel_signal(signal: str, on: bool, auto: bool, base: str | None, protocol: str,
            environ: Mapping[str, str]) -> tuple[str | None, str]:
    """(endpoint or None, protocol) of one signal, with the OTEL_* precedence rules."""
    upper = signal.upper()
    protocol = _otel_protocol(environ.get(f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL", "").strip()
                         or protocol, f"OTEL_EXPORTER_OTLP_{upper}_PROTOCOL")
    exporter = environ.get(f"OTEL_{upper}_EXPORTER", "otlp").strip().lower() or "otlp"
    if exporter not in ("otlp", "none"):
        raise ConfigError(f"OTEL_{upper}_EXPORTER", f"must be otlp or none, got {exporter!r}")
    own = environ.get(f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT", "").strip()
    if not on or exporter == "none" or (auto and not own and not base):
        return None, protocol
    if own:  # a signal's own endpoint is used exactly as given
        return _otel_url(own, f"OTEL_EXPORTER_OTLP_{upper}_ENDPOINT"), protocol
    root = (base or _otel_DEFAULT_ENDPOINT[protocol]).rstrip("/")
    return (root + _otel_HTTP_PATHS[signal] if protocol == "http/protobuf" else root), protocol


def parse_telemetry(raw_section: Any, environ: Mapping[str, str]) -> TelemetrySettings:
    """The ``telemetry:`` section and the OTEL_* variables (which win) as settings.

    ``enabled: auto`` (the default) turns telemetry on when an OTLP endpoint is given, in
    the section or in ``OTEL_EXPORTER_OTLP_[TRACES_|METRICS_]ENDPOINT``; ``OTEL_SDK_DISABLED=true``
    turns it off whatever else is set.
    """
    section: Mapping[str, Any] = {} if raw_section is None else raw_section
    if not isinstance(section, Mapping):
        raise ConfigError("telemetry", "must be a mapping")
    unknown = sorted(str(k) for k in set(section) - _otel_KEYS)
    if unknown:
        raise ConfigError(f"telemetry.{unknown[0]}", "unknown key")
    enabled = section.get("enabled", "auto")
    if enabled not in ("auto", True, False):
        raise ConfigError("telemetry.enabled", f"must be auto, true or false, got {enabled!r}")
    if _otel_env_bool(environ, "OTEL_SDK_DISABLED") or enabled is False:
        return TelemetrySettings()
    auto = enabled == "auto"

    endpoint = section.get("endpoint") or None
    if endpoint is not None and not isinstance(endpoint, str):
        raise ConfigError("telemetry.endpoint", f"must be a URL, got {endpoint!r}")
    if endpoint is not None:
        _otel_url(endpoint, "telemetry.endpoint")
    env_endpoint = environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    base = _otel_url(env_endpoint, "OTEL_EXPORTER_OTLP_ENDPOINT") if env_endpoint else endpoint
    protocol = environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "").strip()
    if protocol:
        protocol = _otel_protocol(protocol, "OTEL_EXPORTER_OTLP_PROTOCOL")
    else:
        protocol = _otel_protocol(str(section.get("protocol", "http/protobuf")),
                                  "telemetry.protocol")
    traces, traces_protocol = _otel_signal("traces", _otel_flag(section, "traces", True), auto,
                                           base, protocol, environ)
    metrics, metrics_protocol = _otel_signal("metrics", _otel_flag(section, "metrics", True), auto,
                                        base, protocol, environ)

    service = environ.get("OTEL_SERVICE_NAME", "").strip() or section.get("service_name")
    if service is None:
        service = "llmproxy"
    if not isinstance(service, str) or not service:
        raise ConfigError("telemetry.service_name", f"must be a non-empty string, got {service!r}")

    interval: Any = section.get("metric_export_interval_ms", 60000)
    where = "telemetry.metric_export_interval_ms"
    if environ.get("OTEL_METRIC_EXPORT_INTERVAL", "").strip():
        where = "OTEL_METRIC_EXPORT_INTERVAL"
        try:
            interval = int(environ["OTEL_METRIC_EXPORT_INTERVAL"])
        except ValueError:
            raise ConfigError(where, "must be an integer (milliseconds)") from None
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ConfigError(where, f"must be an integer >= 1 (milliseconds), got {interval!r}")

    queue = _otel_env_int(environ, "OTEL_BSP_MAX_QUEUE_SIZE", 2048)
    batch = _otel_env_int(environ, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE", 64)
    if batch > queue:
        raise ConfigError("OTEL_BSP_MAX_EXPORT_BATCH_SIZE",
                          f"must not exceed OTEL_BSP_MAX_QUEUE_SIZE ({queue}), got {batch}")

    sampler = environ.get("OTEL_TRACES_SAMPLER", "").strip().lower()
    if sampler and sampler not in SAMPLERS:
        raise ConfigError("OTEL_TRACES_SAMPLER", f"must be one of {', '.join(SAMPLERS)}")
    arg = environ.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if sampler.endswith("traceidratio") and arg:
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError("OTEL_TRACES_SAMPLER_ARG", f"must be a ratio in [0, 1], got {arg!r}")

    except_: Any = section.get("propagate_except") or []
    if not isinstance(except_, list) or not all(isinstance(n, str) for n in except_):
        raise ConfigError("telemetry.propagate_except", "must be a list of provider names")
    on = traces is not None or metrics is not None
    return TelemetrySettings(
        enabled=on, traces_endpoint=traces, traces_protocol=traces_protocol,
        metrics_endpoint=metrics, metrics_protocol=metrics_protocol, service_name=service,
        metric_export_interval_ms=interval, max_queue_size=queue, export_batch_size=batch,
        propagate=_otel_flag(section, "propagate", True),
        propagate_except=frozenset(except_))


def build_settings(raw: Mapping[str, Any], environ: Mapping[str, str] | None = None, *,
                   provider_keys: bool = True) -> Settings:
    """Validate ``raw`` (the merged YAML); raises :class:`ConfigError` naming the first bad key.

    ``provider_keys=False`` leaves the providers' own keys unread, for tools that never call
    a provider (the ``keys`` CLI), so they run where those keys are not.
    """
    env = os.environ if environ is None else environ
    auth = parse_auth(raw, env)
    return Settings(
        providers=parse_providers(raw, env, keys_required=provider_keys
                                  and auth.mode != "passthrough"),
        server=parse_server(raw),
        upstream=parse_upstream(raw),
        cors=parse_cors(raw),
        logging=parse_logging(raw),
        metrics=parse_metrics(raw, env),
        usage_records=parse_usage_records(raw),
        pricing=parse_pricing(raw),
        ratelimit=parse_ratelimit(raw, env),
        telemetry=parse_telemetry(raw.get("telemetry"), env),
        auth=auth,
        budgets=parse_budgets(raw),
    )


def load_settings(overrides: Mapping[str, Any] | None = None,
                  environ: Mapping[str, str] | None = None, *,
                  provider_keys: bool = True) -> Settings:
    """What the app runs with: the YAML files, ``overrides`` and the environment, validated."""
    return build_settings(load_raw(overrides, environ), environ, provider_keys=provider_keys)
