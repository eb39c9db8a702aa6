"""Finding a proxy key in a request, and what is forwarded instead of it."""

from __future__ import annotations

import pytest
from werkzeug.datastructures import Headers

from llmproxy.keys.credentials import find_proxy_key, forward_headers, forward_target
from llmproxy.providers import DIALECTS

KEY = "llmp-" + "A" * 43


@pytest.mark.parametrize(("dialect", "headers", "query"), [
    ("openai", {"Authorization": f"Bearer {KEY}"}, ""),
    ("openai", {"authorization": f"bearer   {KEY} "}, ""),
    ("anthropic", {"x-api-key": KEY}, ""),
    ("anthropic", {"Authorization": f"Bearer {KEY}"}, ""),
    ("gemini", {"x-goog-api-key": KEY}, ""),
    ("gemini", {}, f"alt=sse&key={KEY}"),
    ("gemini", {}, f"%6Bey={KEY.replace('-', '%2D')}"),  # names and values percent-encoded
])
def test_found_in_every_slot_of_the_dialect(dialect: str, headers: dict[str, str],
                                            query: str) -> None:
    d = DIALECTS[dialect]
    assert find_proxy_key(Headers(headers), query, d.credential_headers,
                          d.credential_params) == KEY


def test_any_slot_counts_even_after_another_credential() -> None:
    d = DIALECTS["anthropic"]
    headers = Headers({"Authorization": "Bearer sk-ant-real", "x-api-key": KEY})
    assert find_proxy_key(headers, "", d.credential_headers, d.credential_params) == KEY


@pytest.mark.parametrize(("headers", "query"), [
    ({"Authorization": "Bearer sk-proj-abc"}, ""),
    ({"Authorization": f"Basic {KEY}"}, ""),
    ({"x-goog-api-key": KEY}, ""),  # not an OpenAI slot
    ({}, f"key={KEY}"),  # nor is the query
])
def test_not_found_outside_the_dialects_slots(headers: dict[str, str], query: str) -> None:
    d = DIALECTS["openai"]
    assert find_proxy_key(Headers(headers), query, d.credential_headers,
                          d.credential_params) is None


@pytest.mark.parametrize(("target", "expected"), [
    ("/v1beta/models/m:generateContent", "/v1beta/models/m:generateContent"),
    (f"/v1/m?key={KEY}", "/v1/m"),
    (f"/v1/m?alt=sse&key={KEY}&x=1", "/v1/m?alt=sse&x=1"),
    (f"/v1/m?%6Bey={KEY}&alt=sse", "/v1/m?alt=sse"),
    ("/v1/m?key=AIza-other&alt=sse", "/v1/m?alt=sse"),  # no client credential goes upstream
    (f"/v1/m?note={KEY}&a=%2F", "/v1/m?a=%2F"),  # a proxy key anywhere; others kept raw
])
def test_forward_target_drops_credentials_and_proxy_keys(target: str, expected: str) -> None:
    assert forward_target(target, ("key",)) == expected


def test_forward_headers_replaces_every_credential_with_the_providers() -> None:
    headers = {"Authorization": f"Bearer {KEY}", "x-api-key": "sk-ant-client",
               "X-Goog-Api-Key": "AIza-client", "api-key": "azure", "X-Note": f"see {KEY}",
               "Content-Type": "application/json", "anthropic-version": "2023-06-01"}
    out = forward_headers(headers, ("x-api-key", "sk-ant-server"))
    assert out == {"Content-Type": "application/json", "anthropic-version": "2023-06-01",
                   "x-api-key": "sk-ant-server"}
    assert forward_headers(headers, None) == {"Content-Type": "application/json",
                                              "anthropic-version": "2023-06-01"}


@pytest.mark.parametrize(("dialect", "expected"), [
    ("openai", ("Authorization", "Bearer sk-server")),
    ("anthropic", ("x-api-key", "sk-server")),
    ("gemini", ("x-goog-api-key", "sk-server")),
])
def test_each_dialect_names_its_native_slot(dialect: str, expected: tuple[str, str]) -> None:
    assert DIALECTS[dialect].credential_header("sk-server") == expected
