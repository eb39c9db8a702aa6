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
