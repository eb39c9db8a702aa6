"""The proxy-key record, its secret, and the checks on caller-given fields."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from llmproxy.keys.model import (
    KEY_PREFIX,
    KeyValidationError,
    ProxyKey,
    display_prefix,
    generate_secret,
    hash_secret,
    is_key_id,
    looks_like_proxy_key,
    new_key_id,
    parse_scope,
    validate_fields,
)

NOW = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)


def test_secrets_are_prefixed_long_url_safe_and_distinct() -> None:
    made = {generate_secret() for _ in range(200)}
    assert len(made) == 200
    for secret in made:
        assert secret.startswith(KEY_PREFIX)
        body = secret[len(KEY_PREFIX):]
        assert len(body) >= 32
        assert set(body) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        assert looks_like_proxy_key(secret)


def test_hash_is_hex_sha256_and_the_prefix_is_short() -> None:
    # the FIPS 180-2 test vector: a plain, unsalted SHA-256 in hex
    assert hash_secret("abc") == \
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    secret = "llmp-" + "a" * 43
    assert hash_secret(secret + "b") != hash_secret(secret)
    assert display_prefix(secret) == "llmp-aaaaaaa"


@pytest.mark.parametrize("value", ["sk-abc", "llmp-short", "llmp-" + "a" * 31,
                                   "llmp-" + "a" * 40 + "!", " llmp-" + "a" * 43, ""])
def test_other_credentials_do_not_look_like_proxy_keys(value: str) -> None:
    assert not looks_like_proxy_key(value)


def test_key_ids() -> None:
    key_id = new_key_id()
    assert is_key_id(key_id) and key_id.startswith("key_") and len(key_id) == 20
    assert not is_key_id("key_../../etc") and not is_key_id("llmp-x")


def test_usable_until_expiry_and_never_once_revoked() -> None:
    key = ProxyKey(id="key_0", prefix="llmp-x", name="n", expires_at=NOW)
    assert key.usable(NOW - timedelta(seconds=1))
    assert not key.usable(NOW)
    assert ProxyKey(id="key_0", prefix="llmp-x", name="n").usable(NOW)
    assert not ProxyKey(id="key_0", prefix="llmp-x", name="n", revoked=True).usable(NOW)


def test_allows_providers_and_model_globs() -> None:
    key = ProxyKey(id="key_0", prefix="p", name="n", providers=("openai", "groq"),
                   models=("gpt-4o*", "llama-3.?-8b"))
    assert key.allows("openai", "gpt-4o-mini")
    assert key.allows("groq", "llama-3.1-8b")
    assert not key.allows("anthropic", "gpt-4o")
    assert not key.allows("openai", "gpt-5")
    assert not key.allows("openai", "GPT-4O")  # case-sensitive, as providers are
    assert not key.allows("openai", None)  # an unknown model could be any model
    unrestricted = ProxyKey(id="key_0", prefix="p", name="n")
    assert unrestricted.allows("gemini", None) and unrestricted.allows("openai", "x")


def test_public_is_json_safe_and_holds_no_secret() -> None:
    secret = generate_secret()
    key = ProxyKey(id="key_0123456789abcdef", prefix=display_prefix(secret), name="ci",
                   user="u", team="t", providers=("openai",), models=("gpt-*",),
                   limits={"requests_per_minute": 5}, expires_at=NOW, created_at=NOW,
                   metadata={"owner": "x"})
    public = key.public()
    text = json.dumps(public)
    assert secret not in text and hash_secret(secret) not in text
    assert public["expires_at"] == "2030-01-01T12:00:00+00:00"
    assert public["providers"] == ["openai"] and public["limits"] == {"requests_per_minute": 5}
    assert set(public) == {"id", "prefix", "name", "user", "team", "providers", "models",
                           "limits", "expires_at", "revoked", "created_at", "last_used_at",
                           "metadata", "budgets"}
    assert public["budgets"] is None


def test_validate_fields_normalises() -> None:
    out = validate_fields({"name": " ci ", "providers": ["openai", "openai"],
                           "models": ["gpt-*"], "limits": {"tokens_per_day": 10},
                           "expires_at": "2030-01-01T13:00:00+01:00", "metadata": {"a": [1]},
                           "user": None}, providers=["openai", "gemini"])
    assert out == {"name": "ci", "providers": ("openai",), "models": ("gpt-*",),
                   "limits": {"tokens_per_day": 10}, "expires_at": NOW,
                   "metadata": {"a": [1]}, "user": None}
    assert validate_fields({"expires_at": "2030-01-01T12:00:00Z"}, partial=True) == \
        {"expires_at": NOW}
    assert validate_fields({"expires_at": "2030-01-01T12:00:00"}, partial=True) == \
        {"expires_at": NOW}  # no offset: UTC


@pytest.mark.parametrize(("data", "field"), [
    ({}, "name"),
    ({"name": ""}, "name"),
    ({"name": 5}, "name"),
    ({"name": "x" * 201}, "name"),
    ({"name": "a\nb"}, "name"),
    ({"name": "n", "colour": "red"}, "colour"),
    ({"name": "n", "providers": "openai"}, "providers"),
    ({"name": "n", "providers": ["cohere"]}, "providers"),
    ({"name": "n", "models": [""]}, "models"),
    ({"name": "n", "limits": {"requests_per_hour": 1}}, "limits.requests_per_hour"),
    ({"name": "n", "limits": {"requests_per_minute": -1}}, "limits.requests_per_minute"),
    ({"name": "n", "limits": {"requests_per_minute": True}}, "limits.requests_per_minute"),
    ({"name": "n", "limits": [1]}, "limits"),
    ({"name": "n", "expires_at": "tomorrow"}, "expires_at"),
    ({"name": "n", "expires_at": 5}, "expires_at"),
    ({"name": "n", "expires_at": "9999-12-31T23:59:59-05:00"}, "expires_at"),  # overflows
    ({"name": "n", "expires_at": "0001-01-01T00:00:00+05:00"}, "expires_at"),
    ({"name": "n", "metadata": [1]}, "metadata"),
    ({"name": "n", "metadata": {"x": float("nan")}}, "metadata"),
    ({"name": "n", "metadata": {"x": "y" * 20000}}, "metadata"),
    ({"name": "n", "user": ""}, "user"),
    # Not printable: a budget counter would be keyed by a name the ledger stores stripped.
    ({"name": "n", "user": "alice\x7f"}, "user"),  # DEL
    ({"name": "n", "user": "al\x85ice"}, "user"),  # C1 control (NEL)
    ({"name": "n", "team": "ml\u200bops"}, "team"),  # zero-width space
    ({"name": "n", "team": "ml\u00a0ops"}, "team"),  # no-break space
    ({"name": "n", "team": "ml\u2028ops"}, "team"),  # line separator
    ({"name": "n", "team": "ml\u202eops"}, "team"),  # bidi override
    ({"name": "n", "user": "al\ud800ice"}, "user"),  # lone surrogate
])
def test_validate_fields_names_the_bad_field(data: dict[str, object], field: str) -> None:
    with pytest.raises(KeyValidationError) as err:
        validate_fields(data, providers=["openai"])
    assert err.value.field == field
    assert str(err.value).startswith(field + ":")


@pytest.mark.parametrize("name", ["ml\u200bops", "ml\u00a0ops", "ml\x9fops", "ml\u2029ops",
                                  "ml\x7fops", "ml\ufeffops"])
def test_a_budget_scope_name_must_be_printable(name: str) -> None:
    with pytest.raises(KeyValidationError) as err:
        parse_scope(f"team:{name}")
    assert err.value.field == "scope"


def test_printable_names_of_any_script_are_kept() -> None:
    assert parse_scope("team:ml ops") == ("team", "ml ops")
    assert parse_scope("user:zoë 山田 🙂") == ("user", "zoë 山田 🙂")
    assert validate_fields({"user": " ünï ", "team": "a b"}, partial=True) == \
        {"user": "ünï", "team": "a b"}


def test_partial_updates_need_no_name() -> None:
    assert validate_fields({"team": "t"}, partial=True) == {"team": "t"}
    assert validate_fields({}, partial=True) == {}
