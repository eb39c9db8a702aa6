"""Configuration: YAML files deep-merged, then environment overrides, validated at start-up."""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple
from urllib.parse import urlsplit

import yaml

DIALECTS = ("openai", "anthropic", "gemini")
_NAME_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_RESERVED_NAMES = {"health", "metrics", "meta", "static"}


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


@dataclass(frozen=True, slots=True)
class ProviderSettings:
    name: str
    base_url: str  # no trailing slash
    dialect: str
    scheme: str
    netloc: str


@dataclass(frozen=True, slots=True)
class Settings:
    """Typed view of the settings the core uses; ``raw`` keeps the whole merged mapping."""

    raw: dict[str, Any]
    providers: dict[str, ProviderSettings]
    max_body_bytes: int
    inspect_max_bytes: int
    trusted_proxies: int
    connect_timeout: float
    read_timeout: float
    pool_maxsize: int
    health_failure_threshold: int
    health_window_seconds: float
    cors_origins: str | list[str]
    cors_max_age: int
    log_level: str
    log_format: str


def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key, {})
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a mapping")
    return value


def _number(section: Mapping[str, Any], prefix: str, key: str, *, minimum: float,
            integer: bool = True) -> Any:
    value = section.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        integer and not isinstance(value, int)
    ):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"{prefix}.{key}", f"must be {kind}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{prefix}.{key}", f"must be >= {minimum}, got {value!r}")
    return value


def _choice(section: Mapping[str, Any], prefix: str, key: str, choices: tuple[str, ...]) -> str:
    value = str(section.get(key, "")).lower()
    if value not in choices:
        raise ConfigError(f"{prefix}.{key}", f"must be one of {', '.join(choices)}, got {value!r}")
    return value


def _provider(name: Any, spec: Any) -> ProviderSettings:
    key = f"providers.{name}"
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in _RESERVED_NAMES \
            or name.endswith("_meta"):  # "<name>_meta" is the blueprint of /meta/<user>/<name>
        raise ConfigError(key, "provider names are lower-case letters, digits, '-' or '_', "
                               "not health, metrics or meta, and not ending in _meta")
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
    return ProviderSettings(name, url.rstrip("/"), dialect, parts.scheme, parts.netloc)


def build_settings(raw: dict[str, Any]) -> Settings:
    """Validate ``raw``; raises :class:`ConfigError` naming the first bad key."""
    server = _section(raw, "server")
    upstream = _section(raw, "upstream")
    cors = _section(raw, "cors")
    logging_ = _section(raw, "logging")
    providers_raw = _section(raw, "providers")
    providers = {}
    for name, spec in providers_raw.items():
        if spec is None:  # an overlay may switch a provider off with `name: null`
            continue
        providers[name] = _provider(name, spec)
    if not providers:
        raise ConfigError("providers", "at least one provider is required")
    origins = cors.get("origins", "*")
    if not (isinstance(origins, str) or (
        isinstance(origins, list) and all(isinstance(o, str) for o in origins)
    )):
        raise ConfigError("cors.origins", "must be \"*\" or a list of origins")
    return Settings(
        raw=raw,
        providers=providers,
        max_body_bytes=_number(server, "server", "max_body_bytes", minimum=1),
        inspect_max_bytes=_number(server, "server", "inspect_max_bytes", minimum=0),
        trusted_proxies=_number(server, "server", "trusted_proxies", minimum=0),
        connect_timeout=_number(upstream, "upstream", "connect_timeout", minimum=0.001,
                                integer=False),
        read_timeout=_number(upstream, "upstream", "read_timeout", minimum=0.001, integer=False),
        pool_maxsize=_number(upstream, "upstream", "pool_maxsize", minimum=1),
        health_failure_threshold=_number(upstream, "upstream", "health_failure_threshold",
                                         minimum=1),
        health_window_seconds=_number(upstream, "upstream", "health_window_seconds",
                                      minimum=1, integer=False),
        cors_origins=origins,
        cors_max_age=_number(cors, "cors", "max_age", minimum=0),
        log_level=_choice(logging_, "logging", "level", ("debug", "info", "warning", "error")),
        log_format=_choice(logging_, "logging", "format", ("text", "json")),
    )


def load_settings(overrides: Mapping[str, Any] | None = None) -> Settings:
    return build_settings(load_raw(overrides))
