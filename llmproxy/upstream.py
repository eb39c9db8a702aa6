"""The one place that talks to providers: a pooled session per worker and error translation.

Library exceptions (requests, urllib3, socket) are translated here into
:class:`UpstreamError` with a ``kind``, so nothing else needs to know them.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import requests
import urllib3
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3HTTPError
from urllib3.exceptions import ReadTimeoutError
from urllib3.util import SKIP_HEADER

from .exchange import ErrorKind
from .inflight import BodyTimeout, Call
from .socketpoll import readable_now

# Hop-by-hop headers (RFC 9110 7.6.1) plus those the HTTP client must compute itself.
HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "proxy-connection",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
})
_REQUEST_DROP = HOP_BY_HOP | {"host", "content-length"}

READ_SIZE = 65536
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


class UpstreamError(Exception):
    """A provider call that failed without an HTTP response (or in the middle of one)."""

    def __init__(self, kind: ErrorKind, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # connect | timeout | midstream
        self.detail = detail  # for debug logs only: may hold addresses


def request_headers(headers: Iterable[tuple[str, str]]) -> dict[str, str]:
    """The client's headers minus hop-by-hop ones, ``Host`` and ``Content-Length``."""
    out: dict[str, str] = {}
    extra_hop: set[str] = set()
    for name, value in headers:
        lname = name.lower()
        if lname == "connection":
            extra_hop.update(t.strip().lower() for t in value.split(","))
        if lname in _REQUEST_DROP:
            continue
        out[name] = value
    if extra_hop:
        out = {k: v for k, v in out.items() if k.lower() not in extra_hop}
    return out


def response_headers(headers: Mapping[str, str]) -> list[tuple[str, str]]:
    """The provider's response headers minus hop-by-hop ones, exactly as sent otherwise."""
    extra_hop = {t.strip().lower() for t in headers.get("connection", "").split(",")}
    return [
        (name, value) for name, value in headers.items()
        if name.lower() not in HOP_BY_HOP and name.lower() not in extra_hop
    ]


class _CheapCheck:
    """urllib3's connections, checked for a peer close the cheap way (see socketpoll.py)
    each time urllib3 takes one from the pool."""

    sock: Any

    @property
    def is_connected(self) -> bool:
        return self.sock is not None and not readable_now(self.sock)


class _CheapCheckHTTPConnection(_CheapCheck, HTTPConnection):
    pass


class _CheapCheckHTTPSConnection(_CheapCheck, HTTPSConnection):
    pass


class _HTTPPool(HTTPConnectionPool):
    ConnectionCls = _CheapCheckHTTPConnection


class _HTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _CheapCheckHTTPSConnection


class _Adapter(HTTPAdapter):
    """requests' adapter whose pools use the connections above."""

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    def build_response(self, req: requests.PreparedRequest, resp: Any) -> requests.Response:
        """requests' own, minus the cookie jar and the text-encoding guess: ``Set-Cookie`` is
        relayed as the provider sent it and the body is relayed as bytes, so both were work
        for nobody (cookie parsing alone was ~1 % of a worker's CPU)."""
        response = requests.Response()
        response.status_code = resp.status
        response.headers = CaseInsensitiveDict(resp.headers)
        response.raw = resp
        response.reason = resp.reason
        response.url = str(req.url)
        response.request = req
        response.connection = self
        return response


class Upstream:
    """One connection pool per worker process, shared by all its greenlets."""

    def __init__(self, connect_timeout: float, read_timeout: float, pool_maxsize: int) -> None:
        self.timeout = (connect_timeout, read_timeout)
        # The adapter is requests' connection pool. Requests go to it directly (see send),
        # so no Session adds environment proxies, .netrc credentials, default headers or a
        # cookie jar shared by every tenant of the worker.
        self.adapter: HTTPAdapter = _Adapter(pool_connections=16, pool_maxsize=pool_maxsize,
                                             max_retries=0, pool_block=False)

    def send(self, method: str, url: str, headers: dict[str, str], body: Any) -> requests.Response:
        """Send the request; the response body is left unread on the socket.

        The request is prepared by hand and given straight to the pooled adapter: the URL
        was already built and checked by the provider, the headers are final, and
        ``Session.request``'s environment, cookie and hook merging cost a quarter of a
        worker's CPU while adding nothing a proxy wants.
        """
        prep = requests.PreparedRequest()
        prep.method = method
        prep.url = url
        prep.hooks = {"response": []}
        if body is None:
            if method in _BODY_METHODS:
                headers["Content-Length"] = "0"
        elif isinstance(body, bytes):
            headers["Content-Length"] = str(len(body))
        elif getattr(body, "len", 0):
            headers["Content-Length"] = str(body.len)
        else:
            headers["Transfer-Encoding"] = "chunked"
        prep.headers = CaseInsensitiveDict(headers)
        # urllib3 adds its own User-Agent and Accept-Encoding unless told to skip them.
        for name in ("User-Agent", "Accept-Encoding"):
            prep.headers.setdefault(name, SKIP_HEADER)
        prep.body = body
        try:
            return self.adapter.send(prep, stream=True, timeout=self.timeout)
        except requests.exceptions.ConnectTimeout as exc:
            raise UpstreamError(ErrorKind.CONNECT, str(exc)) from None
        except requests.exceptions.Timeout as exc:
            raise UpstreamError(ErrorKind.TIMEOUT, str(exc)) from None
        except RequestBodyError:
            raise
        except requests.exceptions.ConnectionError as exc:
            if isinstance(exc.__context__, RequestBodyError):
                raise exc.__context__ from None
            reason = exc.args[0] if exc.args else None
            if isinstance(reason, urllib3.exceptions.MaxRetryError):
                reason = reason.reason
            if isinstance(reason, ReadTimeoutError):
                raise UpstreamError(ErrorKind.TIMEOUT, str(exc)) from None
            raise UpstreamError(ErrorKind.CONNECT, str(exc)) from None
        except (requests.exceptions.RequestException, Urllib3HTTPError, OSError) as exc:
            raise UpstreamError(ErrorKind.CONNECT, str(exc)) from None

    @staticmethod
    def iter_raw(resp: requests.Response) -> Iterator[bytes]:
        """Yield the body as received (still compressed), each piece as soon as it arrives."""
        raw = resp.raw
        try:
            while True:
                chunk = raw.read1(READ_SIZE, decode_content=False)
                if not chunk:
                    return
                yield chunk
        except (TimeoutError, Urllib3HTTPError, OSError, ValueError) as exc:
            # A read timeout mid-stream arrives as a urllib3 error, not requests.Timeout.
            raise UpstreamError(ErrorKind.MIDSTREAM, str(exc)) from None


class RequestBodyError(Exception):
    """Reading the client's request body failed or exceeded the size limit."""

    def __init__(self, kind: ErrorKind) -> None:
        super().__init__(str(kind))
        self.kind = kind  # too_large | client_read | client_gone | body_timeout


class BodyStream:
    """The client's request body as a file-like object requests can stream upstream.

    ``len`` lets requests send a Content-Length instead of chunked encoding; reading stops
    with :class:`RequestBodyError` once more than ``limit`` bytes arrived, or when one read
    (urllib3 asks for 16 KiB, which gunicorn returns whole) outlasts ``server.body_timeout``:
    the sweep of ``call``'s registry ends it (see :mod:`llmproxy.inflight`). ``head``: the
    first bytes, already read off ``stream`` (to inspect them).
    """

    def __init__(self, stream: Any, length: int | None, limit: int,
                 call: Call | None = None, head: bytes = b"") -> None:
        self._stream = stream
        self.len = length or 0
        self._limit = limit
        self._call = call
        self._head = memoryview(head)
        self.read_bytes = len(head)

    def read(self, size: int = READ_SIZE) -> bytes:
        if size is None or size < 0:
            size = READ_SIZE
        if self._head:
            piece, self._head = bytes(self._head[:size]), self._head[size:]
            return piece
        call = self._call
        if call is not None:
            call.reading = time.monotonic()
        try:
            data: bytes = self._stream.read(size)
        except BodyTimeout:
            raise RequestBodyError(ErrorKind.BODY_TIMEOUT) from None
        except Exception as exc:  # client went away or sent a malformed chunked body
            raise RequestBodyError(ErrorKind.CLIENT_READ) from exc
        finally:
            if call is not None:
                call.reading = 0.0
        self.read_bytes += len(data)
        if not data and self.read_bytes < self.len:
            # EOF before Content-Length bytes: gunicorn returns short reads silently.
            raise RequestBodyError(ErrorKind.CLIENT_GONE)
        if self.read_bytes > self._limit:
            raise RequestBodyError(ErrorKind.TOO_LARGE)
        return data

    def __iter__(self) -> Iterator[bytes]:
        while True:
            data = self.read(READ_SIZE)
            if not data:
                return
            yield data
