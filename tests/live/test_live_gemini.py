"""The real Gemini API through the proxy (make test-gemini; needs GEMINI_API_KEY)."""

from __future__ import annotations

import os

import pytest
from conftest import ProxyProcess, new_request_id
from google import genai
from google.genai import types

from live.conftest import require_key

pytestmark = pytest.mark.live

KEY_ENV = "GEMINI_API_KEY"

MODEL = os.environ.get("GEMINI_TEST_MODEL", "gemini-2.0-flash")


def client(proxy: ProxyProcess, rid: str, version: str | None = None) -> genai.Client:
    return genai.Client(api_key=require_key("GEMINI_API_KEY"), http_options=types.HttpOptions(
        base_url=f"{proxy.url}/gemini", api_version=version,
        headers={"X-Request-ID": rid}, timeout=60_000))


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_gemini_live_generate(live_proxy: ProxyProcess, version: str) -> None:
    rid = new_request_id()
    sdk = client(live_proxy, rid, version)
    out = sdk.models.generate_content(model=MODEL, contents="Say OK.")
    assert out.text
    assert out.usage_metadata is not None
    record = live_proxy.wait_record(rid, timeout=10)
    assert record["input_tokens"] == out.usage_metadata.prompt_token_count


def test_gemini_live_stream(live_proxy: ProxyProcess) -> None:
    rid = new_request_id()
    sdk = client(live_proxy, rid)
    pieces = list(sdk.models.generate_content_stream(model=MODEL, contents="Count to 5."))
    assert "".join(p.text or "" for p in pieces)
    usage = pieces[-1].usage_metadata
    assert usage is not None
    record = live_proxy.wait_record(rid, timeout=10)
    assert record["streaming"] is True
    assert record["input_tokens"] == usage.prompt_token_count
