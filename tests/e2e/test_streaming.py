"""Streams through the real proxy: no buffering, compression, disconnects, mid-stream death."""

from __future__ import annotations

import gzip
import json
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anthropic
import openai
import pytest
import requests
from conftest import ProxyProcess, new_request_id
from fake_upstream import FakeUpstream
from google.genai import errors as genai_errors

from e2e.sdk import anthropic_client, gemini_client, openai_client

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
PIECES = ["alpha", "bravo"]  # unique words, so each can be found in the upstream's writes
PAUSE = 0.5  # the upstream waits this long after each piece before its next write
LATENCY_BUDGET = 0.1  # a piece must reach the client within this of being sent


def pause_after_pieces(fake: FakeUpstream) -> None:
    fake.scenario.chunks = list(PIECES)
    fake.script(fake.scripts.paused(PAUSE, after=[p.encode() for p in PIECES]))


def assert_prompt(fake: FakeUpstream, received: dict[str, float]) -> None:
    rec = fake.last
    for piece in PIECES:
        sent = rec.sent_time_of(piece.encode())
        lag = received[piece] - sent
        assert lag < LATENCY_BUDGET, f"{piece!r} reached the client {lag:.3f}s after it was sent"


# -- each chunk is delivered before the next one is sent ----------------------------------

def test_stream_timing_openai_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    pause_after_pieces(fake_upstream)
    received: dict[str, float] = {}
    stream = openai_client(proxy.url, new_request_id()).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    for chunk in stream:
        now = time.monotonic()
        for choice in chunk.choices:
            if choice.delta.content:
                received[choice.delta.content] = now
    assert_prompt(fake_upstream, received)


def test_stream_timing_anthropic_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    pause_after_pieces(fake_upstream)
    received: dict[str, float] = {}
    client = anthropic_client(proxy.url, new_request_id())
    with client.messages.stream(model=MODEL, max_tokens=10,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        for text in stream.text_stream:
            received[text] = time.monotonic()
    assert_prompt(fake_upstream, received)


def test_stream_timing_gemini_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    pause_after_pieces(fake_upstream)
    received: dict[str, float] = {}
    client = gemini_client(proxy.url, new_request_id())
    for piece in client.models.generate_content_stream(model=MODEL, contents="hi"):
        received[piece.text or ""] = time.monotonic()
    assert_prompt(fake_upstream, received)


def test_stream_timing_responses_api(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    pause_after_pieces(fake_upstream)
    received: dict[str, float] = {}
    client = openai_client(proxy.url, new_request_id())
    for event in client.responses.create(model=MODEL, input="hi", stream=True):
        if event.type == "response.output_text.delta":
            received[event.delta] = time.monotonic()
    assert_prompt(fake_upstream, received)


def test_stream_timing_gemini_json_array(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    """The non-SSE Gemini stream is application/json, yet must not be buffered either."""
    pause_after_pieces(fake_upstream)
    received: dict[str, float] = {}
    resp = requests.post(f"{proxy.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent",
                         json={"contents": []}, headers={"x-goog-api-key": "k"},
                         stream=True, timeout=10)
    for data in resp.iter_content(None):
        now = time.monotonic()
        for piece in PIECES:
            if piece.encode() in data:
                received.setdefault(piece, now)
    assert_prompt(fake_upstream, received)


def test_concurrent_streams_do_not_wait_for_each_other(start_proxy: Any,
                                                      fake_upstream: FakeUpstream) -> None:
    """One gevent worker relays many slow streams at once."""
    proxy = start_proxy(workers=1)
    pause_after_pieces(fake_upstream)
    count = 12

    def one(_: int) -> float:
        started = time.monotonic()
        resp = requests.post(f"{proxy.url}/openai/v1/chat/completions",
                             json={"model": MODEL, "stream": True}, stream=True, timeout=20)
        body = b"".join(resp.iter_content(None))
        assert body.endswith(b"data: [DONE]\n\n")
        return time.monotonic() - started

    started = time.monotonic()
    with ThreadPoolExecutor(count) as pool:
        durations = list(pool.map(one, range(count)))
    elapsed = time.monotonic() - started
    single = len(PIECES) * PAUSE
    assert min(durations) >= single * 0.9
    assert elapsed < single + 1.0, f"{count} streams took {elapsed:.2f}s, one takes {single}s"
    assert len(fake_upstream.requests) == count


# -- compressed upstream bodies -----------------------------------------------------------

@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_body_via_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                 encoding: str) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.compressed(encoding))
    out = openai_client(proxy.url, rid).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}])
    assert fake_upstream.last.compressed == encoding
    assert out.choices[0].message.content == fake_upstream.scenario.text
    record = proxy.wait_record(rid)
    assert record["output_tokens"] == fake_upstream.scenario.output_tokens  # parsed decoded


def _decode(body: bytes, encoding: str | None) -> bytes:
    if encoding == "gzip":
        return gzip.decompress(body)
    if encoding == "deflate":
        return zlib.decompress(body)
    assert encoding in (None, "identity"), encoding
    return body


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_compressed_body_raw_headers_consistent(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                                encoding: str) -> None:
    """Content-Encoding and Content-Length must describe the bytes actually sent."""
    fake_upstream.script(fake_upstream.scripts.compressed(encoding))
    resp = requests.get(f"{proxy.url}/openai/v1/models",
                        headers={"Accept-Encoding": "gzip, deflate"}, stream=True, timeout=10)
    raw = resp.raw.read(decode_content=False)
    assert resp.status_code == 200
    length = resp.headers.get("content-length")
    if length is not None:
        assert int(length) == len(raw)
    decoded = json.loads(_decode(raw, resp.headers.get("content-encoding")))
    assert [m["id"] for m in decoded["data"]] == fake_upstream.scenario.models


def test_compressed_stream_via_sdk(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    sc = fake_upstream.scenario
    fake_upstream.script(fake_upstream.scripts.compressed("gzip"))
    chunks = list(openai_client(proxy.url, rid).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True}))
    assert fake_upstream.last.compressed == "gzip"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == sc.text
    record = proxy.wait_record(rid)
    assert (record["input_tokens"], record["output_tokens"]) == (sc.input_tokens,
                                                                 sc.output_tokens)


# -- the client goes away -----------------------------------------------------------------

def test_disconnect_closes_upstream_openai_sdk(proxy: ProxyProcess,
                                               fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.endless("openai"))
    stream = openai_client(proxy.url, rid).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    first = next(iter(stream))
    assert first.choices[0].delta.content == "t0 "
    closed_at = time.monotonic()
    stream.close()
    rec = fake_upstream.last
    assert rec.client_gone.wait(1.0), "upstream still streaming 1 s after the client left"
    assert rec.client_gone_at is not None and rec.client_gone_at - closed_at < 1.0
    assert len(rec.sent) < 60, "the upstream kept streaming for a long time"
    record = proxy.wait_record(rid)
    assert record["outcome"] == "client_aborted"
    assert record["streaming"] is True


@pytest.mark.parametrize("provider,path", [
    ("anthropic", "/anthropic/v1/messages"),
    ("gemini", f"/gemini/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"),
])
def test_disconnect_closes_upstream_raw(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                        provider: str, path: str) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.endless(provider))
    resp = requests.post(proxy.url + path, json={"model": MODEL, "stream": True},
                         headers={"X-Request-ID": rid, "x-api-key": "k",
                                  "anthropic-version": "2023-06-01"},
                         stream=True, timeout=10)
    assert resp.headers["x-accel-buffering"] == "no"
    assert resp.headers["cache-control"] == "no-cache"
    assert b"t0 " in next(resp.iter_content(None))
    closed_at = time.monotonic()
    resp.close()
    rec = fake_upstream.last
    assert rec.client_gone.wait(1.0), "upstream still streaming 1 s after the client left"
    assert rec.client_gone_at is not None and rec.client_gone_at - closed_at < 1.0
    assert proxy.wait_record(rid)["outcome"] == "client_aborted"


# -- the upstream dies mid-stream ---------------------------------------------------------

def test_midstream_failure_openai_sdk_raises(proxy: ProxyProcess,
                                             fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.dying(after=3))
    stream = openai_client(proxy.url, rid).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True)
    seen: list[str] = []
    with pytest.raises(openai.APIError):
        for chunk in stream:
            seen.extend(c.delta.content for c in chunk.choices if c.delta.content)
    sc = fake_upstream.scenario
    assert "".join(seen) == "".join(sc.chunks[:2])  # everything sent before the failure
    record = proxy.wait_record(rid)
    assert record["outcome"] == "upstream_error"
    assert record["status"] == 200  # the headers had already gone out


def test_midstream_failure_anthropic_sdk_raises(proxy: ProxyProcess,
                                                fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.dying(after=4))
    client = anthropic_client(proxy.url, rid)
    with pytest.raises(anthropic.APIError):
        with client.messages.stream(model=MODEL, max_tokens=10,
                                    messages=[{"role": "user", "content": "hi"}]) as stream:
            for _ in stream.text_stream:
                pass
    assert proxy.wait_record(rid)["outcome"] == "upstream_error"


def test_midstream_failure_gemini_sdk_raises(proxy: ProxyProcess,
                                             fake_upstream: FakeUpstream) -> None:
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.dying(after=2))
    client = gemini_client(proxy.url, rid)
    with pytest.raises(genai_errors.APIError):
        for _ in client.models.generate_content_stream(model=MODEL, contents="hi"):
            pass
    assert proxy.wait_record(rid)["outcome"] == "upstream_error"


def test_midstream_failure_of_a_json_array_stream_is_not_a_complete_body(
        proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    # Without alt=sse Gemini streams a JSON array: no event can be appended to it, so the
    # proxy drops the connection and the client sees a broken body, never a complete one.
    rid = new_request_id()
    fake_upstream.script(fake_upstream.scripts.dying(after=2))
    resp = requests.post(f"{proxy.url}/gemini/v1beta/models/{MODEL}:streamGenerateContent",
                         json={"contents": [{"parts": [{"text": "hi"}]}]},
                         headers={"X-Request-ID": rid, "x-goog-api-key": "k-test"},
                         stream=True, timeout=10)
    assert resp.status_code == 200
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in resp.iter_content(None):
            pass
    assert proxy.wait_record(rid)["outcome"] == "upstream_error"


def test_midstream_failure_body_contains_no_internal_address(
        proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(fake_upstream.scripts.dying(after=2))
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions",
                         json={"model": MODEL, "stream": True}, stream=True, timeout=10)
    body = b"".join(resp.iter_content(None))
    tail = body.rsplit(b"data: ", 1)[-1]
    assert json.loads(tail)["error"]["message"]
    assert fake_upstream.address.encode() not in body
    assert b"127.0.0.1" not in body
