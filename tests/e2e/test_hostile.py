"""The proxy as a hostile or sloppy client meets it: raw sockets, broken framing, odd targets.

Every case checks what the client gets (a clear status; the proxy's own errors in the calling
provider's JSON shape, never an HTML page, a traceback or an internal address), what reaches
the upstream (nothing half-sent posing as a whole request), and afterwards that the same
gunicorn worker still answers a normal call and no API key reached a log line or a body.

Answers gunicorn gives before the app runs (bad request line, oversized or malformed
headers, conflicting framing) are its own HTML pages; those tests check the status and that
the worker keeps serving, not the shape.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import re
import selectors
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
import requests
from conftest import ProxyLauncher, ProxyProcess
from fake_upstream import FakeUpstream

from e2e.hostile_sink import RawSink
from e2e.rawhttp import (
    Answer,
    Secrets,
    credential_headers,
    error_shape_ok,
    parse_answers,
    parse_one,
    read_all,
    send_raw,
    worker_pids,
)

pytestmark = pytest.mark.e2e

MODEL = "fake-model-1"
MAX_BODY = 8192
INSPECT_MAX = 1024
READ_TIMEOUT = 3.0
DIALECTS = ("openai", "anthropic", "gemini")
# A call each provider's API answers, on the fake upstream and on the raw sinks.
ROUTES = {"openai": "/v1/chat/completions", "anthropic": "/v1/messages",
          "gemini": f"/v1beta/models/{MODEL}:generateContent"}
SINKS = {"openai": "sinkoa", "anthropic": "sinkan", "gemini": "sinkge"}
QUIET = {"openai": "quietoa", "anthropic": "quietan", "gemini": "quietge"}
USER_RE = re.compile(r"^[\w.@:+\-]{1,128}$")


@pytest.fixture(scope="module")
def sink() -> Iterator[RawSink]:
    server = RawSink()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def quiet_sink() -> Iterator[RawSink]:
    """A sink that reads requests and never answers: a provider still thinking."""
    server = RawSink(silent=True)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def hostile_proxy(proxy_launcher: ProxyLauncher, sink: RawSink,
                  quiet_sink: RawSink) -> ProxyProcess:
    """One worker (so "the same worker" is checkable), small body limits, a short read
    timeout, debug logs (the most talkative), and the raw sinks as extra providers."""
    providers = {}
    for dialect in DIALECTS:
        providers[SINKS[dialect]] = {"base_url": sink.url, "dialect": dialect}
        providers[QUIET[dialect]] = {"base_url": quiet_sink.url, "dialect": dialect}
    return proxy_launcher(config={
        "server": {"max_body_bytes": MAX_BODY, "inspect_max_bytes": INSPECT_MAX},
        "upstream": {"read_timeout": READ_TIMEOUT, "connect_timeout": 2},
        "providers": providers,
    }, workers=1, env={"LOG_LEVEL": "debug", "GUNICORN_LOG_LEVEL": "debug"})


@pytest.fixture(scope="module")
def secrets() -> Secrets:
    return Secrets()


@dataclass
class Harness:
    proxy: ProxyProcess
    fake: FakeUpstream
    sink: RawSink
    quiet: RawSink
    secrets: Secrets
    workers: list[int] | None
    log_start: int = 0  # the log before this test is other tests' business
    answers: list[bytes] = field(default_factory=list, repr=False)

    @property
    def port(self) -> int:
        return self.proxy.port

    def key(self, dialect: str = "plain") -> str:
        return self.secrets.new(dialect if dialect in DIALECTS else "plain")

    def request(self, method: str, target: str, *, dialect: str = "openai", headers: str = "",
                body: bytes = b"", length: bool = True, close: bool = True,
                version: str = "HTTP/1.1", rid: str | None = None) -> tuple[bytes, str]:
        """A raw request carrying a fresh key where ``dialect``'s SDK puts it."""
        rid = rid or "hostile-" + uuid.uuid4().hex
        head = (f"{method} {target} {version}\r\nHost: 127.0.0.1:{self.port}\r\n"
                f"X-Request-ID: {rid}\r\n" + credential_headers(dialect, self.key(dialect))
                + headers)
        if length:
            head += f"Content-Length: {len(body)}\r\n"
        if close:
            head += "Connection: close\r\n"
        return head.encode("latin-1") + b"\r\n" + body, rid

    def send(self, data: bytes, **kwargs: float | bool) -> bytes:
        answer = send_raw(self.port, data, **kwargs)  # type: ignore[arg-type]
        self.keep(answer)
        return answer

    def keep(self, answer: bytes) -> None:
        """Every answer is checked for keys and internal addresses."""
        self.answers.append(answer)
        assert not self.secrets.found_in(answer), "an API key came back in a response"
        assert self.fake.address.encode() not in answer
        assert self.sink.url.split("//")[1].encode() not in answer

    def still_serving(self) -> None:
        """The same worker answers a normal call correctly; no key in the log."""
        self.fake.reset()  # end any scripted delay of the test
        assert self.proxy.alive(), "the proxy process died"
        resp = requests.post(f"{self.proxy.url}/openai/v1/chat/completions", timeout=10,
                             json={"model": MODEL, "messages": [{"role": "user",
                                                                  "content": "hi"}]},
                             headers={"Authorization": f"Bearer {self.key('openai')}"})
        assert resp.status_code == 200, resp.text[:300]
        assert resp.json()["choices"][0]["message"]["content"] == self.fake.scenario.text
        assert self.fake.last.json()["messages"][0]["content"] == "hi"
        if self.workers is not None:
            assert worker_pids(_pid(self.proxy)) == self.workers, "a worker was restarted"
        log = self.proxy.log_text()[self.log_start:]
        leaked = self.secrets.found_in(log)
        assert not leaked, f"{len(leaked)} API key(s) in the proxy's log"
        assert "Traceback" not in log
        assert "WORKER TIMEOUT" not in log and "Worker exiting" not in log


def _pid(proxy: ProxyProcess) -> int:
    assert proxy.proc is not None
    return proxy.proc.pid


@pytest.fixture
def hp(hostile_proxy: ProxyProcess, fake_upstream: FakeUpstream, sink: RawSink,
       quiet_sink: RawSink, secrets: Secrets) -> Iterator[Harness]:
    sink.reset()
    quiet_sink.reset()
    harness = Harness(hostile_proxy, fake_upstream, sink, quiet_sink, secrets,
                      worker_pids(_pid(hostile_proxy)), len(hostile_proxy.log_text()))
    assert harness.workers is None or len(harness.workers) == 1
    yield harness
    harness.still_serving()


def proxy_error(answer: Answer, dialect: str, status: int) -> None:
    """``answer`` is the proxy's own error: ``status``, JSON in ``dialect``'s shape."""
    assert answer.status == status, (answer.status, answer.body[:300])
    assert (answer.headers.get("content-type") or "").startswith("application/json"), \
        answer.headers.get("content-type")
    assert error_shape_ok(dialect, answer.json(), status), answer.body[:300]
    assert answer.headers.get("x-proxy-request-id")


def never_complete(sink: RawSink, wait: float = 1.0) -> None:
    """No connection the proxy opened to ``sink`` carried a whole request, and the proxy
    closed each one it gave up on (an open one leaves the provider waiting for the rest)."""
    deadline = time.monotonic() + wait
    for conn in list(sink.connections):
        assert not conn.complete.is_set(), \
            f"the upstream received a complete request: {conn.framing!r}"
        assert conn.closed.wait(max(deadline - time.monotonic(), 0.01)), \
            "the proxy left a half-sent request open"
        assert not conn.complete.is_set(), \
            f"the upstream received a complete request: {conn.framing!r}"


def fingerprint(key: str) -> str:
    return "fp_" + hashlib.sha256(key.encode()).hexdigest()[:16]


# -- bodies that are not what the API expects ------------------------------------------------

BAD_BODIES = {
    "malformed": b'{"model": [',
    "invalid utf-8": b'{"model": "\xff\xfe\xc3\x28", "messages": []}',
    "list": b'[{"model": "x"}]',
    "string": b'"hello"',
    "number": b"42",
    "null": b"null",
    "empty object": b"{}",
    "model is a number": b'{"model": 5, "messages": []}',
    "model is an object": b'{"model": {"$ne": null}, "messages": []}',
    "stream is yes": b'{"model": "m", "stream": "yes", "messages": []}',
    "stream is an object": b'{"model": "m", "stream": {"a": 1}, "messages": []}',
    "messages is a string": b'{"model": "m", "messages": "x"}',
    "max_tokens NaN": b'{"model": "m", "max_tokens": NaN, "messages": []}',
    "max_tokens huge": b'{"model": "m", "max_tokens": 1' + b"0" * 400 + b"}",
    "metadata user is a list": b'{"model": "m", "metadata": {"user_id": [1]}, "user": {}}',
    "nested 400 deep": b"[" * 400 + b"]" * 400,
    "duplicate keys": b'{"model": "a", "model": "b", "stream": false, "stream": true}',
    "lone surrogate": b'{"model": "\\ud800", "messages": []}',
}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_bad_json_bodies_are_forwarded_verbatim(hp: Harness, dialect: str) -> None:
    """The proxy inspects bodies but never judges them: the provider answers, byte-exact."""
    for name, body in BAD_BODIES.items():
        hp.fake.reset()
        data, rid = hp.request("POST", f"/{dialect}{ROUTES[dialect]}", dialect=dialect,
                               headers="Content-Type: application/json\r\n", body=body)
        answer = parse_one(hp.send(data), "POST")
        assert answer.status in (200, 400), (name, answer.status, answer.body[:200])
        assert hp.fake.last.body == body, name
        assert b"<html" not in answer.body.lower(), name
        record = hp.proxy.wait_record(rid)
        assert record["status"] == answer.status, name
        assert record["model"] is None or isinstance(record["model"], str), name
        assert isinstance(record["streaming"], bool), name


def test_deeply_nested_json_is_inspected_safely(proxy: ProxyProcess,
                                               fake_upstream: FakeUpstream) -> None:
    """100 000 levels of nesting within the inspection limit: forwarded, nothing crashes."""
    workers = worker_pids(_pid(proxy))
    bodies = {
        "/openai/v1/files": b"[" * 100_000 + b"]" * 100_000,
        "/anthropic/v1/uploads": b'{"a":' * 100_000 + b"1" + b"}" * 100_000,
        "/gemini/upload/v1beta/files": b'{"contents": ' + b"[" * 100_000 + b"]" * 100_000
        + b"}",
    }
    for path, body in bodies.items():
        resp = requests.post(proxy.url + path, data=body, timeout=10,
                             headers={"Content-Type": "application/json"})
        assert resp.status_code == 200, (path, resp.text[:200])
        assert resp.json()["sha256"] == hashlib.sha256(body).hexdigest(), path
    assert worker_pids(_pid(proxy)) == workers
    log = proxy.log_text()
    assert "RecursionError" not in log and "Traceback" not in log


# -- bodies over the limit -------------------------------------------------------------------

@pytest.mark.parametrize("dialect", DIALECTS)
def test_body_over_limit_by_content_length_is_413(hp: Harness, dialect: str) -> None:
    body = b'{"model": "m", "messages": [{"role": "user", "content": "' \
        + b"x" * (2 * MAX_BODY) + b'"}]}'
    # Gemini reads ?key= too: one credential there, not a second one in a header (a 400).
    data, rid = hp.request("POST", f"/{dialect}{ROUTES[dialect]}?key={hp.key()}",
                           dialect="none" if dialect == "gemini" else dialect, body=body)
    proxy_error(parse_one(hp.send(data), "POST"), dialect, 413)
    assert hp.fake.requests == []
    assert hp.proxy.wait_record(rid)["status"] == 413


def test_body_over_limit_record_names_the_reason(hp: Harness) -> None:
    """The 413 decided from Content-Length is recorded like the one counted while streaming."""
    data, rid = hp.request("POST", "/openai" + ROUTES["openai"], body=b"x" * (MAX_BODY + 1))
    assert parse_one(hp.send(data), "POST").status == 413
    record = hp.proxy.wait_record(rid)
    assert record["error_kind"] == "too_large", record


def test_big_body_over_limit_reaches_a_real_client_as_413(hp: Harness) -> None:
    """A 4 MiB upload over the limit: the client gets the 413, not a broken pipe."""
    resp = requests.post(f"{hp.proxy.url}/openai/v1/files", data=b"z" * (4 << 20), timeout=10,
                         headers={"Authorization": f"Bearer {hp.key('openai')}"})
    hp.keep(resp.content)
    assert resp.status_code == 413
    assert error_shape_ok("openai", resp.json(), 413)
    assert hp.fake.requests == []


@pytest.mark.parametrize("dialect", DIALECTS)
def test_chunked_body_over_limit_is_413_and_never_sent_whole(hp: Harness, dialect: str) -> None:
    piece = b"y" * 1024
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(3 * MAX_BODY // 1024))
    data, rid = hp.request("POST", f"/{SINKS[dialect]}{ROUTES[dialect]}", dialect=dialect,
                           headers="Transfer-Encoding: chunked\r\n", length=False,
                           body=chunks + b"0\r\n\r\n")
    proxy_error(parse_one(hp.send(data), "POST"), dialect, 413)
    never_complete(hp.sink)
    assert hp.proxy.wait_record(rid)["error_kind"] == "too_large"


# -- broken framing ----------------------------------------------------------------------------

BAD_CHUNKING = {
    "size not hex": b"zz\r\nabc\r\n0\r\n\r\n",
    "chunk shorter than its size": b"10\r\nabc\r\n0\r\n\r\n",
    "no last chunk": b"3\r\nabc\r\n",
    "negative size": b"-3\r\nabc\r\n0\r\n\r\n",
    "size overflows": b"ffffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
    "data runs past its size": b"3\r\nabcXX4\r\nabcd\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(BAD_CHUNKING))
def test_invalid_chunked_body_is_400(hp: Harness, case: str) -> None:
    data, _ = hp.request("POST", "/sinkan/v1/messages", dialect="anthropic",
                         headers="Transfer-Encoding: chunked\r\n", length=False,
                         body=BAD_CHUNKING[case])
    proxy_error(parse_one(hp.send(data), "POST"), "anthropic", 400)
    never_complete(hp.sink)


FRAMING_CONFLICTS = {
    "Content-Length and chunked": ("Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                                   b"3\r\nabc\r\n0\r\n\r\n", "HTTP/1.1"),
    "two Content-Lengths": ("Content-Length: 3\r\nContent-Length: 5\r\n", b"abcde", "HTTP/1.1"),
    "negative Content-Length": ("Content-Length: -1\r\n", b"abc", "HTTP/1.1"),
    "signed Content-Length": ("Content-Length: +3\r\n", b"abc", "HTTP/1.1"),
    "Transfer-Encoding identity": ("Transfer-Encoding: identity\r\n", b"abc", "HTTP/1.1"),
    "chunked twice": ("Transfer-Encoding: chunked, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n",
                      "HTTP/1.1"),
    "chunked on HTTP/1.0": ("Transfer-Encoding: chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n",
                            "HTTP/1.0"),
    "unknown transfer coding": ("Transfer-Encoding: br, chunked\r\n", b"3\r\nabc\r\n0\r\n\r\n",
                                "HTTP/1.1"),
}


@pytest.mark.parametrize("case", list(FRAMING_CONFLICTS))
def test_conflicting_framing_is_refused_before_the_app(hp: Harness, case: str) -> None:
    """Request-smuggling shapes: gunicorn answers 400/501 itself; nothing goes anywhere."""
    headers, body, version = FRAMING_CONFLICTS[case]
    data, _ = hp.request("POST", "/sinkoa/v1/chat/completions", headers=headers, body=body,
                         length=False, version=version)
    answer = parse_one(hp.send(data), "POST")
    assert answer.status in (400, 501), (answer.status, answer.body[:200])
    assert hp.sink.connections == [] and hp.fake.requests == []


@pytest.mark.parametrize("codings", ["gzip, chunked", "deflate,chunked", "gzip\r\n"
                                     "Transfer-Encoding: chunked"])
def test_transfer_coding_besides_chunked_is_refused_not_dropped(hp: Harness,
                                                               codings: str) -> None:
    """gunicorn accepts ``gzip, chunked`` and de-chunks it; the body is still gzip-coded.

    The proxy must not forward it as an empty body (what it does when it only recognises
    the exact value ``chunked``): refuse it (RFC 9112 6.1: 501) in the provider's shape.
    """
    data, _ = hp.request("POST", "/sinkoa/v1/chat/completions", length=False,
                         headers=f"Transfer-Encoding: {codings}\r\n",
                         body=b"5\r\nhello\r\n0\r\n\r\n")
    answer = parse_one(hp.send(data), "POST")
    assert answer.status in (400, 501), (answer.status, answer.body[:200])
    assert error_shape_ok("openai", answer.json(), answer.status)
    never_complete(hp.sink)


# -- clients that send less than they announced ------------------------------------------------

def _send_then_leave(port: int, data: bytes, half_close: bool) -> tuple[bytes, float]:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=READ_TIMEOUT + 3) as sock:
        sock.sendall(data)
        if not half_close:
            return b"", 0.0
        # Let the proxy start on the partial body before the end of input arrives.
        time.sleep(0.2)  # no event to await: the proxy is another process reading a socket
        sock.shutdown(socket.SHUT_WR)
        return read_all(sock), time.monotonic() - started


@pytest.mark.parametrize("declared,sent", [(500, 12), (5000, 2000)],
                         ids=["inspected body", "streamed body"])
def test_truncated_body_is_not_forwarded_as_complete(hp: Harness, declared: int,
                                                     sent: int) -> None:
    """Content-Length says more than arrives, then the client half-closes.

    What the proxy does today: the inspected body (under inspect_max_bytes) goes upstream as
    a complete request with the shorter Content-Length — a truncated upload the provider
    accepts; the streamed body goes out with the full Content-Length and the proxy then
    waits read_timeout for an answer the provider will never give, and reports a 504
    upstream timeout (counted against the provider's health).
    """
    data, rid = hp.request("POST", "/sinkoa/v1/files", body=b"", length=False, close=True,
                           headers=f"Content-Length: {declared}\r\n"
                                   "Content-Type: application/octet-stream\r\n")
    answer_bytes, elapsed = _send_then_leave(hp.port, data + b"q" * sent, half_close=True)
    hp.keep(answer_bytes)
    never_complete(hp.sink)
    if answer_bytes:
        proxy_error(parse_one(answer_bytes, "POST"), "openai", 400)
    assert elapsed < READ_TIMEOUT, "the proxy waited for the provider instead of the client"
    record = hp.proxy.wait_record(rid, timeout=READ_TIMEOUT + 3)
    assert record["outcome"] != "upstream_error" and record["status"] != 504, record


@pytest.mark.parametrize("declared", [100, 5000], ids=["inspected body", "streamed body"])
def test_client_gone_before_body_is_not_forwarded(hp: Harness, declared: int) -> None:
    """Headers announce a body, then the connection closes before a byte of it.

    Today the inspected case reaches the upstream as a complete POST with an empty body and
    is recorded as a 200 ``completed`` call.
    """
    data, rid = hp.request("POST", "/sinkoa/v1/chat/completions", length=False, close=False,
                           headers=f"Content-Length: {declared}\r\n")
    _send_then_leave(hp.port, data, half_close=False)
    record = hp.proxy.wait_record(rid, timeout=READ_TIMEOUT + 3)
    never_complete(hp.sink)
    assert record["outcome"] == "client_aborted", record


def test_slow_client_body_byte_by_byte(hp: Harness) -> None:
    """A body dribbled one byte at a time for ~2 s arrives whole; the worker serves others
    meanwhile."""
    body = b'{"model": "m", "messages": [{"role": "user", "content": "slowly now"}]}'
    data, rid = hp.request("POST", "/openai" + ROUTES["openai"], length=False,
                           headers=f"Content-Length: {len(body)}\r\n")
    with socket.create_connection(("127.0.0.1", hp.port), timeout=10) as sock:
        sock.sendall(data)
        for i in range(len(body)):
            sock.sendall(body[i:i + 1])
            time.sleep(0.025)  # the pacing is the test: a slow client, not synchronisation
            if i == len(body) // 2:
                started = time.monotonic()
                other = requests.get(f"{hp.proxy.url}/openai/v1/models", timeout=5)
                assert other.status_code == 200
                assert time.monotonic() - started < 0.5, "the slow client blocked the worker"
        answer = parse_one(read_all(sock), "POST")
    assert answer.status == 200
    assert answer.json()["choices"][0]["message"]["content"] == hp.fake.scenario.text
    assert hp.fake.last.body == body
    assert hp.proxy.wait_record(rid)["status"] == 200


# -- headers ---------------------------------------------------------------------------------

BAD_HEADERS = {
    "one 20 KB header": (f"X-Big: {'a' * 20000}\r\n", (431, 400)),
    "a 20 KB Authorization": ("Authorization: Bearer " + "k" * 20000 + "\r\n", (431, 400)),
    "250 headers": ("".join(f"X-H{i}: v\r\n" for i in range(250)), (431, 400)),
    "CR inside a value": ("X-A: b\rInjected: 1\r\n", (400,)),
    "NUL inside a value": ("X-A: b\x00c\r\n", (400,)),
    "obsolete line folding": ("X-A: b\r\n Injected: 1\r\n", (400,)),
    "non-ASCII name": ("X-\xe9: 1\r\n", (400,)),
    "space in name": ("Bad Name: 1\r\n", (400,)),
    "space before colon": ("X-A : 1\r\n", (400,)),
    "second Host": ("Host: evil.example\r\n", (400,)),
}


@pytest.mark.parametrize("case", list(BAD_HEADERS))
def test_malformed_or_huge_headers_are_refused(hp: Harness, case: str) -> None:
    extra, statuses = BAD_HEADERS[case]
    data, _ = hp.request("GET", f"/gemini/v1beta/models?key={hp.key('gemini')}",
                         dialect="gemini", headers=extra)
    answer = parse_one(hp.send(data))
    assert answer.status in statuses, (answer.status, answer.body[:200])
    assert hp.fake.requests == []


def test_bare_lf_line_endings_are_refused(hp: Harness) -> None:
    key = hp.key("openai")
    answer = parse_one(hp.send(f"GET /openai/v1/models HTTP/1.1\nHost: x\nAuthorization: "
                               f"Bearer {key}\nConnection: close\n\n".encode()))
    assert answer.status == 400
    assert hp.fake.requests == []


def test_non_ascii_header_values_pass_through_unchanged(hp: Harness) -> None:
    values = {"X-Latin": "caf\xe9".encode("latin-1"), "X-Utf8": "café ✓".encode(),
              "X-User-ID": "ünï".encode()}
    head = b"".join(name.encode() + b": " + value + b"\r\n" for name, value in values.items())
    data, rid = hp.request("GET", "/anthropic/v1/models", dialect="anthropic")
    data = data.replace(b"\r\n\r\n", b"\r\n" + head + b"\r\n", 1)
    assert parse_one(hp.send(data)).status == 200
    for name, value in values.items():
        assert (hp.fake.last.header(name) or "").encode("latin-1") == value, name
    assert hp.proxy.wait_record(rid)["status"] == 200


def test_non_ascii_credentials_are_forwarded_and_never_logged(hp: Harness) -> None:
    key = hp.key() + "é✓"
    data, rid = hp.request("GET", "/gemini/v1beta/models", dialect="gemini")
    data = data.replace(b"\r\n\r\n", b"\r\nx-api-key: " + key.encode() + b"\r\n\r\n", 1)
    assert parse_one(hp.send(data)).status == 200
    assert hp.proxy.wait_record(rid)["key_fingerprint"].startswith("fp_")


@pytest.mark.parametrize("name,dialect", [("Authorization", "openai"),
                                          ("x-api-key", "anthropic"),
                                          ("x-goog-api-key", "gemini")])
def test_duplicate_credentials_are_accounted_as_forwarded(hp: Harness, name: str,
                                                          dialect: str) -> None:
    """Two credential headers: whatever the upstream authenticates is what gets the
    fingerprint (limits and records must follow the credential actually used)."""
    first, second = hp.key(dialect), hp.key(dialect)
    prefix = "Bearer " if name == "Authorization" else ""
    rid = "hostile-" + uuid.uuid4().hex
    data = (f"GET /{dialect}/v1beta/models HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n"
            f"{name}: {prefix}{first}\r\n{name}: {prefix}{second}\r\n"
            "Connection: close\r\n\r\n").encode()
    answer = parse_one(hp.send(data))
    record = hp.proxy.wait_record(rid)
    if answer.status == 400 and not hp.fake.requests:
        proxy_error(answer, dialect, 400)  # refusing ambiguous credentials is fine too
        return
    assert answer.status == 200
    sent = hp.fake.last.header(name) or ""
    assert sent.startswith(prefix)
    assert record["key_fingerprint"] == fingerprint(sent[len(prefix):].strip())


def test_no_headers_added_upstream(hp: Harness) -> None:
    """A bare client (no User-Agent, no Accept-Encoding): the provider sees none either —
    the README promises no default User-Agent or Accept-Encoding from the HTTP client."""
    data = (f"GET /openai/v1/models HTTP/1.1\r\nHost: 127.0.0.1:{hp.port}\r\n"
            f"Authorization: Bearer {hp.key('openai')}\r\nConnection: close\r\n\r\n").encode()
    assert parse_one(hp.send(data)).status == 200
    names = hp.fake.last.header_names()
    assert "user-agent" not in names, hp.fake.last.headers
    assert "accept-encoding" not in names, hp.fake.last.headers


# -- HTTP versions and connection reuse ------------------------------------------------------

def test_http10_request_without_host(hp: Harness) -> None:
    started = time.monotonic()
    out = send_raw(hp.port, b"GET /openai/v1/models HTTP/1.0\r\n\r\n", half_close=False,
                   timeout=4)
    hp.keep(out)
    answer = parse_one(out)
    assert (answer.status, answer.version) == (200, 10)
    assert answer.json()["data"][0]["id"] == MODEL
    assert time.monotonic() - started < 2, "HTTP/1.0 without keep-alive: the server must close"


def test_http10_stream_is_close_delimited(hp: Harness) -> None:
    body = b'{"model": "m", "stream": true, "messages": []}'
    data, rid = hp.request("POST", "/openai" + ROUTES["openai"], body=body, close=False,
                           version="HTTP/1.0")
    out = hp.send(data, half_close=False, timeout=4)
    answer = parse_one(out, "POST")
    assert answer.status == 200
    assert b"Transfer-Encoding: chunked" not in out.split(b"\r\n\r\n", 1)[0]
    assert answer.body.endswith(b"data: [DONE]\n\n")
    assert hp.proxy.wait_record(rid)["outcome"] == "completed"


def test_pipelined_requests_are_answered_in_order(hp: Harness) -> None:
    chat = b'{"model": "m", "messages": [{"role": "user", "content": "second"}]}'
    msg = b'{"model": "m", "max_tokens": 5, "stream": true, "messages": []}'
    first, _ = hp.request("GET", "/openai/v1/models?n=1", close=False)
    second, _ = hp.request("POST", "/openai" + ROUTES["openai"], body=chat, close=False)
    third, _ = hp.request("POST", "/anthropic/v1/messages", dialect="anthropic", body=msg,
                          close=False)
    fourth, _ = hp.request("GET", "/openai/v1/models?n=4")
    answers = parse_answers(hp.send(first + second + third + fourth),
                            ["GET", "POST", "POST", "GET"])
    assert [a.status for a in answers] == [200, 200, 200, 200]
    assert answers[1].json()["choices"][0]["message"]["content"] == hp.fake.scenario.text
    assert answers[2].body.rstrip().endswith(b'data: {"type": "message_stop"}')
    assert [r.target for r in hp.fake.requests] == [
        "/v1/models?n=1", "/v1/chat/completions", "/v1/messages", "/v1/models?n=4"]
    assert hp.fake.requests[1].body == chat


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
def test_refused_body_cannot_smuggle_a_request(hp: Harness, framing: str) -> None:
    """The body of a refused (413) request holds a request line; the next pipelined request
    must be the only other one that runs."""
    smuggled = b"GET /openai/v1/models?smuggled=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    body = smuggled * (MAX_BODY // len(smuggled) + 50)
    if framing == "chunked":
        first, _ = hp.request("POST", "/openai/v1/files", length=False, close=False,
                              headers="Transfer-Encoding: chunked\r\n",
                              body=b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))
    else:
        first, _ = hp.request("POST", "/openai/v1/files", close=False, body=body)
    second, _ = hp.request("GET", "/openai/v1/models?second=1")
    answers = parse_answers(hp.send(first + second), ["POST", "GET"])
    assert [a.status for a in answers] == [413, 200]
    targets = [r.target for r in hp.fake.requests]
    assert not any("smuggled" in t for t in targets), targets
    assert targets[-1] == "/v1/models?second=1"


# -- request targets and methods -------------------------------------------------------------

@pytest.mark.parametrize("line,statuses", [
    ("OPTIONS * HTTP/1.1", (200, 204, 400, 404, 405)),
    ("CONNECT api.openai.com:443 HTTP/1.1", (400, 404, 405)),
    ("CONNECT /openai/v1/models HTTP/1.1", (400, 404, 405)),
    ("TRACE /openai/v1/models HTTP/1.1", (405,)),
    ("TRACE /anthropic/v1/messages HTTP/1.1", (405,)),
    ("FOO /gemini/v1beta/models HTTP/1.1", (405,)),
    ("PROPFIND /openai/v1/models HTTP/1.1", (405,)),
    ("get /openai/v1/models HTTP/1.1", (400,)),
    ("GET * HTTP/1.1", (400, 404)),
    ("GET http://evil.example HTTP/1.1", (400, 404)),
    ("GET /openai/v1/models HTTP/2.0", (400, 505)),
    ("PRI * HTTP/2.0", (400, 505)),
])
def test_odd_methods_and_targets_are_never_forwarded(hp: Harness, line: str,
                                                     statuses: tuple[int, ...]) -> None:
    key = hp.key("openai")
    data = (f"{line}\r\nHost: 127.0.0.1:{hp.port}\r\nAuthorization: Bearer {key}\r\n"
            "Connection: close\r\n\r\n").encode()
    out = hp.send(data)
    answer = parse_one(out, line.split()[0].upper())
    assert answer.status in statuses, (answer.status, answer.body[:200])
    assert hp.fake.requests == []
    if line.split()[0] in ("TRACE", "FOO", "PROPFIND", "OPTIONS", "CONNECT") \
            and answer.status >= 400:
        dialect = next((d for d in DIALECTS if f"/{d}/" in line), "openai")
        proxy_error(answer, dialect, answer.status)


def test_absolute_form_target_uses_only_its_path(hp: Harness) -> None:
    key = hp.key("gemini")
    data, rid = hp.request("GET", f"http://evil.example/gemini/v1beta/models?key={key}",
                           dialect="none")  # the key in the query only: one credential
    assert parse_one(hp.send(data)).status == 200
    assert hp.fake.last.target == f"/v1beta/models?key={key}"
    assert "REDACTED" in hp.proxy.wait_record(rid)["path"]


@pytest.mark.parametrize("target", [
    "/openai/v1/models%00", "/openai/v1/%00/models", "/openai/v1/models%0d%0aX-Inj:%201",
    "/anthropic/v1/%c0%ae%c0%ae/%c0%ae%c0%ae/x", "/anthropic/v1/%e0%80%ae%e0%80%ae/x",
    "/gemini/v1beta/models/%ff%fe:generateContent", "/gemini/v1beta/%u002e%u002e/x",
    "/openai/v1/models/%zz", "/openai/v1/models#fragment",
])
def test_odd_paths_stay_under_the_base(hp: Harness, target: str) -> None:
    dialect = target.split("/")[1]
    data, _ = hp.request("GET", target, dialect=dialect)
    answer = parse_one(hp.send(data))
    if hp.fake.requests:
        path = hp.fake.last.path
        for candidate in (path, unquote(path), unquote(path, encoding="latin-1")):
            assert not posixpath.normpath(candidate).startswith(".."), path
            assert "\x00" not in candidate and "\r" not in candidate, path
        assert "injected" not in hp.fake.last.header_names() and \
            "x-inj" not in hp.fake.last.header_names()
    else:
        proxy_error(answer, dialect, 404)


@pytest.mark.parametrize("name", ["%6Bey", "ke%79", "%6b%65%79", "KEY", "api%5Fkey"])
def test_encoded_credential_query_names_are_redacted(hp: Harness, name: str) -> None:
    """Google decodes query names, so ``?%6Bey=<key>`` authenticates like ``?key=<key>``.

    Today only the literal spellings are redacted from the logged path and fingerprinted:
    an encoded name puts the key in the log and leaves the call without a fingerprint
    (per-key limits and records never see it).
    """
    key = hp.key()
    data, rid = hp.request("GET", f"/gemini/v1beta/models?alt=json&{name}={key}",
                           dialect="none")
    assert parse_one(hp.send(data)).status == 200
    assert hp.fake.last.query.get(unquote(name)) == [key]  # the provider sees the key
    record = hp.proxy.wait_record(rid)
    assert key not in record["path"], record["path"]
    if unquote(name) == "key":  # the one name Google reads (query names are case-sensitive)
        assert record["key_fingerprint"] == fingerprint(key)


def test_raw_unicode_in_the_request_line_is_refused(hp: Harness) -> None:
    data, _ = hp.request("GET", "/openai/v1/models/X", dialect="openai")
    data = data.replace(b"/models/X", "/models/ñ✓".encode(), 1)
    assert parse_one(hp.send(data)).status == 400
    assert hp.fake.requests == []


@pytest.mark.parametrize("user", [
    "a%0d%0aX-Inj:%201", "a%00b", "u" * 3000, "%2e%2e", "%C3%BC%E2%9C%93", "a%20b",
    "%3Cscript%3E", "a;b=c", "..%2F..%2F", "%25252e",
])
def test_meta_with_weird_user_ids(hp: Harness, user: str) -> None:
    data, rid = hp.request("GET", f"/meta/{user}/openai/v1/models")
    answer = parse_one(hp.send(data))
    record = hp.proxy.wait_record(rid)
    if answer.status == 200:
        assert hp.fake.last.target == "/v1/models"
        assert "x-inj" not in hp.fake.last.header_names()
    else:
        proxy_error(answer, "openai", answer.status)
        assert answer.status in (400, 404)
    assert record["user"] is None or USER_RE.match(record["user"]) \
        or record["user"] == "127.0.0.1", record["user"]


def test_meta_user_id_shaped_like_a_key_is_not_logged(hp: Harness) -> None:
    for shape in ("openai", "anthropic", "gemini"):
        key = hp.key(shape)
        data, rid = hp.request("GET", f"/meta/{key}/openai/v1/models")
        assert parse_one(hp.send(data)).status == 200
        hp.proxy.wait_record(rid)
    # still_serving() then checks that none of them is in the log


# -- the client goes away ------------------------------------------------------------------

STREAM_BODIES = {
    "openai": b'{"model": "m", "stream": true, "messages": []}',
    "anthropic": b'{"model": "m", "max_tokens": 5, "stream": true, "messages": []}',
    "gemini": b"{}",
}
STREAM_ROUTES = {"openai": ROUTES["openai"], "anthropic": ROUTES["anthropic"],
                 "gemini": f"/v1beta/models/{MODEL}:streamGenerateContent?alt=sse"}


@pytest.mark.parametrize("dialect", DIALECTS)
def test_client_gone_mid_stream_closes_the_upstream(hp: Harness, dialect: str) -> None:
    hp.fake.script(hp.fake.scripts.endless(dialect))
    data, rid = hp.request("POST", f"/{dialect}{STREAM_ROUTES[dialect]}", dialect=dialect,
                           body=STREAM_BODIES[dialect], close=False)
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(data)
        first = sock.recv(4096)
        assert first.startswith(b"HTTP/1.1 200"), first[:100]
        # RST instead of FIN: the harshest way to leave.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        left = time.monotonic()
    assert hp.fake.client_gone.wait(1.5), "the upstream stream was left running"
    assert (hp.fake.last.client_gone_at or 0) - left < 1.5
    assert hp.proxy.wait_record(rid)["outcome"] == "client_aborted"


@pytest.mark.parametrize("dialect,stream", [("openai", True), ("anthropic", True),
                                            ("gemini", True), ("openai", False)],
                         ids=["openai-stream", "anthropic-stream", "gemini-stream", "openai-whole"])
def test_client_gone_while_provider_thinks_closes_the_upstream(hp: Harness, dialect: str,
                                                              stream: bool) -> None:
    """The client resets the connection before the provider sent response headers (a slow
    model start, a long non-streamed generation).

    Today the proxy notices only when it writes: the upstream request runs on (and is
    billed) until the provider answers or read_timeout expires, and the record then says
    504 ``upstream_error``, blaming the provider for a client that left. A reset (RST) is
    unambiguous; a plain FIN could be a half-close by a client still waiting, so this test
    does not ask the proxy to act on one.
    """
    body = STREAM_BODIES[dialect] if stream else b'{"model": "m", "messages": []}'
    route = STREAM_ROUTES[dialect] if stream else ROUTES[dialect]
    data, rid = hp.request("POST", f"/{QUIET[dialect]}{route}", dialect=dialect, body=body,
                           close=False)
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(data)
        upstream = hp.quiet.wait_connection()
        assert upstream.complete.wait(2), "the request never reached the provider"
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    left = time.monotonic()
    assert upstream.closed.wait(1.5), "the upstream request outlived its client"
    assert time.monotonic() - left < 1.5
    record = hp.proxy.wait_record(rid, timeout=READ_TIMEOUT + 3)
    assert record["outcome"] == "client_aborted", record


def test_client_gone_right_after_sending(hp: Harness) -> None:
    """Request sent whole, connection reset before the answer: recorded exactly once."""
    data, rid = hp.request("POST", "/openai" + ROUTES["openai"],
                           body=b'{"model": "m", "messages": []}', close=False)
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(data)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    record = hp.proxy.wait_record(rid)  # exactly one record
    assert record["status"] in (200, 499), record
    assert len(hp.fake.requests) <= 1


def test_client_gone_mid_header(hp: Harness) -> None:
    with socket.create_connection(("127.0.0.1", hp.port), timeout=5) as sock:
        sock.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthoriz")
    assert hp.fake.requests == []


def test_many_abandoned_connections_do_not_starve_the_worker(hp: Harness) -> None:
    """100 connections that send half a request line and wait: normal calls still pass."""
    idle: list[socket.socket] = []
    try:
        for _ in range(100):
            sock = socket.create_connection(("127.0.0.1", hp.port), timeout=5)
            sock.sendall(b"GET /openai/v1/mod")
            idle.append(sock)
        results: list[int] = []

        def call() -> None:
            results.append(requests.get(f"{hp.proxy.url}/openai/v1/models",
                                        timeout=5).status_code)

        threads = [threading.Thread(target=call) for _ in range(5)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(6)
        assert results == [200] * 5
    finally:
        for sock in idle:
            sock.close()


# -- what gunicorn answers itself ------------------------------------------------------------

@pytest.mark.parametrize("case", ["raw unicode in target", "NUL in target",
                                  "space in target", "bad version"])
def test_gunicorn_error_pages_do_not_echo_keys(hp: Harness, case: str) -> None:
    """gunicorn's 400 page quotes the invalid request line — ``?key=`` included."""
    key = hp.key("gemini")
    target = f"/gemini/v1beta/models?key={key}"
    line = {"raw unicode in target": f"GET /gemini/v1beta/models/ñ?key={key} HTTP/1.1",
            "NUL in target": f"GET {target}\x00 HTTP/1.1",
            "space in target": f"GET {target} x HTTP/1.1",
            "bad version": f"GET {target} HTTP/1.1 junk"}[case]
    out = send_raw(hp.port, line.encode() + b"\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400")
    assert key not in out.decode("utf-8", "replace"), "the key was echoed in the error page"
    hp.keep(out)


# -- a proxy that limits and records: work, identity and users under hostile input -----------

GUARD_KEY_LIMIT = 3  # requests a minute per API key on the guarded proxy
CUT = 256  # README "Security": client-chosen strings are cut to this in records and labels
LINE_MAX = 4096  # a whole record (~30 fields, seven of them up to CUT) stays under this
# /health while the flood arrives: its median must stay under HEALTH_P50 and no answer may
# take HEALTH_MAX (seconds). Idle, a 2 MB body costs the worker ~20 ms of CPU (JSON parse,
# hashing the model scope); the machine is shared, so the bounds are generous on purpose.
HEALTH_P50 = 0.1
HEALTH_MAX = 1.0


@dataclass
class Guarded:
    proxy: ProxyProcess
    records: Path  # the usage-record file

    def usage_lines_of(self, rid: str, timeout: float = 5.0) -> list[str]:
        """The usage-record lines of ``rid`` (written by the worker's writer thread)."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.records.read_text() if self.records.exists() else ""
            found = [line for line in text.splitlines() if rid in line]
            if found or time.monotonic() > deadline:
                return found
            time.sleep(0.02)  # the file is written by another process: poll it


@pytest.fixture(scope="module")
def guarded(proxy_launcher: ProxyLauncher,
            tmp_path_factory: pytest.TempPathFactory) -> Guarded:
    """One worker (so "the same worker" holds), the memory rate limiter with a per-key
    limit, usage records on, and only the key or the client address may name the user."""
    records = tmp_path_factory.mktemp("records") / "usage.jsonl"
    proxy = proxy_launcher(config={
        "server": {"user_sources": ["key", "ip"]},
        "usage_records": {"enabled": True, "path": str(records)},
        "features": {"rate_limiting": {
            "enabled": True, "backend": "memory",
            "scope_limits": {"key": {"requests_per_minute": GUARD_KEY_LIMIT}}}},
    }, workers=1)
    return Guarded(proxy, records)


def _raw(port: int, method: str, target: str, headers: str = "", body: bytes = b"",
         timeout: float = 10.0) -> tuple[Answer, str]:
    """One raw request (headers exactly as given, CRLF-terminated) on its own connection."""
    rid = "guard-" + uuid.uuid4().hex
    head = (f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Request-ID: {rid}\r\n"
            f"{headers}Content-Length: {len(body)}\r\nConnection: close\r\n\r\n")
    out = send_raw(port, head.encode("latin-1") + body, timeout=timeout)
    return parse_one(out, method), rid


def _log_line_of(proxy: ProxyProcess, rid: str) -> str:
    lines = [line for line in proxy.log_lines() if rid in line and '"outcome"' in line]
    assert len(lines) == 1, f"expected one access record line for {rid}, got {len(lines)}"
    return lines[0]


class _HealthPoller(threading.Thread):
    """GET /health back to back on its own connection, timing each answer."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.times: list[float] = []
        self.failures: list[str] = []
        self.done = threading.Event()

    def run(self) -> None:
        with requests.Session() as session:
            while not self.done.is_set():
                started = time.monotonic()
                try:
                    status = session.get(self.url + "/health", timeout=5).status_code
                except requests.RequestException as exc:
                    self.failures.append(type(exc).__name__)
                    continue
                self.times.append(time.monotonic() - started)
                if status != 200:
                    self.failures.append(str(status))
                self.done.wait(0.01)  # pacing between polls, not synchronisation

    def stop(self) -> list[float]:
        self.done.set()
        self.join(10)
        return sorted(self.times)


def test_huge_client_strings_cost_little_and_are_cut(guarded: Guarded,
                                                     fake_upstream: FakeUpstream,
                                                     secrets: Secrets) -> None:
    """Model names made of snapshot suffixes ("x-001-001..."), 16 KB to 2 MB, sent without a
    key (forwarded; the answer names no model) and with a key over its limit (denied), plus
    huge user ids and a huge Gemini path model: /health on the same worker keeps answering
    fast meanwhile, the worker is never restarted, and no record, log line or metric label
    grows with the input."""
    proxy = guarded.proxy
    workers = worker_pids(_pid(proxy))
    key = secrets.new("openai")
    auth = f"Authorization: Bearer {key}\r\n"
    chat = b'{"model": "' + MODEL.encode() + b'", "messages": []}'
    for _ in range(GUARD_KEY_LIMIT):  # use up the key's minute: its next calls are denied
        assert _raw(proxy.port, "POST", "/openai/v1/chat/completions", auth, chat)[0].status \
            == 200
    cases: list[tuple[str, str, bytes, int]] = []  # target, headers, body, expected status
    for repeats in (4_000, 16_000, 500_000):  # model names of 16 KB, 64 KB and 2 MB
        body = json.dumps({"model": "x" + "-001" * repeats, "messages": []}).encode()
        cases.append(("/openai/v1/files", "", body, 200))
        cases.append(("/openai/v1/chat/completions", auth, body, 429))
    cases += [
        ("/openai/v1/files", f"X-User-ID: {'u' * 8000}\r\n", b"{}", 200),
        (f"/openai/v1/files?llm_user_id={'u' * 3000}", "", b"{}", 200),
        (f"/meta/{'u' * 3000}/openai/v1/files", "", b"{}", 200),
        # the provider does not know the model: its 404 names none, the path's is priced
        (f"/gemini/v1beta/models/x{'-001' * 900}:embedContent", "", b"{}", 404),
        ("/openai/v1/files", "", json.dumps({"user": "u" * 1_000_000}).encode(), 200),
    ]
    poller = _HealthPoller(proxy.url)
    poller.start()
    sent: list[str] = []
    try:
        # The flood is quick when the work is bounded: send it again until /health has been
        # sampled often enough during it (a bounded number of rounds).
        for _ in range(5):
            for target, headers, body, expected in cases:
                answer, rid = _raw(proxy.port, "POST", target, headers, body, timeout=30)
                assert answer.status == expected, (target[:60], answer.status,
                                                   answer.body[:200])
                sent.append(rid)
            if len(poller.times) >= 10:
                break
    finally:
        times = poller.stop()
    assert not poller.failures, poller.failures
    assert len(times) >= 10, f"only {len(times)} /health answers"
    p50 = times[len(times) // 2]
    print(f"/health during the flood: p50 {p50 * 1000:.1f} ms, max {times[-1] * 1000:.1f} ms "
          f"over {len(times)} polls")
    assert p50 < HEALTH_P50 and times[-1] < HEALTH_MAX, \
        f"/health p50 {p50:.4f} s, max {times[-1]:.4f} s over {len(times)} polls"
    assert worker_pids(_pid(proxy)) == workers, "the worker was restarted"
    for rid in sent:
        record = proxy.wait_record(rid)
        for name, value in record.items():
            assert not isinstance(value, str) or len(value) <= CUT, (name, len(value))
        assert len(_log_line_of(proxy, rid)) < LINE_MAX
        usage = guarded.usage_lines_of(rid)
        assert len(usage) == 1 and len(usage[0]) < LINE_MAX, [len(u) for u in usage]
    metrics = requests.get(proxy.url + "/metrics", timeout=5).text
    assert max(len(line) for line in metrics.splitlines()) < 2 * CUT
    log = proxy.log_text()
    assert "Traceback" not in log and "WORKER TIMEOUT" not in log
    assert not secrets.found_in(log)


def _anthropic_call(real: str, junk: str) -> tuple[str, str, bytes]:
    return ("/anthropic/v1/messages",
            f"x-api-key: {real}\r\nanthropic-version: 2023-06-01\r\n"
            f"Authorization: Bearer {junk}\r\nConnection: authorization\r\n",
            b'{"model": "' + MODEL.encode() + b'", "max_tokens": 5, "messages": []}')


def _gemini_call(real: str, junk: str) -> tuple[str, str, bytes]:
    return (f"/gemini/v1beta/models/{MODEL}:generateContent?key={real}",
            f"x-goog-api-key: {junk}\r\nConnection: x-goog-api-key\r\n", b"{}")


@pytest.mark.parametrize("build", [_anthropic_call, _gemini_call], ids=["anthropic", "gemini"])
def test_the_key_charged_is_the_key_forwarded(guarded: Guarded, fake_upstream: FakeUpstream,
                                              secrets: Secrets, build: Any) -> None:
    """A made-up credential in a header the client lists in ``Connection:`` never reaches
    the provider, which authenticates with the other one: that other one is what limits,
    records and fingerprints must count, whatever the made-up one says each time."""
    dialect = "anthropic" if build is _anthropic_call else "gemini"
    real = secrets.new(dialect)
    statuses = []
    for _ in range(GUARD_KEY_LIMIT + 2):
        target, headers, body = build(real, secrets.new(dialect))
        fake_upstream.reset()
        answer, rid = _raw(guarded.proxy.port, "POST", target, headers, body)
        statuses.append(answer.status)
        record = guarded.proxy.wait_record(rid)
        assert record["key_fingerprint"] == fingerprint(real), "charged to a made-up key"
        if answer.status == 200:
            sent = fake_upstream.last
            if dialect == "anthropic":
                assert sent.header("x-api-key") == real
                assert "authorization" not in sent.header_names()
            else:
                assert sent.query.get("key") == [real]
                assert "x-goog-api-key" not in sent.header_names()
        else:
            assert fake_upstream.requests == []
    assert statuses == [200] * GUARD_KEY_LIMIT + [429] * 2, statuses
    assert not secrets.found_in(guarded.proxy.log_text())


# (dialect, target, headers) with {a} and {b} for two different keys
TWO_CREDENTIALS = {
    "anthropic x-api-key and bearer": (
        "anthropic", "/anthropic/v1/messages",
        "x-api-key: {a}\r\nAuthorization: Bearer {b}\r\nanthropic-version: 2023-06-01\r\n"),
    "anthropic two x-api-key": ("anthropic", "/anthropic/v1/messages",
                                "x-api-key: {a}\r\nx-api-key: {b}\r\n"),
    "openai two bearer": ("openai", "/openai/v1/chat/completions",
                          "Authorization: Bearer {a}\r\nAuthorization: Bearer {b}\r\n"),
    "gemini query and header": ("gemini", f"/gemini/v1beta/models/{MODEL}:generateContent"
                                "?key={a}", "x-goog-api-key: {b}\r\n"),
    "gemini query and bearer": ("gemini", f"/gemini/v1beta/models/{MODEL}:generateContent"
                                "?key={a}", "Authorization: Bearer {b}\r\n"),
    "gemini two query keys": ("gemini", f"/gemini/v1beta/models/{MODEL}:generateContent"
                              "?key={a}&key={b}", ""),
    "gemini encoded query name": ("gemini", f"/gemini/v1beta/models/{MODEL}:generateContent"
                                  "?key={a}&%6Bey={b}", ""),
}


@pytest.mark.parametrize("case", list(TWO_CREDENTIALS))
def test_two_different_credentials_are_refused(guarded: Guarded, fake_upstream: FakeUpstream,
                                               secrets: Secrets, case: str) -> None:
    dialect, target, headers = TWO_CREDENTIALS[case]
    a, b = secrets.new(dialect), secrets.new(dialect)
    answer, rid = _raw(guarded.proxy.port, "POST", target.format(a=a, b=b),
                       headers.format(a=a, b=b), b"{}")
    proxy_error(answer, dialect, 400)
    assert fake_upstream.requests == [], "a request with two credentials was forwarded"
    record = guarded.proxy.wait_record(rid)
    assert record["status"] == 400 and record["key_fingerprint"] is None, record
    assert record["error_kind"] == "credential_conflict", record
    # The same credential twice is one credential.
    answer, rid = _raw(guarded.proxy.port, "POST", target.format(a=a, b=a),
                       headers.format(a=a, b=a), b"{}")
    assert answer.status == 200, answer.body[:200]
    assert guarded.proxy.wait_record(rid)["key_fingerprint"] == fingerprint(a)
    assert not secrets.found_in(guarded.proxy.log_text())


def test_only_the_configured_sources_name_the_user(guarded: Guarded, fake_upstream: FakeUpstream,
                                                   secrets: Secrets) -> None:
    """With ``server.user_sources: [key, ip]`` a client cannot pick its user id (and with it
    the user-scope limits it is charged to): path, header, body and query claims are
    ignored."""
    key = secrets.new("openai")
    claims = ("X-User-ID: victim-h\r\n", "/meta/victim-p", '"user": "victim-b", ',
              "?llm_user_id=victim-q")
    target = f"{claims[1]}/openai/v1/chat/completions{claims[3]}"
    body = ('{' + claims[2] + '"model": "m", "messages": []}').encode()
    answer, rid = _raw(guarded.proxy.port, "POST", target,
                       f"Authorization: Bearer {key}\r\n{claims[0]}", body)
    assert answer.status == 200
    record = guarded.proxy.wait_record(rid)
    assert (record["user"], record["user_source"]) == (fingerprint(key), "key"), record
    answer, rid = _raw(guarded.proxy.port, "POST", target, claims[0], body)
    assert answer.status == 200
    record = guarded.proxy.wait_record(rid)
    assert (record["user"], record["user_source"]) == ("127.0.0.1", "ip"), record


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def _many_callers(url: str, first: int, count: int, threads: int = 4) -> list[int]:
    """One call each from callers ``first`` .. ``first + count - 1``, each with its own user
    id and its own (made-up) key, on keep-alive connections; the statuses seen."""
    statuses: list[int] = []

    def run(offset: int) -> None:
        with requests.Session() as session:
            for i in range(first + offset, first + count, threads):
                statuses.append(session.post(
                    url + "/openai/v1/files", data=b'{"max_tokens": 8}', timeout=10,
                    headers={"X-User-ID": f"flood-{i}",
                             "Authorization": f"Bearer made-up-{i}"}).status_code)

    workers = [threading.Thread(target=run, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return statuses


MEMORY_CAP = 200  # counters: the memory backend's max_counters in the test below
WARM_UP = 300  # callers before the first measurement: the store is full after 25
MANY_CALLERS = 1500  # callers measured: 12,000 counters (~6 MB) without the cap
RSS_GROWTH_KIB = 3 * 1024


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads RSS from /proc")
def test_memory_limiter_stays_bounded_under_a_flood_of_callers(
        start_proxy: Any, fake_upstream: FakeUpstream) -> None:
    """Each caller names a new user and a new key: two new scopes of four counters each
    (requests and tokens, per minute and per day). Past ``memory.max_counters`` the worker
    forgets the least recently charged counters: its RSS stays where it was, the evictions
    are counted and the warning is throttled. 100,000 users at the default cap, in a fresh
    interpreter: tests/ratelimit/test_memory_bound.py."""
    limits = {"requests_per_minute": 5, "tokens_per_minute": 100_000,
              "requests_per_day": 50, "tokens_per_day": 1_000_000}
    proxy = start_proxy(config={"features": {"rate_limiting": {
        "enabled": True, "backend": "memory", "memory": {"max_counters": MEMORY_CAP},
        "scope_limits": {"user": limits, "key": limits}}}},
        workers=1, env={"LOG_LEVEL": "warning"})
    workers = worker_pids(_pid(proxy))
    assert workers is not None and len(workers) == 1
    # Warm-up: the store reaches its cap, the pools and caches their working size.
    assert set(_many_callers(proxy.url, 0, WARM_UP)) == {200}
    before = _rss_kib(workers[0])
    started = time.monotonic()
    assert set(_many_callers(proxy.url, WARM_UP, MANY_CALLERS)) == {200}
    elapsed = time.monotonic() - started
    after = _rss_kib(workers[0])
    print(f"RSS {before} -> {after} KiB ({after - before:+d}) over {MANY_CALLERS} callers "
          f"in {elapsed:.1f} s")
    assert after - before < RSS_GROWTH_KIB, \
        f"RSS grew {after - before} KiB for {MANY_CALLERS} callers"
    metrics = requests.get(proxy.url + "/metrics", timeout=5).text
    evicted = next(float(line.split()[-1]) for line in metrics.splitlines()
                   if line.startswith("llmproxy_ratelimit_evictions_total"))
    assert evicted == 8 * (WARM_UP + MANY_CALLERS) - MEMORY_CAP
    warnings = [line for line in proxy.log_lines() if "memory backend full" in line]
    assert 1 <= len(warnings) <= 2 + elapsed / 10, len(warnings)  # one per 10 s at most
    assert worker_pids(_pid(proxy)) == workers
# -- slow and silent clients -----------------------------------------------------------------

BODY_TIMEOUT = 3.0
SEND_TIMEOUT = 2.0
KEEPALIVE = 2
HELD = 500  # sockets holding a request whose body never comes


@pytest.fixture(scope="module")
def slow_proxy(proxy_launcher: ProxyLauncher, sink: RawSink) -> ProxyProcess:
    """One worker with room for many connections, and short body, send and header timeouts."""
    return proxy_launcher(config={
        "server": {"body_timeout": BODY_TIMEOUT, "send_timeout": SEND_TIMEOUT},
        "providers": {"sinkoa": {"base_url": sink.url, "dialect": "openai"}},
    }, workers=1, env={"WORKER_CONNECTIONS": "2048", "KEEPALIVE": str(KEEPALIVE)})


def _worker_rss_kib(proxy: ProxyProcess) -> int:
    [worker] = worker_pids(_pid(proxy)) or pytest.skip("needs /proc")
    for line in Path(f"/proc/{worker}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS line")


def _chat_ok(proxy: ProxyProcess) -> None:
    resp = requests.post(f"{proxy.url}/openai/v1/chat/completions", timeout=10,
                         json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200, resp.text[:300]


def _read_until_closed(socks: dict[socket.socket, str], deadline: float) -> dict[str, bytes]:
    """Everything each socket receives until the server closes it (or the deadline)."""
    out = {rid: b"" for rid in socks.values()}
    with selectors.DefaultSelector() as sel:
        for sock in socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=max(deadline - time.monotonic(), 0.01)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    piece = sock.recv(65536)
                except (BlockingIOError, InterruptedError):
                    continue
                except ConnectionResetError:
                    piece = b""
                if piece:
                    out[socks[sock]] += piece
                else:
                    sel.unregister(sock)
        left = len(sel.get_map())
    assert left == 0, f"{left} of {len(socks)} connections still open after the deadline"
    return out


def test_withheld_bodies_get_408_and_do_not_hold_the_worker(slow_proxy: ProxyProcess,
                                                            fake_upstream: FakeUpstream) -> None:
    """500 clients announce a 2 MB body and send one byte of it.

    Each is answered 408 in the provider's shape once ``server.body_timeout`` has passed and
    its connection closed; meanwhile /health and normal calls on the same worker go on, and
    afterwards the worker's memory is back near where it was.
    """
    workers = worker_pids(_pid(slow_proxy))
    for _ in range(20):
        _chat_ok(slow_proxy)
    baseline = _worker_rss_kib(slow_proxy)
    socks: dict[socket.socket, str] = {}
    try:
        for _ in range(HELD):
            rid = "held-" + uuid.uuid4().hex
            sock = socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=5)
            sock.sendall(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                         f"X-Request-ID: {rid}\r\nContent-Type: application/json\r\n"
                         f"Content-Length: 2000000\r\n\r\n{{".encode())
            socks[sock] = rid
        sent = time.monotonic()
        latencies = []
        while time.monotonic() - sent < BODY_TIMEOUT * 0.6:
            started = time.monotonic()
            assert requests.get(f"{slow_proxy.url}/health", timeout=5).status_code == 200
            latencies.append(time.monotonic() - started)
        _chat_ok(slow_proxy)
        held_rss = _worker_rss_kib(slow_proxy)
        assert time.monotonic() - sent < BODY_TIMEOUT, "too slow to measure within the hold"
        answers = _read_until_closed(socks, sent + BODY_TIMEOUT + 10)
        closed = time.monotonic()
    finally:
        for sock in socks:
            sock.close()
    latencies.sort()
    median = latencies[len(latencies) // 2]
    print(f"\n/health under {HELD} held sockets: {len(latencies)} calls, median "
          f"{median * 1000:.1f} ms, p90 {latencies[len(latencies) * 9 // 10] * 1000:.1f} ms, "
          f"max {latencies[-1] * 1000:.1f} ms; all {HELD} answered within {closed - sent:.2f} s")
    # The worst case is a /health queued behind the parsing of the 500 requests' headers.
    assert median < 0.1 and latencies[-1] < 1.0, (median, latencies[-1])
    for raw in answers.values():
        proxy_error(parse_one(raw, "POST"), "openai", 408)
    assert not [r for r in fake_upstream.requests if "held-" in (r.header("X-Request-ID") or "")]
    records = {r["request_id"]: r for r in slow_proxy.records()
               if str(r.get("request_id", "")).startswith("held-")}
    for rid in answers:
        assert (records[rid]["status"], records[rid]["outcome"], records[rid]["error_kind"]) \
            == (408, "client_aborted", "body_timeout"), records[rid]
    _chat_ok(slow_proxy)
    after = _worker_rss_kib(slow_proxy)
    print(f"worker RSS: baseline {baseline / 1024:.1f} MiB, holding {held_rss / 1024:.1f} MiB, "
          f"after {after / 1024:.1f} MiB")
    # What stays is the high-water mark of 500 greenlets (about 16 KiB each, kept by the
    # allocator and reused by the next 500); 500 buffered 2 MB bodies would be 1 GB.
    assert after - baseline < 24 * 1024, (baseline, held_rss, after)
    assert worker_pids(_pid(slow_proxy)) == workers, "the worker was restarted"


def test_trickled_body_gets_408(slow_proxy: ProxyProcess) -> None:
    """A body read whole arrives one byte every 0.2 s: it must be done within body_timeout."""
    rid = "trickle-" + uuid.uuid4().hex
    body = b'{"model": "m", "messages": [' + b" " * 200 + b"]}"
    with socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=10) as sock:
        sock.sendall(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     f"X-Request-ID: {rid}\r\nContent-Length: {len(body)}\r\n\r\n".encode())
        started = time.monotonic()
        sock.settimeout(0.2)
        answer = b""
        for i in range(len(body)):
            try:
                sock.sendall(body[i:i + 1])
                piece = sock.recv(65536)  # doubles as the pacing: waits up to 0.2 s
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                break
            answer += piece
            if not piece or answer.endswith(b"}"):
                break
        elapsed = time.monotonic() - started
    proxy_error(parse_one(answer, "POST"), "openai", 408)
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 3, elapsed
    record = slow_proxy.wait_record(rid)
    assert (record["status"], record["error_kind"]) == (408, "body_timeout")


def test_withheld_chunked_upload_gets_408(slow_proxy: ProxyProcess) -> None:
    """A chunked upload (no Content-Length) sends one chunk and then nothing: the proxy reads
    such a body up to inspect_max_bytes to inspect it, and that read is held to
    body_timeout like any other (408, connection closed), not left open."""
    rid = "chunked-" + uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=10) as sock:
        sock.sendall(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     f"X-Request-ID: {rid}\r\nContent-Type: application/json\r\n"
                     f"Transfer-Encoding: chunked\r\n\r\n5\r\n{{\"a\":\r\n".encode())
        started = time.monotonic()
        answer = read_all(sock)
        elapsed = time.monotonic() - started
    proxy_error(parse_one(answer, "POST"), "openai", 408)
    assert BODY_TIMEOUT - 0.1 < elapsed < BODY_TIMEOUT + 3, elapsed
    record = slow_proxy.wait_record(rid)
    assert (record["status"], record["error_kind"]) == (408, "body_timeout")


def test_withheld_streamed_upload_gets_408_and_the_upstream_is_closed(
        slow_proxy: ProxyProcess, sink: RawSink) -> None:
    """A body too big to be read whole stops after 1 KB: 408, and the provider, which got the
    start of it, sees the connection closed rather than a complete request."""
    sink.reset()
    rid = "upload-" + uuid.uuid4().hex
    with socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=10) as sock:
        sock.sendall(f"POST /sinkoa/v1/files HTTP/1.1\r\nHost: x\r\nX-Request-ID: {rid}\r\n"
                     f"Content-Length: {3 << 20}\r\n\r\n".encode() + b"u" * 1024)
        upstream = sink.wait_connection()
        started = time.monotonic()
        answer = read_all(sock)
        elapsed = time.monotonic() - started
    proxy_error(parse_one(answer, "POST"), "openai", 408)
    assert elapsed < BODY_TIMEOUT + 3, elapsed
    assert upstream.closed.wait(2), "the half-sent upload was left open upstream"
    assert not upstream.complete.is_set()
    record = slow_proxy.wait_record(rid)
    assert (record["status"], record["error_kind"]) == (408, "body_timeout")


def test_client_that_stops_reading_a_stream_is_dropped(slow_proxy: ProxyProcess,
                                                       fake_upstream: FakeUpstream) -> None:
    """The client reads the first bytes of a fast stream, then nothing: after send_timeout
    the proxy drops it, closes the upstream connection and records ``client_aborted``."""
    event = b'data: {"choices": [{"index": 0, "delta": {"content": "' + b"x" * 65536 \
        + b'"}}]}\n\n'

    def flood(rec: object, reply: Any) -> None:
        reply.start_stream()
        for _ in range(100_000):  # until the proxy lets go (Abort), or long past the test
            reply.write(event)

    fake_upstream.script(flood)
    rid = "stalled-" + uuid.uuid4().hex
    body = b'{"model": "m", "stream": true, "messages": []}'
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(10)
        sock.connect(("127.0.0.1", slow_proxy.port))
        sock.sendall(f"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                     f"X-Request-ID: {rid}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
                     + body)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        stopped = time.monotonic()  # from here on the client reads nothing
        assert fake_upstream.client_gone.wait(SEND_TIMEOUT + 10), \
            "the stream is still running for a client that reads nothing"
        gone = fake_upstream.last.client_gone_at or 0.0
        assert SEND_TIMEOUT - 0.5 < gone - stopped < SEND_TIMEOUT + 5, gone - stopped
        record = slow_proxy.wait_record(rid)
        assert (record["outcome"], record["error_kind"]) == ("client_aborted", "send_timeout")
        sock.settimeout(5)
        while True:  # what was buffered, then the end: the proxy closed the connection
            try:
                if not sock.recv(1 << 20):
                    break
            except ConnectionResetError:
                break
    finally:
        sock.close()
    fake_upstream.reset()
    _chat_ok(slow_proxy)
    assert "Traceback" not in slow_proxy.log_text()


def test_headers_must_arrive_within_keepalive(slow_proxy: ProxyProcess) -> None:
    """gunicorn's gevent worker reads each request's head under its keep-alive timeout: a
    client that stops in the middle of a header is disconnected after KEEPALIVE seconds (the
    header-read timeout the README's security section describes)."""
    with socket.create_connection(("127.0.0.1", slow_proxy.port), timeout=KEEPALIVE + 8) as sock:
        sock.sendall(b"POST /openai/v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        started = time.monotonic()
        answer = read_all(sock)
        elapsed = time.monotonic() - started
    assert answer == b"" and KEEPALIVE - 0.2 < elapsed < KEEPALIVE + 3, (answer[:80], elapsed)
