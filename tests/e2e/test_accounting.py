"""Every answer is accounted: what a client can do to make a call escape the usage records or
the rate limiter, tried against a real gunicorn worker.

- ask for a response encoding the proxy cannot read (usage would be lost);
- upload the body chunked, with no Content-Length (it used to skip inspection);
- leave a stream early (Anthropic's placeholder count, streams without a final usage);
- send a body too large to inspect to dodge a per-model limit.
"""

from __future__ import annotations

import json
import math
import socket
import struct
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from conftest import ProxyLauncher, ProxyProcess
from fake_upstream import FakeUpstream, Recorded, Reply, sse

from e2e.rawhttp import parse_one, send_raw

pytestmark = pytest.mark.e2e

INSPECT_MAX = 4096
MAX_BODY = 1 << 20
TOKEN_LIMIT = 1_000_000
# provider_chars_per_token in configs/base.yml (openai 5, anthropic 3), else chars_per_token
CHARS_PER_TOKEN = {"openai": 5, "anthropic": 3, "gemini": 4}
PER_MODEL = {"chunked-model": {"requests_per_minute": 1},
             "big-model": {"requests_per_minute": 1},
             "gemini-big-model": {"requests_per_minute": 1},
             "multipart-model": {"requests_per_minute": 1}}


@pytest.fixture(scope="module")
def proxy(proxy_launcher: ProxyLauncher) -> ProxyProcess:
    """One worker, memory limiter: per-model request limits, and a token limit per key that
    only tells how many tokens each call was charged (the RateLimit header's ``r``)."""
    return proxy_launcher(config={
        "server": {"max_body_bytes": MAX_BODY, "inspect_max_bytes": INSPECT_MAX},
        "features": {"rate_limiting": {
            "enabled": True, "backend": "memory",
            "scope_limits": {"key": {"tokens_per_minute": TOKEN_LIMIT}},
            "overrides": {"per_model": PER_MODEL}}},
    }, workers=1)


@pytest.fixture
def fake(fake_upstream: FakeUpstream) -> Iterator[FakeUpstream]:
    yield fake_upstream


def new_key() -> str:
    return "sk-acct-" + uuid.uuid4().hex


def auth(dialect: str, key: str) -> dict[str, str]:
    if dialect == "anthropic":
        return {"x-api-key": key, "anthropic-version": "2023-06-01"}
    if dialect == "gemini":
        return {"x-goog-api-key": key}
    return {"Authorization": f"Bearer {key}"}


def charged(proxy: ProxyProcess, key: str) -> int:
    """Tokens the key's minute counter holds now: a call estimated at 0 tokens reads it."""
    resp = requests.post(proxy.url + "/openai/v1/models/none", timeout=10,
                         headers=auth("openai", key))
    remaining = int(resp.headers["RateLimit"].split(";r=")[1].split(";")[0])
    return TOKEN_LIMIT - remaining


# -- (a) only encodings the proxy reads --------------------------------------------------------

def negotiating(fake: FakeUpstream) -> Any:
    """A provider that prefers brotli and zstd when offered (as real ones do); what it sends
    then is opaque here, as it would be to the proxy's usage reader."""
    def handler(rec: Recorded, reply: Reply) -> None:
        offered = [c.split(";")[0].strip().lower()
                   for c in (rec.header("accept-encoding") or "").split(",")]
        if {"br", "zstd", "*"} & set(offered):
            reply.send(200, b"\x1b\x03\x00\xf8\xa5opaque-brotli", [("Content-Encoding", "br")])
            return
        if "gzip" in offered:
            reply.encoding = "gzip"
        fake.defaults(rec, reply)
    return handler


@pytest.mark.parametrize(("accept", "forwarded"), [
    ("br", "identity"),
    ("gzip, deflate, br, zstd", "gzip, deflate"),
    ("br;q=1.0, gzip;q=0.5", "gzip;q=0.5"),
    ("*", "gzip, deflate"),
    ("zstd, identity;q=0", "identity"),
])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_only_readable_encodings_are_asked_for(proxy: ProxyProcess, fake: FakeUpstream,
                                               accept: str, forwarded: str,
                                               stream: bool) -> None:
    fake.script(negotiating(fake))
    body: dict[str, Any] = {"model": "fake-model-1", "max_tokens": 50,
                            "messages": [{"role": "user", "content": "hi"}]}
    if stream:
        body["stream"] = True
    resp = requests.post(proxy.url + "/anthropic/v1/messages", json=body, timeout=10,
                         headers={**auth("anthropic", new_key()), "Accept-Encoding": accept})
    assert resp.status_code == 200
    assert fake.last.header("accept-encoding") == forwarded
    record = proxy.wait_record(resp.headers["X-Proxy-Request-ID"])
    sc = fake.scenario
    assert (record["input_tokens"], record["output_tokens"]) == (sc.input_tokens,
                                                                   sc.output_tokens)
    assert record["output_estimated"] is False
    if stream:
        assert sc.text in "".join(json.loads(line[6:]).get("delta", {}).get("text", "")
                                  for line in resp.text.splitlines()
                                  if line.startswith("data: "))
    else:
        assert resp.json()["content"][0]["text"] == sc.text


# -- (b) chunked uploads are inspected ---------------------------------------------------------

def chunked(body: bytes, piece: int = 1000) -> bytes:
    out = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + piece]), body[i:i + piece])
                   for i in range(0, len(body), piece))
    return out + b"0\r\n\r\n"


def raw_post(proxy: ProxyProcess, path: str, body: bytes, *, key: str, chunk: bool,
             content_type: str = "application/json") -> tuple[int, str]:
    rid = "acct-" + uuid.uuid4().hex
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n"
            f"Authorization: Bearer {key}\r\nContent-Type: {content_type}\r\n"
            f"X-Request-ID: {rid}\r\nConnection: close\r\n")
    head += "Transfer-Encoding: chunked\r\n" if chunk else f"Content-Length: {len(body)}\r\n"
    answer = parse_one(send_raw(proxy.port, head.encode() + b"\r\n" +
                                (chunked(body) if chunk else body)), "POST")
    return answer.status, rid


def chat_body(model: str, padding: int = 0) -> bytes:
    return json.dumps({"model": model, "messages": [
        {"role": "user", "content": "hello " + "x" * padding}]}).encode()


def test_chunked_upload_is_inspected_like_any_other(proxy: ProxyProcess,
                                                    fake: FakeUpstream) -> None:
    """Model scope, per-model override, estimate: the same as with a Content-Length."""
    body = chat_body("chunked-model", padding=95)
    status, rid = raw_post(proxy, "/openai/v1/chat/completions", body, key=new_key(),
                           chunk=True)
    assert status == 200
    assert fake.last.body == body  # forwarded whole, byte for byte
    record = proxy.wait_record(rid)
    assert record["model"] == "chunked-model" and record["request_bytes"] == len(body)
    status, rid = raw_post(proxy, "/openai/v1/chat/completions", body, key=new_key(),
                           chunk=True)
    assert status == 429  # requests_per_minute: 1 for chunked-model
    assert proxy.wait_record(rid)["error_kind"] == "rate_limited"


def test_chunked_upload_estimate_counts_its_prompt(proxy: ProxyProcess,
                                                   fake: FakeUpstream) -> None:
    key = new_key()
    fake.script(lambda rec, reply: reply.json(500, {"error": {"message": "down"}}))
    # A 5xx refunds nothing of the request count but all tokens: the header of the answer
    # (set before reconciliation) shows the estimate itself.
    body = chat_body("fake-model-1", padding=994)  # 1,000 characters of prompt
    resp = requests.post(proxy.url + "/openai/v1/chat/completions", timeout=10,
                         data=iter([body[:500], body[500:]]),  # a generator: chunked
                         headers={**auth("openai", key), "Content-Type": "application/json"})
    assert fake.last.header("transfer-encoding") is None  # inspected: sent with a length
    remaining = int(resp.headers["RateLimit"].split(";r=")[1].split(";")[0])
    assert TOKEN_LIMIT - remaining == math.ceil(1000 / CHARS_PER_TOKEN["openai"])


def test_chunked_upload_over_the_inspection_cap_streams_through(proxy: ProxyProcess,
                                                               fake: FakeUpstream) -> None:
    body = chat_body("fake-model-1", padding=3 * INSPECT_MAX)
    # multipart: a JSON body this large would be refused here, where per_model limits are
    # set (see the last tests); the fake reads it as JSON all the same.
    status, rid = raw_post(proxy, "/openai/v1/chat/completions", body, key=new_key(),
                           chunk=True, content_type="multipart/form-data; boundary=x")
    assert status == 200
    assert fake.last.body == body
    assert fake.last.header("transfer-encoding") == "chunked"
    assert proxy.wait_record(rid)["request_bytes"] == len(body)


# -- (c) an aborted stream is charged what was relayed -----------------------------------------

TEXT = "lorem ipsum dolor sit amet, consectetur adipiscing elit "  # no JSON escapes
DELTAS = 30
ROUTES = {"openai": "/openai/v1/chat/completions", "anthropic": "/anthropic/v1/messages",
          "gemini": "/gemini/v1beta/models/fake-model-1:streamGenerateContent?alt=sse"}
PROMPT = "hello"


def stalling(dialect: str, fake: FakeUpstream) -> Any:
    """A stream that sends DELTAS text deltas (and, for Anthropic, the message_start
    placeholder count), then stalls until the test ends: the provider's final count never
    comes."""
    def handler(rec: Recorded, reply: Reply) -> None:
        reply.start_stream()
        if dialect == "anthropic":
            reply.write(sse({"type": "message_start", "message": {
                "id": "msg_x", "type": "message", "role": "assistant", "content": [],
                "model": "fake-model-1", "stop_reason": None,
                "usage": {"input_tokens": 17, "cache_read_input_tokens": 3,
                          "cache_creation_input_tokens": 0, "output_tokens": 1}}},
                event="message_start"))
        for i in range(DELTAS):
            if dialect == "anthropic":
                data = sse({"type": "content_block_delta", "index": 0,
                            "delta": {"type": "text_delta", "text": TEXT}},
                           event="content_block_delta")
            elif dialect == "gemini":
                data = sse(fake.defaults.gemini_response(False, TEXT), sep=b"\r\n\r\n")
            else:
                data = sse({"id": "chatcmpl-x", "object": "chat.completion.chunk",
                            "created": 1, "model": "fake-model-1", "choices": [
                                {"index": 0, "delta": {"content": TEXT},
                                 "finish_reason": None}]})
            reply.write(data + (b"event: ping\ndata: {}\n\n" if i == DELTAS - 1 else b""))
        fake.release.wait(30)
        # Events without text, until the proxy, writing them to a client that left, drops
        # the connection (a proxy only learns that a client left when it writes to it).
        while not rec.client_gone.wait(0.05):  # this request's: a later test has its own
            reply.write(b"event: ping\ndata: {}\n\n")
    return handler


def stream_body(dialect: str) -> bytes:
    if dialect == "gemini":
        return json.dumps({"contents": [{"parts": [{"text": PROMPT}]}]}).encode()
    doc: dict[str, Any] = {"model": "fake-model-1", "stream": True,
                           "messages": [{"role": "user", "content": PROMPT}]}
    if dialect == "anthropic":
        doc["max_tokens"] = 4000  # required by the API; reserved, then mostly refunded
    return json.dumps(doc).encode()


@pytest.mark.parametrize("dialect", ["openai", "anthropic", "gemini"])
def test_an_aborted_stream_is_charged_what_was_relayed(proxy: ProxyProcess,
                                                       fake: FakeUpstream,
                                                       dialect: str) -> None:
    fake.script(stalling(dialect, fake))
    key = new_key()
    rid = "acct-" + uuid.uuid4().hex
    body = stream_body(dialect)
    head = "".join(f"{k}: {v}\r\n" for k, v in auth(dialect, key).items())
    request = (f"POST {ROUTES[dialect]} HTTP/1.1\r\nHost: 127.0.0.1:{proxy.port}\r\n{head}"
               f"Content-Type: application/json\r\nX-Request-ID: {rid}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=10) as sock:
        sock.sendall(request)
        seen = b""
        while b"event: ping" not in seen:  # every delta relayed (the marker follows the last)
            piece = sock.recv(65536)
            assert piece, seen[-300:]
            seen += piece
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    fake.release.set()
    record = proxy.wait_record(rid)
    fake.script(fake.defaults)
    assert record["outcome"] == "client_aborted"
    relayed = math.ceil(DELTAS * len(TEXT) / CHARS_PER_TOKEN[dialect])
    assert record["output_tokens"] == relayed
    assert record["output_estimated"] is True
    if dialect == "anthropic":  # the prompt's real count came with message_start
        assert record["input_tokens"] == 17
        prompt = 17 + 3
    else:  # no usage at all: the prompt keeps its estimate
        assert record["input_tokens"] is None
        prompt = math.ceil(len(PROMPT) / CHARS_PER_TOKEN[dialect])
    assert charged(proxy, key) == prompt + relayed


# -- (d) per-model limits and bodies too large to inspect ---------------------------------------

def test_uninspectable_body_cannot_dodge_a_per_model_limit(proxy: ProxyProcess,
                                                           fake: FakeUpstream) -> None:
    """Its model cannot be checked, so while per_model overrides exist it is refused (413,
    provider-shaped, nothing forwarded) rather than let through unlimited."""
    big = chat_body("big-model", padding=2 * INSPECT_MAX)
    for chunk in (False, True):
        status, rid = raw_post(proxy, "/openai/v1/chat/completions", big, key=new_key(),
                               chunk=chunk)
        assert status == 413
        assert proxy.wait_record(rid)["error_kind"] == "too_large"
    assert fake.requests == []
    small = chat_body("big-model")
    assert raw_post(proxy, "/openai/v1/chat/completions", small, key=new_key(),
                    chunk=False)[0] == 200


def test_gemini_model_in_the_path_is_limited_whatever_the_body(proxy: ProxyProcess,
                                                               fake: FakeUpstream) -> None:
    body = json.dumps({"contents": [{"parts": [{"text": "x" * 2 * INSPECT_MAX}]}]}).encode()
    path = "/gemini/v1beta/models/gemini-big-model:generateContent"
    statuses = [raw_post(proxy, path, body, key=new_key(), chunk=False)[0] for _ in range(2)]
    assert statuses == [200, 429]


def test_multipart_uploads_are_not_refused(proxy: ProxyProcess, fake: FakeUpstream) -> None:
    """File and audio uploads are multipart, not JSON: never inspected, never refused (the
    README says per_model limits do not reach them)."""
    body = b"--x\r\nContent-Disposition: form-data; name=\"model\"\r\n\r\nmultipart-model\r\n"
    body += b"--x\r\n" + b"a" * 2 * INSPECT_MAX + b"\r\n--x--\r\n"
    for _ in range(2):
        status, _ = raw_post(proxy, "/openai/v1/audio/transcriptions", body, key=new_key(),
                             chunk=False, content_type="multipart/form-data; boundary=x")
        assert status == 400  # the fake's answer to a body that is not JSON: forwarded
    assert [r.body for r in fake.requests] == [body, body]
