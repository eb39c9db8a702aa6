"""Faithful forwarding: headers, methods, request ids, CORS, path escapes, big uploads, health."""

from __future__ import annotations

import hashlib
import http.client
import os
import posixpath
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import unquote

import pytest
import requests
from conftest import ProxyLauncher, ProxyProcess, new_request_id
from fake_upstream import FakeUpstream

from e2e.rawhttp import send_raw

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"




def status_of(response: bytes) -> int:
    assert response.startswith(b"HTTP/1."), response[:200]
    return int(response.split(b" ", 2)[1])


# -- headers and methods ------------------------------------------------------------------

def test_request_headers_forwarded_except_hop_by_hop(proxy: ProxyProcess,
                                                     fake_upstream: FakeUpstream) -> None:
    headers = {
        "Authorization": "Bearer sk-fwd",
        "x-api-key": "sk-ant-fwd",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "tools-2024",
        "x-goog-api-key": "AIza-fwd",
        "X-Stainless-Lang": "python",
        "OpenAI-Organization": "org-1",
        "User-Agent": "custom-agent/1.0",
        "Content-Type": "application/json",
        # hop-by-hop: for this connection only
        "Connection": "keep-alive, X-Hop-Only",
        "X-Hop-Only": "secret-hop",
        "Keep-Alive": "timeout=5",
        "Proxy-Authorization": "Basic cHJveHk6cHJveHk=",
        "TE": "trailers",
    }
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions?a=1&b=%2F&c=",
                         data=b'{"model": "fake-model-1"}', headers=headers, timeout=10)
    assert resp.status_code == 200
    rec = fake_upstream.last
    assert rec.target == "/v1/chat/completions?a=1&b=%2F&c="
    assert rec.body == b'{"model": "fake-model-1"}'
    for name in ("Authorization", "x-api-key", "anthropic-version", "anthropic-beta",
                 "x-goog-api-key", "X-Stainless-Lang", "OpenAI-Organization", "User-Agent",
                 "Content-Type"):
        assert rec.header(name) == headers[name], name
    names = rec.header_names()
    for hop in ("x-hop-only", "keep-alive", "proxy-authorization", "te"):
        assert hop not in names, hop
    assert rec.header("host") == fake_upstream.address


def test_response_headers_forwarded_except_hop_by_hop(proxy: ProxyProcess,
                                                      fake_upstream: FakeUpstream) -> None:
    fake_upstream.script(lambda rec, reply: reply.send(200, b'{"ok": true}', [
        ("x-request-id", "req_up_1"), ("openai-processing-ms", "42"),
        ("x-ratelimit-remaining-tokens", "999"), ("Set-Cookie", "a=b"),
        ("Connection", "X-Up-Hop"), ("X-Up-Hop", "1"), ("Keep-Alive", "timeout=3"),
        ("Proxy-Authenticate", "Basic"), ("X-Custom", "kept")]))
    rid = new_request_id()
    resp = requests.get(f"{proxy.url}/openai/v1/models", headers={"X-Request-ID": rid},
                        timeout=10)
    assert resp.json() == {"ok": True}
    assert resp.headers["x-request-id"] == "req_up_1"  # the provider's id is not overwritten
    assert resp.headers["x-proxy-request-id"] == rid
    assert resp.headers["openai-processing-ms"] == "42"
    assert resp.headers["x-ratelimit-remaining-tokens"] == "999"
    assert resp.headers["x-custom"] == "kept"
    for hop in ("x-up-hop", "proxy-authenticate"):
        assert hop not in resp.headers, hop
    assert "timeout=3" not in resp.headers.get("keep-alive", "")


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "GET"])
def test_methods_forwarded(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                           method: str) -> None:
    fake_upstream.script(lambda rec, reply: reply.json(200, {"method": rec.method}))
    body = b"" if method == "GET" else b'{"x": 1}'
    resp = requests.request(method, f"{proxy.url}/anthropic/v1/files/file_1?x=y", data=body,
                            headers={"x-api-key": "k"}, timeout=10)
    assert resp.json() == {"method": method}
    rec = fake_upstream.last
    assert (rec.method, rec.target, rec.body) == (method, "/v1/files/file_1?x=y", body)


def test_head_request(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    got = requests.get(f"{proxy.url}/openai/v1/models", timeout=10)
    resp = requests.head(f"{proxy.url}/openai/v1/models", timeout=10)
    assert resp.status_code == got.status_code == 200
    assert resp.content == b""
    # HEAD describes the body GET would send: the upstream's Content-Length is kept.
    assert int(resp.headers["Content-Length"]) == len(got.content) > 0
    assert fake_upstream.last.method == "HEAD"


# -- request ids --------------------------------------------------------------------------

def test_request_id_generated_when_absent_or_malformed(proxy: ProxyProcess,
                                                       fake_upstream: FakeUpstream) -> None:
    ids = set()
    for incoming in (None, "bad id with spaces", "x" * 1000, "<script>"):
        headers = {} if incoming is None else {"X-Request-ID": incoming}
        resp = requests.get(f"{proxy.url}/openai/v1/models", headers=headers, timeout=10)
        rid = resp.headers["x-proxy-request-id"]
        assert rid and rid != incoming and len(rid) <= 128
        ids.add(rid)
        assert resp.headers["x-request-id"] == fake_upstream.scenario.request_id
        proxy.wait_record(rid)
    assert len(ids) == 4


def test_request_id_on_health_and_errors(proxy: ProxyProcess) -> None:
    rid = new_request_id()
    for path in ("/health", "/no/such/route"):
        resp = requests.get(proxy.url + path, headers={"X-Request-ID": rid}, timeout=5)
        assert resp.headers["x-proxy-request-id"] == rid


# -- CORS ---------------------------------------------------------------------------------

BROWSER_HEADERS = ("x-api-key", "anthropic-version",
                   "anthropic-dangerous-direct-browser-access", "x-goog-api-key",
                   "x-stainless-os", "x-stainless-lang", "authorization", "content-type",
                   "x-request-id")


@pytest.mark.parametrize("path", ["/anthropic/v1/messages",
                                  f"/gemini/v1beta/models/{MODEL}:generateContent",
                                  "/openai/v1/chat/completions",
                                  "/meta/bob/anthropic/v1/messages"])
def test_cors_preflight_answered_locally(proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                         path: str) -> None:
    resp = requests.options(proxy.url + path, headers={
        "Origin": "http://app.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": ",".join(BROWSER_HEADERS),
    }, timeout=5)
    assert resp.status_code in (200, 204)
    assert resp.headers["access-control-allow-origin"] in ("*", "http://app.example")
    allowed = resp.headers.get("access-control-allow-headers", "").lower()
    for name in BROWSER_HEADERS:
        assert name in allowed or allowed.strip() == "*", name
    assert "POST" in resp.headers.get("access-control-allow-methods", "")
    assert fake_upstream.requests == []


def test_cors_on_proxied_response(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    resp = requests.post(f"{proxy.url}/anthropic/v1/messages",
                         json={"model": MODEL, "max_tokens": 5, "messages": []},
                         headers={"Origin": "http://app.example", "x-api-key": "k",
                                  "anthropic-version": "2023-06-01"}, timeout=10)
    assert resp.status_code == 200
    assert resp.headers["access-control-allow-origin"] in ("*", "http://app.example")
    exposed = resp.headers.get("access-control-expose-headers", "").lower()
    assert "x-proxy-request-id" in exposed and "retry-after" in exposed


# -- health -------------------------------------------------------------------------------

def test_health(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    resp = requests.get(f"{proxy.url}/health", timeout=5)
    assert resp.status_code == 200
    body = resp.json()
    for key in ("status", "version", "git_commit", "build_time", "python_version",
                "uptime_seconds", "providers"):
        assert key in body, key
    assert body["uptime_seconds"] >= 0
    for name in ("openai", "anthropic", "gemini", "groq"):
        entry = body["providers"][name]
        assert entry["base_url"] == fake_upstream.url
        assert entry["streaming_support"] is True
        assert entry["status"]
    head = requests.head(f"{proxy.url}/health", timeout=5)
    assert head.status_code == 200 and head.content == b""
    assert fake_upstream.requests == []  # never a model call


# -- path escapes -------------------------------------------------------------------------

BASE_PATH = "/base/api"


@pytest.fixture(scope="module")
def based_proxy(proxy_launcher: ProxyLauncher, fake_upstream_server: FakeUpstream) -> ProxyProcess:
    """A provider whose base URL has a path, so escaping it is observable."""
    return proxy_launcher(config={"providers": {
        "based": {"base_url": fake_upstream_server.url + BASE_PATH, "dialect": "openai"}}})


ESCAPES = [
    "/based/v1/../../x",
    "/based/v1/../../../x",
    "/based/..",
    "/based/v1/%2e%2e/%2e%2e/x",
    "/based/%2E%2E%2F%2E%2E%2Fx",
    "/based/%2e%2e%2f%2e%2e%2fx",
    "/based/v1/..%2F..%2Fx",
    "/based//evil.example/v1/models",
    "/based/@evil.example/v1/models",
    "/based/v1/..\\..\\x",
    "/based/%5C%5Cevil.example/x",
    "/based/\\\\evil.example/x",
    "/based/v1/models?next=http://evil.example/",
    "/based/http://evil.example/v1/models",
    "/based/https:/evil.example/x",
    "/openai/v1/../../x",
    "/openai//evil.example/v1/models",
    "/openai/@evil.example/x",
    "/meta/u/based/../../x",
]


def _assert_contained(fake: FakeUpstream, base: str) -> None:
    for rec in fake.requests:
        assert rec.header("host") == fake.address, rec.headers
        assert rec.target.startswith("/"), rec.target
        path = rec.path
        # Whatever the upstream (or anything behind it) decodes, it must stay under the base.
        for candidate in (path, unquote(path), unquote(unquote(path)),
                          unquote(path).replace("\\", "/")):
            norm = posixpath.normpath(candidate)
            assert norm == base.rstrip("/") or norm.startswith(base.rstrip("/") + "/") \
                or base == "/", f"{rec.target!r} escapes {base!r}"


@pytest.mark.parametrize("target", ESCAPES)
def test_path_escape_attempts(based_proxy: ProxyProcess, fake_upstream: FakeUpstream,
                              target: str) -> None:
    request = (f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1:{based_proxy.port}\r\n"
               "Authorization: Bearer sk-x\r\nConnection: close\r\n\r\n").encode("latin-1")
    response = send_raw(based_proxy.port, request)
    status = status_of(response)
    base = BASE_PATH if "/based/" in target else "/"
    if fake_upstream.requests:
        assert status < 500, response[:300]
        _assert_contained(fake_upstream, base)
    else:
        assert 400 <= status < 500, response[:300]
    assert status != 502, "the proxy tried to reach some other host"
    assert b"evil.example" not in response.split(b"\r\n\r\n", 1)[0]


@pytest.mark.parametrize("target", [
    "http://evil.example/based/v1/models",
    "http://evil.example/openai/v1/models",
    "https://evil.example:443/based/v1/models",
    "http://127.0.0.1:1/based/v1/models",
])
def test_absolute_form_request_target(based_proxy: ProxyProcess, fake_upstream: FakeUpstream,
                                      target: str) -> None:
    request = (f"GET {target} HTTP/1.1\r\nHost: evil.example\r\n"
               "Connection: close\r\n\r\n").encode()
    status = status_of(send_raw(based_proxy.port, request))
    if fake_upstream.requests:
        assert status == 200
        rec = fake_upstream.last
        assert rec.header("host") == fake_upstream.address
        expected = f"{BASE_PATH}/v1/models" if "/based/" in target else "/v1/models"
        assert rec.target == expected
    else:
        assert 400 <= status < 500
    assert status != 502


def test_escape_attempts_leave_worker_serving(based_proxy: ProxyProcess,
                                              fake_upstream: FakeUpstream) -> None:
    resp = requests.get(f"{based_proxy.url}/based/v1/models", timeout=5)
    assert resp.status_code == 200
    assert fake_upstream.last.target == f"{BASE_PATH}/v1/models"


# -- large uploads ------------------------------------------------------------------------

UPLOAD_BLOCK = 1 << 20
UPLOAD_BLOCKS = 100  # 100 MiB


def _blocks() -> Iterator[bytes]:
    seed = hashlib.sha256(b"upload").digest()
    block = (seed * (UPLOAD_BLOCK // len(seed)))
    for i in range(UPLOAD_BLOCKS):
        yield block[:-8] + i.to_bytes(8, "big")  # every block different


def _worker_pids(proxy: ProxyProcess) -> list[int]:
    assert proxy.proc is not None
    children = Path(f"/proc/{proxy.proc.pid}/task/{proxy.proc.pid}/children")
    return [int(p) for p in children.read_text().split()]


def _peak_rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture(scope="module")
def single_worker_proxy(proxy_launcher: ProxyLauncher) -> ProxyProcess:
    return proxy_launcher(workers=1)


def test_large_upload_streams_through(single_worker_proxy: ProxyProcess,
                                      fake_upstream: FakeUpstream) -> None:
    expected = hashlib.sha256()
    size = 0
    for block in _blocks():
        expected.update(block)
        size += len(block)
    measure = os.path.exists("/proc/self/status")
    if measure:
        (worker,) = _worker_pids(single_worker_proxy)
        before = _peak_rss_kib(worker)
    started = time.monotonic()
    resp = requests.post(f"{single_worker_proxy.url}/openai/v1/files", data=_blocks(),
                         headers={"Authorization": "Bearer sk-x",
                                  "Content-Type": "application/octet-stream"}, timeout=60)
    elapsed = time.monotonic() - started
    assert resp.status_code == 200, resp.text[:300]
    assert resp.json() == {"id": "file-fake", "object": "file", "bytes": size,
                           "sha256": expected.hexdigest()}
    rec = fake_upstream.last
    assert (rec.body_size, rec.body_sha256) == (size, expected.hexdigest())
    assert elapsed < 30
    if measure:
        grown_mib = (_peak_rss_kib(worker) - before) / 1024
        assert grown_mib < 48, f"the worker's peak memory grew {grown_mib:.0f} MiB for a " \
                               f"{size >> 20} MiB upload: the body was buffered"


def test_large_upload_with_content_length(single_worker_proxy: ProxyProcess,
                                          fake_upstream: FakeUpstream) -> None:
    data = b"".join(_blocks())[: 20 * UPLOAD_BLOCK]
    resp = requests.put(f"{single_worker_proxy.url}/anthropic/v1/uploads", data=data,
                        headers={"x-api-key": "k"}, timeout=60)
    assert resp.status_code == 200
    assert fake_upstream.last.body_sha256 == hashlib.sha256(data).hexdigest()
    assert fake_upstream.last.header("content-length") == str(len(data))


# -- hostile input ------------------------------------------------------------------------

def test_worker_keeps_serving_after_hostile_input(single_worker_proxy: ProxyProcess,
                                                  fake_upstream: FakeUpstream) -> None:
    proxy = single_worker_proxy
    workers_before = _worker_pids(proxy)
    port = proxy.port
    host = f"Host: 127.0.0.1:{port}\r\n"
    hostile = [
        # malformed JSON and invalid UTF-8 bodies go upstream as they are
        (f"POST /openai/v1/chat/completions HTTP/1.1\r\n{host}Content-Length: 12\r\n"
         "Content-Type: application/json\r\nConnection: close\r\n\r\n{\"model\": [").encode()
        + b"\r\n",
        (f"POST /anthropic/v1/messages HTTP/1.1\r\n{host}Content-Length: 6\r\n"
         "Connection: close\r\n\r\n").encode() + b"\xff\xfe\x80{\"a",
        # invalid UTF-8 in the path and query
        b"GET /gemini/v1beta/models/\xff\xfe:generateContent?key=\xc3\x28 HTTP/1.1\r\n"
        + host.encode() + b"Connection: close\r\n\r\n",
        b"GET /openai/v1/%ff%fe/models?x=%ff HTTP/1.1\r\n" + host.encode()
        + b"Connection: close\r\n\r\n",
        # huge header, many headers, garbage, truncated body, bad chunking
        (f"GET /openai/v1/models HTTP/1.1\r\n{host}X-Big: {'a' * 70000}\r\n"
         "Connection: close\r\n\r\n").encode(),
        (f"GET /openai/v1/models HTTP/1.1\r\n{host}"
         + "".join(f"X-H{i}: v\r\n" for i in range(300)) + "Connection: close\r\n\r\n").encode(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + os.urandom(64),  # a TLS hello
        b"GARBAGE\r\n\r\n",
        (f"POST /openai/v1/chat/completions HTTP/1.1\r\n{host}Content-Length: 1000\r\n"
         "\r\n{\"model\": \"x\"").encode(),
        (f"POST /openai/v1/chat/completions HTTP/1.1\r\n{host}Transfer-Encoding: chunked\r\n"
         "Connection: close\r\n\r\nzz\r\nabc\r\n0\r\n\r\n").encode(),
        (f"POST /openai/v1/chat/completions HTTP/1.1\r\n{host}Content-Length: 5\r\n"
         "Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n").encode(),
        (f"GET /openai/v1/models HTTP/1.1\r\n{host}X-Request-ID: \x01\x02\r\n"
         "Connection: close\r\n\r\n").encode(),
    ]
    for data in hostile:
        response = send_raw(port, data, timeout=3)
        if response:
            assert response.startswith(b"HTTP/1."), response[:100]
            assert fake_upstream.address.encode() not in response
    # Still serving, on the same worker process.
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions",
                         json={"model": MODEL, "messages": []}, timeout=5)
    assert resp.status_code == 200
    assert resp.json()["choices"][0]["message"]["content"] == fake_upstream.scenario.text
    assert _worker_pids(proxy) == workers_before
    assert "Traceback" not in proxy.log_text()


def test_keep_alive_connection_reused(proxy: ProxyProcess, fake_upstream: FakeUpstream) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=5)
    try:
        for _ in range(3):
            conn.request("POST", "/openai/v1/chat/completions",
                         body=b'{"model": "fake-model-1", "stream": true}',
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 200
            assert resp.read().endswith(b"data: [DONE]\n\n")
    finally:
        conn.close()
    assert len(fake_upstream.requests) == 3


def test_repeated_response_headers_stay_separate(proxy: ProxyProcess,
                                                 fake_upstream: FakeUpstream) -> None:
    # Set-Cookie must not be folded into one comma-joined line (Expires holds a comma).
    cookies = ["a=1; Expires=Wed, 21 Oct 2026 07:28:00 GMT; Path=/", "b=2; Path=/"]
    fake_upstream.script(lambda rec, reply: reply.send(
        200, b'{"ok": true}', [("Set-Cookie", c) for c in cookies]))
    resp = requests.get(f"{proxy.url}/openai/v1/models", timeout=10, stream=True)
    assert resp.raw.headers.getlist("Set-Cookie") == cookies
    resp.close()
