"""Caller identity: keys, fingerprints, users, client IPs, redaction."""

from __future__ import annotations

import pytest

from llmproxy.identity import (
    CredentialConflict,
    api_key,
    clean_user,
    client_ip,
    fingerprint,
    redact_query,
    resolve_user,
)


@pytest.mark.parametrize(
    ("headers", "query", "expected"),
    [
        ({"Authorization": "Bearer sk-one"}, "", "sk-one"),
        ({"x-api-key": "sk-ant-two"}, "", "sk-ant-two"),
        ({"x-goog-api-key": "AIza-three"}, "", "AIza-three"),
        ({}, "alt=sse&key=AIza-four", "AIza-four"),
        ({"Authorization": "Basic abc"}, "", None),
        ({}, "monkey=1", None),
    ],
)
def test_api_key_sources(headers: dict[str, str], query: str, expected: str | None) -> None:
    assert api_key(headers, query) == expected


@pytest.mark.parametrize(
    ("headers", "query"),
    [
        ({"x-api-key": "sk-a", "Authorization": "Bearer sk-b"}, ""),
        ({"x-api-key": "sk-a,sk-b"}, ""),  # a repeated header, joined by the server
        ({"Authorization": "Bearer sk-a, Bearer sk-b"}, ""),
        ({"x-goog-api-key": "AIza-a"}, "key=AIza-b"),
        ({}, "key=AIza-a&key=AIza-b"),
        ({}, "key=AIza-a&%6Bey=AIza-b"),  # the name decoded, as the provider decodes it
    ],
)
def test_two_different_credentials_conflict(headers: dict[str, str], query: str) -> None:
    with pytest.raises(CredentialConflict):
        api_key(headers, query)


ALL_SLOTS = ("Authorization", "x-api-key", "x-goog-api-key")


@pytest.mark.parametrize(
    ("headers", "query", "slots", "expected"),
    [
        ({"x-api-key": "sk-a", "Authorization": "Bearer sk-a"}, "", ALL_SLOTS, "sk-a"),
        ({"X-Goog-Api-Key": "AIza-a"}, "key=AIza-a", ALL_SLOTS, "AIza-a"),  # any name case
        ({"x-api-key": "sk-a", "Authorization": "Basic dXNlcg=="}, "", ALL_SLOTS, "sk-a"),
        # a header outside the dialect's slots is not a credential for its provider
        ({"x-api-key": "sk-a", "Authorization": "Bearer sk-b"}, "", ("x-api-key",), "sk-a"),
    ],
)
def test_one_credential_in_several_slots(headers: dict[str, str], query: str,
                                         slots: tuple[str, ...], expected: str) -> None:
    assert api_key(headers, query, slots) == expected


def test_fingerprint_is_stable_and_does_not_contain_the_key() -> None:
    fp = fingerprint("sk-secret-value")
    assert fp == fingerprint("sk-secret-value") != fingerprint("sk-secret-valuf")
    assert fp.startswith("fp_") and len(fp) == 19 and "secret" not in fp


def test_redact_query_hides_every_credential_parameter() -> None:
    target = "/v1beta/models/m:generateContent?alt=sse&key=AIzaSECRET&api_key=x2&keep=1"
    redacted = redact_query(target)
    assert "AIzaSECRET" not in redacted and "x2" not in redacted
    assert redacted.endswith("alt=sse&key=REDACTED&api_key=REDACTED&keep=1")
    assert redact_query("/v1/models") == "/v1/models"


@pytest.mark.parametrize(
    ("remote", "xff", "trusted", "expected"),
    [
        ("10.0.0.5", "1.2.3.4", 0, "10.0.0.5"),  # header ignored without trusted proxies
        ("10.0.0.5", "1.2.3.4", 1, "1.2.3.4"),
        ("10.0.0.5", "9.9.9.9, 1.2.3.4, 10.0.0.9", 2, "1.2.3.4"),  # forged first hop ignored
        ("10.0.0.5", "1.2.3.4", 5, "1.2.3.4"),
        ("127.0.0.1:5555", None, 0, "127.0.0.1"),
        ("[::1]:5555", None, 0, "::1"),
        ("::1", None, 0, "::1"),
    ],
)
def test_client_ip(remote: str, xff: str | None, trusted: int, expected: str) -> None:
    assert client_ip(remote, xff, trusted) == expected


def test_user_resolution_order() -> None:
    headers = {"X-User-ID": "hdr"}
    assert resolve_user("path", headers, "body", "llm_user_id=q", "ip") == ("path", "path")
    assert resolve_user(None, headers, "body", "", "ip") == ("hdr", "header")
    assert resolve_user(None, {}, "body", "llm_user_id=q", "ip") == ("body", "body")
    assert resolve_user(None, {}, None, "llm_user_id=q", "ip") == ("q", "query")
    assert resolve_user(None, {}, None, "", "1.2.3.4") == ("1.2.3.4", "ip")
    # Hostile values are not accepted as user ids (they become limit scopes and log fields).
    assert resolve_user(None, {"X-User-ID": "a b\n"}, "x" * 500, "", "ip") == ("ip", "ip")


@pytest.mark.parametrize("value", ["alice\n", "alice\r\n", "\nalice", "ali ce", "alice\u200b",
                                   "", "x" * 129, None, 5])
def test_clean_user_refuses_anything_but_a_whole_token(value: object) -> None:
    assert clean_user(value) is None


def test_a_user_id_with_a_trailing_newline_is_not_taken() -> None:
    assert clean_user("alice") == "alice" and clean_user("x" * 128) == "x" * 128
    assert resolve_user(None, {"X-User-ID": "alice\n"}, None, "", "ip") == ("ip", "ip")
    assert resolve_user(None, {}, "alice\n", "llm_user_id=bob%0A", "ip") == ("ip", "ip")


def test_user_sources_are_configurable() -> None:
    headers = {"X-User-ID": "hdr"}
    everything = ("path", headers, "body", "llm_user_id=q", "1.2.3.4", "fp_0123456789abcdef")
    assert resolve_user(*everything, sources=("key", "ip")) == ("fp_0123456789abcdef", "key")
    assert resolve_user(*everything, sources=("query", "path")) == ("q", "query")
    assert resolve_user(*everything, sources=("ip",)) == ("1.2.3.4", "ip")
    assert resolve_user(*everything, sources=()) == (None, None)
    # a source that names nobody passes on to the next one
    assert resolve_user(None, {}, None, "", "1.2.3.4", None, ("path", "key", "header")) \
        == (None, None)
    assert resolve_user(None, {}, None, "", "1.2.3.4", None, ("key", "ip")) == ("1.2.3.4", "ip")


def test_proxy_keys_are_redacted_anywhere_in_a_target() -> None:
    key = "llmp-" + "A1b2_C3d4-" * 4
    for target in (f"/openai/v1/models?token={key}", f"/openai/{key}/v1/models",
                   f"/gemini/v1beta/models?alt=sse&key={key}"):
        redacted = redact_query(target)
        assert key not in redacted and "llmp-REDACTED" in redacted or "key=REDACTED" in redacted
        assert key[5:] not in redacted
