"""The upstream URL is always the base URL plus a path that cannot climb out of it."""

from __future__ import annotations

import pytest

from llmproxy.providers import DIALECTS, Provider

GROQ = Provider("groq", "https://api.groq.example/openai", DIALECTS["openai"])


@pytest.mark.parametrize(
    ("rest", "url"),
    [
        ("/v1/chat/completions", "https://api.groq.example/openai/v1/chat/completions"),
        ("/v1/models?limit=2&after=a%2Fb", "https://api.groq.example/openai/v1/models?limit=2&after=a%2Fb"),
        ("/v1/files/file-abc/content", "https://api.groq.example/openai/v1/files/file-abc/content"),
        ("/v1/x@evil.example/y", "https://api.groq.example/openai/v1/x@evil.example/y"),
        ("/v1/a.b/c..d", "https://api.groq.example/openai/v1/a.b/c..d"),
    ],
)
def test_safe_paths_are_appended_unchanged(rest: str, url: str) -> None:
    assert GROQ.upstream_url(rest) == url


@pytest.mark.parametrize(
    "rest",
    [
        "/../x", "/v1/..", "/v1/../../x", "/v1/./x", "/%2e%2e/x", "/%2E%2E%2Fx", "/v1/%2e/x",
        "/%252e%252e/x", "/..%2f..%2fx", "//evil.example/x", "/v1\\..\\x", "/v1/%5c/x",
        "/v1/%255c/x", "/v1/a b", "/v1/\x00", "/v1/%00", "/v1/%0d%0aHost:x", "v1/no-slash", "",
        "/v1/models?x=1#frag", "/v1/models?a=\r\nb",
    ],
)
def test_escaping_paths_are_refused(rest: str) -> None:
    assert GROQ.upstream_url(rest) is None
