"""The real Anthropic API through the proxy (make test-anthropic; needs ANTHROPIC_API_KEY)."""

from __future__ import annotations

import os

import anthropic
import pytest
from conftest import ProxyProcess, new_request_id

from live.conftest import require_key

pytestmark = pytest.mark.live

KEY_ENV = "ANTHROPIC_API_KEY"

MODEL = os.environ.get("ANTHROPIC_TEST_MODEL", "claude-3-5-haiku-latest")
PROMPT = [{"role": "user", "content": "Say OK."}]


def client(proxy: ProxyProcess, rid: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(api_key=require_key("ANTHROPIC_API_KEY"),
                               base_url=f"{proxy.url}/anthropic",
                               default_headers={"X-Request-ID": rid}, max_retries=1, timeout=60)


def test_anthropic_live_message(live_proxy: ProxyProcess) -> None:
    rid = new_request_id()
    msg = client(live_proxy, rid).messages.create(model=MODEL, max_tokens=5,
                                                  messages=PROMPT)  # type: ignore[arg-type]
    assert msg.content
    record = live_proxy.wait_record(rid, timeout=10)
    assert (record["input_tokens"], record["output_tokens"]) == (msg.usage.input_tokens,
                                                                 msg.usage.output_tokens)


def test_anthropic_live_stream(live_proxy: ProxyProcess) -> None:
    rid = new_request_id()
    with client(live_proxy, rid).messages.stream(
            model=MODEL, max_tokens=5, messages=PROMPT) as stream:  # type: ignore[arg-type]
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text
    record = live_proxy.wait_record(rid, timeout=10)
    assert record["streaming"] is True
    assert record["output_tokens"] == final.usage.output_tokens


def test_anthropic_live_count_tokens(live_proxy: ProxyProcess) -> None:
    rid = new_request_id()
    count = client(live_proxy, rid).messages.count_tokens(
        model=MODEL, messages=PROMPT)  # type: ignore[arg-type]
    assert count.input_tokens > 0
