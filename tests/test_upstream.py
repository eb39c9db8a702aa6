"""The upstream client: header filtering and library errors translated at one boundary."""

from __future__ import annotations

import io

import pytest
import requests
import responses
from urllib3.util import SKIP_HEADER

from llmproxy.upstream import (
    BodyStream,
    RequestBodyError,
    Upstream,
    UpstreamError,
    request_headers,
    response_headers,
)

URL = "https://api.example.test/v1/chat/completions"


def test_request_headers_drop_hop_by_hop_host_and_length() -> None:
    out = request_headers([
        ("Host", "proxy:9002"), ("Connection", "keep-alive, X-Secret-Hop"), ("Keep-Alive", "5"),
        ("Transfer-Encoding", "chunked"), ("Content-Length", "10"), ("TE", "trailers"),
        ("X-Secret-Hop", "1"), ("Authorization", "Bearer k"), ("x-stainless-os", "Linux"),
        ("Accept-Encoding", "gzip"), ("Upgrade", "h2c"), ("Proxy-Authorization", "p"),
    ])
    assert out == {"Authorization": "Bearer k", "x-stainless-os": "Linux",
                   "Accept-Encoding": "gzip"}


def test_response_headers_keep_everything_end_to_end() -> None:
    out = response_headers({"Content-Type": "application/json", "Connection": "close",
                            "Transfer-Encoding": "chunked", "x-request-id": "req_1",
                            "retry-after": "3", "Content-Encoding": "gzip"})
    assert out == [("Content-Type", "application/json"), ("x-request-id", "req_1"),
                   ("retry-after", "3"), ("Content-Encoding", "gzip")]


@responses.activate
def test_send_forwards_only_the_given_headers_and_keeps_no_cookies() -> None:
    responses.post(URL, body=b"{}", headers={"Set-Cookie": "tenant=a"})
    up = Upstream(1, 1, 4)
    up.send("POST", URL, {"Authorization": "Bearer k"}, b"{}").close()
    up.send("POST", URL, {"Authorization": "Bearer other"}, b"{}").close()
    sent = responses.calls[1].request
    assert "Cookie" not in sent.headers  # the first tenant's cookie never reaches the second
    # urllib3's own defaults are suppressed with SKIP_HEADER (nothing goes on the wire)
    assert sent.headers.get("User-Agent") in (None, SKIP_HEADER)
    assert sent.headers.get("Accept-Encoding") in (None, SKIP_HEADER)
    assert sent.headers["Authorization"] == "Bearer other"


@responses.activate
@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (requests.exceptions.ConnectTimeout("slow connect"), "connect"),
        (requests.exceptions.ReadTimeout("slow headers"), "timeout"),
        (requests.exceptions.ConnectionError("refused"), "connect"),
        (requests.exceptions.SSLError("bad cert"), "connect"),
    ],
)
def test_library_errors_become_upstream_errors(exc: Exception, kind: str) -> None:
    responses.post(URL, body=exc)
    with pytest.raises(UpstreamError) as err:
        Upstream(1, 1, 4).send("POST", URL, {}, b"{}")
    assert err.value.kind == kind


@responses.activate
def test_iter_raw_yields_the_body_still_compressed() -> None:
    import gzip

    body = gzip.compress(b'{"ok": true}')
    responses.get(URL, body=body, headers={"Content-Encoding": "gzip"})
    resp = Upstream(1, 1, 4).send("GET", URL, {}, None)
    assert b"".join(Upstream.iter_raw(resp)) == body


def test_body_stream_enforces_the_limit_while_reading() -> None:
    stream = BodyStream(io.BytesIO(b"x" * 100), None, limit=64)
    with pytest.raises(RequestBodyError) as err:
        b"".join(stream)
    assert err.value.kind == "too_large"
    ok = BodyStream(io.BytesIO(b"y" * 100), 100, limit=1000)
    assert ok.len == 100 and b"".join(ok) == b"y" * 100


class _ClosingServer:
    """A loopback HTTP/1.1 server that answers each connection once, keep-alive, and then
    closes it without a word: what a provider's load balancer does to idle connections."""

    def __init__(self) -> None:
        import socket
        import threading

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.port = self.sock.getsockname()[1]
        self.connections = 0
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                data = b""
                while b"\r\n\r\n" not in data:
                    data += conn.recv(65536)
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                             b"Connection: keep-alive\r\n\r\nok")
            self.closed.set()  # closed after answering, with the client still pooling it


def test_a_pooled_connection_closed_by_the_upstream_is_not_reused() -> None:
    server = _ClosingServer()
    up = Upstream(1.0, 5.0, 4)
    url = f"http://127.0.0.1:{server.port}/v1/models"
    for _ in range(3):
        resp = up.send("GET", url, {}, None)
        assert resp.status_code == 200 and resp.raw.read() == b"ok"
        resp.close()  # back to the pool, as the relay does
        assert server.closed.wait(5)
        server.closed.clear()
    # Each request found its pooled connection closed by the peer and opened a fresh one,
    # instead of failing on the dead one.
    assert server.connections == 3
    server.sock.close()


def test_a_pooled_connection_still_open_is_reused() -> None:
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        connections: set[int] = set()

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            Handler.connections.add(self.client_address[1])  # the client port
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    up = Upstream(1.0, 5.0, 4)
    url = f"http://127.0.0.1:{server.server_address[1]}/v1/models"
    try:
        for _ in range(3):
            resp = up.send("GET", url, {}, None)
            assert resp.status_code == 200 and resp.raw.read() == b"ok"
            resp.close()
        assert len(Handler.connections) == 1
    finally:
        server.shutdown()
        server.server_close()
