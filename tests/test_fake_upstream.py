"""The fake upstream itself: the official SDKs, talking to it directly, understand its answers.

If these fail, an end-to-end failure says nothing about the proxy.
"""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import time
from collections.abc import Iterator

import anthropic
import openai
import pytest
import requests
from fake_upstream import FakeUpstream, error
from google import genai
from google.genai import errors as genai_errors
from google.genai import types


def openai_client(fake: FakeUpstream) -> openai.OpenAI:
    return openai.OpenAI(api_key="sk-test", base_url=fake.url + "/v1", max_retries=0)


def test_openai_sdk_chat_plain_and_stream(fake_upstream: FakeUpstream) -> None:
    client = openai_client(fake_upstream)
    sc = fake_upstream.scenario
    out = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].message.content == sc.text
    assert out.usage is not None and out.usage.prompt_tokens == sc.input_tokens

    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == sc.text
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == sc.output_tokens
    rec = fake_upstream.last
    assert rec.header("transfer-encoding") is None  # the SDK sent Content-Length
    assert rec.json()["stream"] is True
    assert len(rec.all_sent()) == len(sc.chunks) + 4  # role, pieces, finish, usage, [DONE]


def test_openai_sdk_responses_embeddings_models(fake_upstream: FakeUpstream) -> None:
    client = openai_client(fake_upstream)
    sc = fake_upstream.scenario
    events = list(client.responses.create(model="m", input="hi", stream=True))
    assert events[-1].type == "response.completed"
    assert events[-1].response.usage is not None
    assert events[-1].response.usage.output_tokens == sc.output_tokens
    deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert deltas == sc.text
    emb = client.embeddings.create(model="m", input="hello")
    assert emb.data[0].embedding == sc.embedding
    assert [m.id for m in client.models.list()] == sc.models


def test_anthropic_sdk_plain_stream_count(fake_upstream: FakeUpstream) -> None:
    client = anthropic.Anthropic(api_key="sk-ant-test", base_url=fake_upstream.url,
                                 max_retries=0)
    sc = fake_upstream.scenario
    msg = client.messages.create(model="m", max_tokens=10,
                                 messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].type == "text" and msg.content[0].text == sc.text
    with client.messages.stream(model="m", max_tokens=10,
                                messages=[{"role": "user", "content": "hi"}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == sc.text
    assert final.usage.output_tokens == sc.output_tokens
    assert final.usage.input_tokens == sc.input_tokens
    count = client.messages.count_tokens(model="m", messages=[{"role": "user", "content": "x"}])
    assert count.input_tokens == sc.input_tokens


@pytest.mark.parametrize("version", [None, "v1beta"])
def test_genai_sdk(fake_upstream: FakeUpstream, version: str | None) -> None:
    client = genai.Client(api_key="AIza-test", http_options=types.HttpOptions(
        base_url=fake_upstream.url, api_version=version))
    sc = fake_upstream.scenario
    out = client.models.generate_content(model="gemini-x", contents="hi")
    assert out.text == sc.text
    assert out.usage_metadata is not None
    assert out.usage_metadata.prompt_token_count == sc.input_tokens
    pieces = list(client.models.generate_content_stream(model="gemini-x", contents="hi"))
    assert "".join(p.text or "" for p in pieces) == sc.text
    assert pieces[-1].usage_metadata is not None
    assert pieces[-1].usage_metadata.candidates_token_count == sc.output_tokens
    assert client.models.count_tokens(model="gemini-x", contents="hi").total_tokens == \
        sc.input_tokens
    rec = fake_upstream.last
    assert rec.path.startswith(f"/{version or 'v1'}/models/gemini-x:")
    assert rec.header("x-goog-api-key") == "AIza-test"


def test_genai_sdk_error(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(error("gemini", 429, "slow down"))
    client = genai.Client(api_key="k", http_options=types.HttpOptions(base_url=fake_upstream.url))
    with pytest.raises(genai_errors.ClientError) as info:
        client.models.generate_content(model="gemini-x", contents="hi")
    assert info.value.code == 429


def test_gemini_json_array_stream_is_chunked(fake_upstream: FakeUpstream) -> None:
    resp = requests.post(fake_upstream.url + "/v1beta/models/g:streamGenerateContent",
                         json={"contents": []}, headers={"x-goog-api-key": "k"})
    assert resp.headers["transfer-encoding"] == "chunked"
    frames = json.loads(resp.content)
    assert "".join(f["candidates"][0]["content"]["parts"][0]["text"] for f in frames) == \
        fake_upstream.scenario.text
    assert b"\n,\r\n" in resp.content


def test_gzip_and_records(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(fake_upstream.scripts.compressed("gzip"))
    conn = http.client.HTTPConnection("127.0.0.1", fake_upstream.port)
    conn.request("GET", "/v1/models?x=%2e%2e", headers={"Accept-Encoding": "gzip"})
    resp = conn.getresponse()
    raw = resp.read()
    conn.close()
    assert resp.getheader("content-encoding") == "gzip"
    assert int(resp.getheader("content-length") or 0) == len(raw)
    assert json.loads(gzip.decompress(raw))["data"][0]["id"] == fake_upstream.scenario.models[0]
    assert fake_upstream.last.target == "/v1/models?x=%2e%2e"


def test_chunked_upload_and_pause_and_death(fake_upstream: FakeUpstream) -> None:
    def gen() -> Iterator[bytes]:
        yield b'{"model": "m", "stream": true, '
        yield b'"messages": []}'
    fake_upstream.script(fake_upstream.scripts.paused(0.2))
    t0 = time.monotonic()
    resp = requests.post(fake_upstream.url + "/v1/chat/completions", data=gen(), stream=True)
    first = next(resp.iter_content(None))
    assert time.monotonic() - t0 < 0.15 and first.startswith(b"data: ")
    resp.close()
    rec = fake_upstream.last
    assert rec.header("transfer-encoding") == "chunked"
    assert rec.json()["stream"] is True

    fake_upstream.reset()
    fake_upstream.script(fake_upstream.scripts.dying(after=2))
    resp = requests.post(fake_upstream.url + "/v1/chat/completions", json={"stream": True},
                         stream=True)
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        for _ in resp.iter_content(None):
            pass


def test_endless_stream_notices_client_gone(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(fake_upstream.scripts.endless())
    resp = requests.post(fake_upstream.url + "/v1/chat/completions", json={"stream": True},
                         stream=True)
    next(resp.iter_content(None))

    resp.close()
    assert fake_upstream.last.client_gone.wait(1.0)


def test_delay_is_cut_short_by_reset(fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(fake_upstream.scripts.delayed(30))
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.get(fake_upstream.url + "/v1/models", timeout=0.3)


def test_truncated_chunked_upload_is_not_complete(fake_upstream: FakeUpstream) -> None:
    with socket.create_connection(("127.0.0.1", fake_upstream.port)) as sock:
        sock.sendall(b"POST /v1/files HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n")
    assert fake_upstream.complete_requests() == []
    (rec,) = fake_upstream.requests
    assert rec.body_done.is_set() and not rec.body_complete
