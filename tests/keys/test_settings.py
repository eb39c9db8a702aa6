"""The ``auth:`` settings section."""

from __future__ import annotations

import pytest

from llmproxy.config import AuthSettings, ConfigError, build_settings, load_raw, parse_auth


def test_defaults_are_passthrough_with_a_local_sqlite_file() -> None:
    auth = build_settings(load_raw(environ={}), environ={}).auth
    assert auth == AuthSettings(mode="passthrough", database_url="sqlite:///data/llmproxy.db",
                                admin_token="", key_cache_seconds=5.0)


@pytest.mark.parametrize("url", ["sqlite:///data/keys.db", "sqlite:////var/lib/keys.db",
                                 "postgresql://u:p@db.internal:5432/llmproxy",
                                 "postgres://u@db/llmproxy?sslmode=verify-full"])
def test_valid_database_urls(url: str) -> None:
    assert parse_auth({"auth": {"database_url": url}}, {}).database_url == url


def test_values_and_environment_overrides() -> None:
    raw = {"auth": {"mode": "mixed", "database_url": "sqlite:///x.db", "key_cache_seconds": 0.5,
                    "admin_token": "from-the-config-file"}}
    auth = parse_auth(raw, {})
    assert (auth.mode, auth.database_url, auth.key_cache_seconds, auth.admin_token) == \
        ("mixed", "sqlite:///x.db", 0.5, "from-the-config-file")
    env = {"LLMPROXY_DATABASE_URL": "postgresql://u:p@127.0.0.1:5/db",
           "LLMPROXY_ADMIN_TOKEN": "from-the-environment"}
    auth = parse_auth(raw, env)
    assert auth.database_url == "postgresql://u:p@127.0.0.1:5/db"
    assert auth.admin_token == "from-the-environment"


@pytest.mark.parametrize(("section", "key"), [
    ({"mode": "open"}, "auth.mode"),
    ({"database_url": "mysql://u:hunter2@h/db"}, "auth.database_url"),
    ({"database_url": 5}, "auth.database_url"),
    ({"database_url": "sqlite://"}, "auth.database_url"),
    ({"database_url": "postgresql://u:hunter2@h:port/db"}, "auth.database_url"),
    ({"database_url": "postgresql://u:hunter2@h/db?sslmode=sometimes"}, "auth.database_url"),
    ({"database_url": "postgresql://u:hunter2@h/db?options=-c"}, "auth.database_url"),
    ({"database_url": "postgresql:///db"}, "auth.database_url"),
    ({"admin_token": "short"}, "auth.admin_token"),
    ({"admin_token": " padded-admin-token "}, "auth.admin_token"),
    ({"admin_token": 12345678901234567}, "auth.admin_token"),
    ({"key_cache_seconds": -1}, "auth.key_cache_seconds"),
    ({"key_cache_seconds": 7200}, "auth.key_cache_seconds"),
    ({"cache": 5}, "auth.cache"),
])
def test_invalid_auth_settings_name_the_key(section: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_auth({"auth": section}, {})
    assert err.value.key == key


@pytest.mark.parametrize("url", ["mysql://u:hunter2@h/db", "postgresql://u:hunter2@h:x/db",
                                 "postgresql://u:hunter2@h/db?sslmode=hunter2"])
def test_errors_never_quote_the_url_or_the_token(url: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_auth({}, {"LLMPROXY_DATABASE_URL": url})
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError) as err:
        parse_auth({"auth": {"admin_token": "tiny-secret"}}, {})
    assert "tiny-secret" not in str(err.value)
