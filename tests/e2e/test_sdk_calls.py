"""Plain and streamed calls through the real proxy with the official SDKs.

What the SDK saw must equal what the fake upstream sent, and the proxy's one log record for
the request must carry the same token counts.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
from conftest import ProxyProcess, new_request_id
from fake_upstream import FakeUpstream

from e2e.sdk import anthropic_client, gemini_client, openai_client

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"  # the scenario's model, so request and response agree on it


def gemini_output(sc: Any) -> int:
    """Gemini's billed output: candidates plus thoughts (as OpenAI's completion_tokens
    already include reasoning tokens), which is how the proxy normalizes it."""
    return int(sc.output_tokens + sc.reasoning_tokens)


def assert_record(record: dict[str, Any], *, provider: str, streaming: bool,
                  input_tokens: int, output_tokens: int, total_tokens: int | None = None,
                  cached_tokens: int | None = None, reasoning_tokens: int | None = None,
                  finish_reason: str | None = None, status: int = 200,
                  model: str | None = MODEL) -> None:
    expected = {"provider": provider, "streaming": streaming, "status": status,
                "outcome": "completed", "input_tokens": input_tokens,
                "output_tokens": output_tokens}
    if total_tokens is not None:
        expected["total_tokens"] = total_tokens
    if cached_tokens is not None:
        expected["cached_tokens"] = cached_tokens
    if reasoning_tokens is not None:
        expected["reasoning_tokens"] = reasoning_tokens
    if finish_reason is not None:
        expected["finish_reason"] = finish_reason
    if model is not None:
        expected["model"] = model
    got = {key: record.get(key) for key in expected}
    assert got == expected, f"log record {record}"
    for key in ("duration_ms", "ttfb_ms"):
        assert isinstance(record.get(key), (int, float)) and record[key] >= 0, record


# -- OpenAI ---------------------------------------------------------------------------------

def test_openai_chat_plain(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = openai_client(proxy.url, rid)
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}])
    out = raw.parse()
    assert out.choices[0].message.content == sc.text
    assert out.usage is not None
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (sc.input_tokens,
                                                                     sc.output_tokens)
    assert raw.headers["x-proxy-request-id"] == rid
    assert raw.headers["x-request-id"] == sc.request_id  # the provider's id, untouched
    rec = fake_upstream.last
    assert (rec.method, rec.target) == ("POST", "/v1/chat/completions")
    assert rec.header("authorization") == "Bearer sk-test-openai"
    assert rec.header("host") == fake_upstream.address
    assert rec.json()["messages"] == [{"role": "user", "content": "hi"}]
    assert_record(proxy.wait_record(rid), provider="openai", streaming=False,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  total_tokens=sc.total_tokens, cached_tokens=sc.cached_tokens,
                  reasoning_tokens=sc.reasoning_tokens, finish_reason="stop")


@pytest.mark.parametrize("prefix", ["openai", "groq"])
def test_openai_chat_stream(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                            prefix: str) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = openai_client(proxy.url, rid, prefix=prefix)
    stream = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sc.text
    usage = chunks[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        sc.input_tokens, sc.output_tokens, sc.total_tokens)
    assert fake_upstream.last.target == "/v1/chat/completions"
    record = proxy.wait_record(rid)
    # One line per request, at its end: never one per chunk.
    assert sum(rid in line for line in proxy.log_lines()) == 1
    assert_record(record, provider=prefix, streaming=True,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  total_tokens=sc.total_tokens, cached_tokens=sc.cached_tokens,
                  reasoning_tokens=sc.reasoning_tokens, finish_reason="stop")


def test_openai_stream_bytes_pass_through_exactly(proxy: ProxyProcess,
                                                  fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions",
                         json={"model": MODEL, "stream": True, "messages": [],
                               "stream_options": {"include_usage": True}},
                         headers={"Authorization": "Bearer sk-x", "X-Request-ID": rid},
                         stream=True, timeout=10)
    body = b"".join(resp.iter_content(None))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["cache-control"] == "no-cache"
    assert resp.headers["x-proxy-request-id"] == rid
    assert body == b"".join(data for _, data in fake_upstream.last.all_sent())


def test_openai_legacy_completions_stream(proxy: ProxyProcess,
                                          fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = openai_client(proxy.url, rid)
    chunks = list(client.completions.create(model=MODEL, prompt="hi", stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == sc.text
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == sc.total_tokens
    assert_record(proxy.wait_record(rid), provider="openai", streaming=True,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  total_tokens=sc.total_tokens, finish_reason="stop")


def test_openai_responses_stream_usage(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = openai_client(proxy.url, rid)
    events = list(client.responses.create(model=MODEL, input="hi", stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == sc.text
    done = events[-1]
    assert done.type == "response.completed" and done.response.usage is not None
    assert done.response.usage.input_tokens == sc.input_tokens
    assert done.response.usage.output_tokens == sc.output_tokens
    assert_record(proxy.wait_record(rid), provider="openai", streaming=True,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  total_tokens=sc.total_tokens, cached_tokens=sc.cached_tokens,
                  reasoning_tokens=sc.reasoning_tokens)


def test_openai_responses_plain(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    out = openai_client(proxy.url, rid).responses.create(model=MODEL, input="hi")
    assert out.output_text == sc.text
    assert_record(proxy.wait_record(rid), provider="openai", streaming=False,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  total_tokens=sc.total_tokens, reasoning_tokens=sc.reasoning_tokens)


def test_openai_embeddings(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    out = openai_client(proxy.url, rid).embeddings.create(model=MODEL, input=["a", "b"])
    assert [d.embedding for d in out.data] == [sc.embedding, sc.embedding]
    assert fake_upstream.last.target == "/v1/embeddings"
    record = proxy.wait_record(rid)
    assert (record["input_tokens"], record["total_tokens"]) == (sc.input_tokens,
                                                                sc.input_tokens)
    assert record["streaming"] is False and record["outcome"] == "completed"


def test_openai_model_listing(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.scenario.models = ["gpt-a", "gpt-b", "gpt-c"]
    models = [m.id for m in openai_client(proxy.url, rid).models.list()]
    assert models == ["gpt-a", "gpt-b", "gpt-c"]
    rec = fake_upstream.last
    assert (rec.method, rec.target) == ("GET", "/v1/models")
    record = proxy.wait_record(rid)
    assert (record["method"], record["status"], record["provider"]) == ("GET", 200, "openai")


# -- Anthropic ------------------------------------------------------------------------------

def test_anthropic_messages_plain(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = anthropic_client(proxy.url, rid)
    raw = client.messages.with_raw_response.create(
        model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}])
    msg = raw.parse()
    assert msg.content[0].type == "text" and msg.content[0].text == sc.text
    assert (msg.usage.input_tokens, msg.usage.output_tokens) == (sc.input_tokens,
                                                                 sc.output_tokens)
    assert raw.headers["request-id"] == sc.request_id
    assert raw.headers["x-proxy-request-id"] == rid
    rec = fake_upstream.last
    assert rec.target == "/v1/messages"
    # anthropic 2.x sends the key as a bearer token; either way it must arrive untouched.
    assert rec.header("authorization") == "Bearer sk-ant-test"
    assert rec.header("anthropic-version")
    assert_record(proxy.wait_record(rid), provider="anthropic", streaming=False,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  cached_tokens=sc.cached_tokens, finish_reason="end_turn")


def test_anthropic_messages_stream(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = anthropic_client(proxy.url, rid)
    with client.messages.stream(model=MODEL, max_tokens=64,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == sc.text
    assert (final.usage.input_tokens, final.usage.output_tokens) == (sc.input_tokens,
                                                                     sc.output_tokens)
    # message_start said 1 output token, message_delta the cumulative total: not 1 + total.
    assert_record(proxy.wait_record(rid), provider="anthropic", streaming=True,
                  input_tokens=sc.input_tokens, output_tokens=sc.output_tokens,
                  cached_tokens=sc.cached_tokens, finish_reason="end_turn")


def test_anthropic_count_tokens(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.scenario.input_tokens = 4242
    count = anthropic_client(proxy.url, rid).messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "count me"}])
    assert count.input_tokens == 4242
    assert fake_upstream.last.target == "/v1/messages/count_tokens"
    record = proxy.wait_record(rid)
    assert record["input_tokens"] == 4242 and record["outcome"] == "completed"


def test_anthropic_model_listing(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.scenario.models = ["claude-a", "claude-b"]
    page = anthropic_client(proxy.url, rid).models.list()
    assert [m.id for m in page.data] == ["claude-a", "claude-b"]
    assert fake_upstream.last.path == "/v1/models"


# -- Gemini ---------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [None, "v1beta", "v1"])
def test_gemini_generate_plain(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                               version: str | None) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = gemini_client(proxy.url, rid, version=version)  # keep a reference: GC closes it
    out = client.models.generate_content(model=MODEL, contents="hi")
    assert out.text == sc.text
    assert out.usage_metadata is not None
    assert out.usage_metadata.prompt_token_count == sc.input_tokens
    rec = fake_upstream.last
    # google-genai 3.6 defaults to v1 when a base_url is given without api_version.
    assert rec.target == f"/{version or 'v1'}/models/{MODEL}:generateContent"
    assert rec.header("x-goog-api-key") == "AIza-test-gemini"
    assert_record(proxy.wait_record(rid), provider="gemini", streaming=False,
                  input_tokens=sc.input_tokens, output_tokens=gemini_output(sc),
                  total_tokens=sc.input_tokens + sc.output_tokens + sc.reasoning_tokens,
                  cached_tokens=sc.cached_tokens, reasoning_tokens=sc.reasoning_tokens,
                  finish_reason="STOP")


@pytest.mark.parametrize("version", ["v1beta", "v1"])
def test_gemini_stream_sse(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                           version: str) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = gemini_client(proxy.url, rid, version=version)
    pieces = list(client.models.generate_content_stream(model=MODEL, contents="hi"))
    assert [p.text for p in pieces] == sc.chunks
    last = pieces[-1].usage_metadata
    assert last is not None
    assert (last.prompt_token_count, last.candidates_token_count, last.thoughts_token_count) == (
        sc.input_tokens, sc.output_tokens, sc.reasoning_tokens)
    assert fake_upstream.last.target == f"/{version}/models/{MODEL}:streamGenerateContent?alt=sse"
    assert_record(proxy.wait_record(rid), provider="gemini", streaming=True,
                  input_tokens=sc.input_tokens, output_tokens=gemini_output(sc),
                  total_tokens=sc.input_tokens + sc.output_tokens + sc.reasoning_tokens,
                  cached_tokens=sc.cached_tokens, reasoning_tokens=sc.reasoning_tokens,
                  finish_reason="STOP")


def test_gemini_sse_crlf_frames_pass_through_exactly(proxy: ProxyProcess,
                                                     fake_upstream: FakeUpstream) -> None:
    resp = requests.post(
        f"{proxy.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent?alt=sse",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "AIza-x"}, stream=True, timeout=10)
    body = b"".join(resp.iter_content(None))
    assert resp.status_code == 200
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["cache-control"] == "no-cache"
    assert body == b"".join(data for _, data in fake_upstream.last.all_sent())
    assert body.count(b"\r\n\r\n") == len(fake_upstream.scenario.chunks)


def test_gemini_json_array_stream(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    resp = requests.post(
        f"{proxy.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent",
        json={"contents": [{"parts": [{"text": "hi"}]}]},
        headers={"x-goog-api-key": "AIza-x", "X-Request-ID": rid}, stream=True, timeout=10)
    body = b"".join(resp.iter_content(None))
    assert resp.status_code == 200
    assert body == b"".join(data for _, data in fake_upstream.last.all_sent())
    frames = json.loads(body)
    assert "".join(f["candidates"][0]["content"]["parts"][0]["text"] for f in frames) == sc.text
    assert_record(proxy.wait_record(rid), provider="gemini", streaming=True,
                  input_tokens=sc.input_tokens, output_tokens=gemini_output(sc),
                  total_tokens=sc.input_tokens + sc.output_tokens + sc.reasoning_tokens,
                  reasoning_tokens=sc.reasoning_tokens, finish_reason="STOP")


def test_gemini_count_tokens_and_models(proxy: ProxyProcess,
                                        fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.scenario.input_tokens = 321
    fake_upstream.scenario.models = ["gemini-a", "gemini-b"]
    client = gemini_client(proxy.url, rid, version="v1beta")
    assert client.models.count_tokens(model=MODEL, contents="x").total_tokens == 321
    assert fake_upstream.last.target == f"/v1beta/models/{MODEL}:countTokens"
    names = [m.name for m in client.models.list()]
    assert names == ["models/gemini-a", "models/gemini-b"]
    assert fake_upstream.last.path == "/v1beta/models"


def test_gemini_key_in_query_is_forwarded(proxy: ProxyProcess,
                                          fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    resp = requests.post(
        f"{proxy.url}/gemini/v1beta/models/{MODEL}:generateContent?key=AIza-query-key&x=1",
        json={"contents": []}, headers={"X-Request-ID": rid}, timeout=10)
    assert resp.status_code == 200
    assert fake_upstream.last.target == \
        f"/v1beta/models/{MODEL}:generateContent?key=AIza-query-key&x=1"
    record = proxy.wait_record(rid)
    assert "AIza-query-key" not in json.dumps(record)
    assert record["key_fingerprint"] and record["provider"] == "gemini"


# -- attribution ----------------------------------------------------------------------------

def test_meta_route_attributes_user(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    client = openai_client(proxy.url, rid, prefix="meta/alice-42/openai")
    out = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
    assert out.choices[0].message.content == sc.text
    assert fake_upstream.last.target == "/v1/chat/completions"
    record = proxy.wait_record(rid)
    assert record["user"] == "alice-42"
    assert record["provider"] == "openai"
    assert record["input_tokens"] == sc.input_tokens
