"""The real OpenAI API through the proxy (make test-openai; needs OPENAI_API_KEY)."""

from __future__ import annotations

import os

import openai
import pytest
from conftest import ProxyProcess, new_request_id

from live.conftest import require_key

pytestmark = pytest.mark.live

KEY_ENV = "OPENAI_API_KEY"

MODEL = os.environ.get("OPENAI_TEST_MODEL", "gpt-4o-mini")


def client(proxy: ProxyProcess, rid: str) -> openai.OpenAI:
    return openai.OpenAI(api_key=require_key("OPENAI_API_KEY"), base_url=f"{proxy.url}/openai/v1",
                         default_headers={"X-Request-ID": rid}, max_retries=1, timeout=60)


def test_openai_live_chat(live_proxy: ProxyProcess) -> None:
    rid = new_request_id()
    out = client(live_proxy, rid).chat.completions.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Say OK."}])
    assert out.choices[0].message.content
    assert out.usage is not None
    record = live_proxy.wait_record(rid, timeout=10)
    assert (record["input_tokens"], record["output_tokens"]) == (
        out.usage.prompt_tokens, out.usage.completion_tokens)


def test_openai_live_chat_stream(live_proxy: ProxyProcess) -> None:
    rid = new_request_id()
    chunks = list(client(live_proxy, rid).chat.completions.create(
        model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "Say OK."}],
        stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert usage is not None
    record = live_proxy.wait_record(rid, timeout=10)
    assert record["streaming"] is True
    assert (record["input_tokens"], record["output_tokens"]) == (usage.prompt_tokens,
                                                                 usage.completion_tokens)


def test_openai_live_models(live_proxy: ProxyProcess) -> None:
    models = [m.id for m in client(live_proxy, new_request_id()).models.list()]
    assert models


def test_openai_live_bad_key_is_typed_error(live_proxy: ProxyProcess) -> None:
    require_key("OPENAI_API_KEY")
    bad = openai.OpenAI(api_key="sk-invalid-for-test", base_url=f"{live_proxy.url}/openai/v1",
                        max_retries=0, timeout=60)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
