"""Config loading: deep overlays, env overrides, one-line errors naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmproxy.config import ConfigError, build_settings, deep_merge, load_raw


def test_deep_merge_keeps_keys_the_overlay_does_not_mention() -> None:
    base = {"a": {"x": 1, "y": {"p": 1, "q": 2}}, "b": 3}
    merged = deep_merge(base, {"a": {"y": {"q": 20}}})
    assert merged == {"a": {"x": 1, "y": {"p": 1, "q": 20}}, "b": 3}
    assert base["a"]["y"]["q"] == 2  # the base is not modified


def test_overlay_file_and_env_overrides(tmp_path: Path) -> None:
    extra = tmp_path / "extra.yml"
    extra.write_text("upstream: {read_timeout: 7}\nproviders: {together: "
                     "{base_url: 'https://api.together.example', dialect: openai}}\n")
    raw = load_raw(environ={"LLMPROXY_CONFIG": str(extra),
                            "LLMPROXY_OPENAI_BASE_URL": "http://127.0.0.1:9",
                            "LOG_LEVEL": "WARN", "LOG_FORMAT": "json"})
    settings = build_settings(raw)
    assert settings.upstream.read_timeout == 7
    assert settings.upstream.connect_timeout == 10  # untouched by the overlay
    assert settings.providers["openai"].base_url == "http://127.0.0.1:9"
    assert settings.providers["together"].dialect == "openai"
    assert settings.providers["groq"].base_url == "https://api.groq.com/openai"
    assert (settings.logging.level, settings.logging.format) == ("warning", "json")


def test_a_provider_can_be_removed_by_an_overlay() -> None:
    settings = build_settings(load_raw({"providers": {"groq": None}}, environ={}))
    assert "groq" not in settings.providers
    assert "openai" in settings.providers


@pytest.mark.parametrize(
    ("overrides", "key"),
    [
        ({"upstream": {"read_timeout": "soon"}}, "upstream.read_timeout"),
        ({"server": {"max_body_bytes": -1}}, "server.max_body_bytes"),
        ({"server": {"body_timeout": 0}}, "server.body_timeout"),
        ({"server": {"send_timeout": "1m"}}, "server.send_timeout"),
        ({"providers": {"openai": {"base_url": "ftp://x"}}}, "providers.openai.base_url"),
        ({"providers": {"openai": {"base_url": "https://h/?q=1"}}}, "providers.openai.base_url"),
        ({"providers": {"openai": {"dialect": "cohere"}}}, "providers.openai.dialect"),
        ({"providers": {"health": {"base_url": "https://h"}}}, "providers.health"),
        ({"logging": {"level": "loud"}}, "logging.level"),
        ({"cors": {"origins": 5}}, "cors.origins"),
        ({"server": {"user_sources": "header"}}, "server.user_sources"),
        ({"server": {"user_sources": ["header", "cookie"]}}, "server.user_sources"),
        ({"server": {"user_sources": ["ip", "ip"]}}, "server.user_sources"),
        ({"features": {"rate_limiting": {"memory": {"max_counters": 10}}}},
         "features.rate_limiting.memory.max_counters"),
        ({"features": {"rate_limiting": {"memory": {"max_scopes": 10}}}},
         "features.rate_limiting.memory.max_scopes"),
    ],
)
def test_invalid_settings_name_the_key(overrides: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_settings(load_raw(overrides, environ={}))
    assert err.value.key == key
    assert key in str(err.value) and "\n" not in str(err.value)


def test_broken_yaml_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_raw(environ={"LLMPROXY_CONFIG": str(bad)})
    assert "bad.yml" in str(err.value)


def test_user_sources_and_the_memory_cap() -> None:
    default = build_settings(load_raw(environ={}))
    assert default.server.user_sources == ("path", "header", "body", "query", "ip")
    assert default.ratelimit.memory.max_counters == 50_000
    custom = build_settings(load_raw({
        "server": {"user_sources": ["key", "ip"]},
        "features": {"rate_limiting": {"memory": {"max_counters": 5000}}}}, environ={}))
    assert custom.server.user_sources == ("key", "ip")
    assert custom.ratelimit.memory.max_counters == 5000
    nobody = build_settings(load_raw({"server": {"user_sources": []}}, environ={}))
    assert nobody.server.user_sources == ()
