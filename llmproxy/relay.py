"""The forwarding view: one upstream call, the response streamed back chunk by chunk.

Request path: :func:`prepare` (a ``before_request`` hook) identifies the call and builds
its :class:`~llmproxy.exchange.Exchange`; other hooks (rate limiting) may answer
instead; :func:`proxy_view` sends it upstream with ``stream=True`` and returns either
the whole small body or a generator that flushes each chunk as it arrives. The
exchange's single terminal event fires from that generator's ``finally`` or, for
anything never streamed, when the WSGI server closes the response.
"""

from __future__ import annotations

import logging
import re
import socket
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote, urlsplit

import gevent
import requests
from flask import Response, current_app, g, request

from . import identity, telemetry
from .errors import error_response, stream_error_event
from .exchange import CLIENT_ABORTED, COMPLETED, UPSTREAM_ERROR, Exchange
from .health import UPSTREAM_STATUS
from .parsers import ResponseParser
from .providers.base import Provider
from .state import ProxyState, get_state
from .upstream import (
    BodyStream,
    RequestBodyError,
    Upstream,
    UpstreamError,
    request_headers,
    response_headers,
)

log = logging.getLogger("llmproxy.relay")

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")
#: Bodies with a known length up to this size are read whole and sent in one piece.
SMALL_BODY = 1 << 20


def request_id() -> str:
    incoming = request.headers.get("X-Request-ID")
    if incoming and _REQUEST_ID_RE.match(incoming):
        return incoming
    return uuid.uuid4().hex


def raw_target(environ: dict[str, Any]) -> str:
    """The request target as the client sent it (still percent-encoded), origin-form."""
    raw = environ.get("RAW_URI") or environ.get("REQUEST_URI")
    if not raw:
        raw = quote(environ.get("PATH_INFO", "/"), safe="/%:@!$&'()*+,;=-._~")
        if environ.get("QUERY_STRING"):
            raw += "?" + environ["QUERY_STRING"]
    if not raw.startswith("/"):  # absolute-form: only its path and query count
        parts = urlsplit(raw)
        raw = (parts.path or "/") + ("?" + parts.query if parts.query else "")
    return str(raw)


def _strip_prefix(target: str, segments: int) -> str:
    """Drop the first ``segments`` path segments (``/openai`` or ``/meta/<u>/openai``)."""
    pieces = target.split("/", segments + 1)
    return "/" + pieces[segments + 1] if len(pieces) > segments + 1 else ""


def prepare() -> Response | None:
    """``before_request``: identify a provider call; answer 404/413 for bad ones."""
    rid = request_id()
    g.request_id = rid
    if request.method == "OPTIONS":
        return None  # CORS preflight: answered by flask-cors, never identified or limited
    state = get_state(current_app)
    target = raw_target(request.environ)
    path_for_log = identity.redact_query(target)
    provider = state.providers.get(request.blueprint.removesuffix("_meta")) \
        if request.blueprint and request.endpoint and request.endpoint.endswith(".proxy") \
        else None
    if provider is None:
        g.exchange_any = Exchange(rid, request.method, path_for_log,
                                  _listeners=tuple(state.listeners[:1]))
        return None
    view_args = request.view_args or {}
    path_user = view_args.get("user_id")
    segments = 3 if path_user is not None else 1
    rest = _strip_prefix(target, segments)
    ex = Exchange(rid, request.method, path_for_log, provider=provider.name,
                  dialect=provider.dialect, _listeners=tuple(state.listeners))
    g.exchange_any = ex
    if target.split("/", segments + 1)[segments] != provider.name:
        # Routing saw the decoded path; the raw one is forwarded. An encoded prefix
        # ("/openai%2Fv1/...") would make the two disagree on where <rest> starts.
        ex.status = 404
        return error_response(provider.dialect, 404, "Unknown route.", request_id=rid)
    headers = request.headers
    ex.api_key = identity.api_key(headers, request.query_string.decode("latin-1"))
    if ex.api_key:
        ex.key_fingerprint = identity.fingerprint(ex.api_key)
    ex.client_ip = identity.client_ip(request.remote_addr, headers.get("X-Forwarded-For"),
                                      state.settings.trusted_proxies)
    url = provider.upstream_url(rest)
    if url is None:
        ex.status = 404
        return error_response(provider.dialect, 404, "Unknown or unsafe path.", request_id=rid)
    ex.upstream_path = rest
    length = request.content_length
    settings = state.settings
    if length is not None and length > settings.max_body_bytes:
        ex.status = 413
        ex.error_kind = "too_large"
        return error_response(provider.dialect, 413, f"Request body larger than "
                              f"{settings.max_body_bytes} bytes.", request_id=rid)
    body: bytes | None = None
    if length and length <= settings.inspect_max_bytes:
        body = request.get_data(cache=True)
        if len(body) < length:
            # gunicorn ends the body at EOF without an error: the client left mid-upload.
            # Forwarding it would hand the provider a truncated request posing as whole.
            ex.status = 400
            ex.error_kind = "client_gone"
            ex.outcome = CLIENT_ABORTED
            return error_response(provider.dialect, 400, "Incomplete request body.",
                                  request_id=rid)
    ex.request_bytes = length or 0
    path, _, query = rest.partition("?")
    info = provider.inspect(request.method, path, query, headers, body)
    ex.request_info = info
    ex.model = info.model
    ex.streaming = info.streaming
    ex.user, ex.user_source = identity.resolve_user(path_user, headers, info.user, query,
                                                     ex.client_ip)
    g.exchange = ex
    g.upstream_url = url
    g.body = body
    # -- telemetry hook: the call is identified, its span starts (nothing when off) --
    tel = current_app.extensions.get(telemetry.EXTENSION_KEY)
    if tel is not None:
        ex.span = tel.start(ex, headers)
    return None


def proxy_view(rest: str, user_id: str | None = None) -> Response:
    """Forward the prepared exchange upstream and relay the answer."""
    ex: Exchange = g.exchange
    state = get_state(current_app)
    provider = state.providers[ex.provider or ""]
    body: Any = g.get("body")  # small bodies were read whole by prepare()
    length = request.content_length
    if body is None and length:
        body = BodyStream(request.stream, length, state.settings.max_body_bytes)
    elif body is None and "Transfer-Encoding" in request.headers:
        # gunicorn only accepts a Transfer-Encoding that ends in chunked and removes that
        # layer; anything left (gzip, deflate) would reach the provider still coded.
        codings = [c.strip().lower() for c in request.headers["Transfer-Encoding"].split(",")]
        if [c for c in codings if c] != ["chunked"]:
            return _fail(ex, provider, 501, "transfer_coding",
                         "Transfer-Encoding other than chunked is not supported.")
        body = BodyStream(request.stream, None, state.settings.max_body_bytes)
    headers = request_headers(request.headers.items())
    if ex.span is not None:  # telemetry hook: the provider sees the proxy's span as parent
        current_app.extensions[telemetry.EXTENSION_KEY].inject(ex, headers)
    try:
        resp = _send_watching_client(state, request.method, g.upstream_url, headers, body,
                                     request.environ.get("gunicorn.socket"))
    except _ClientGone:
        ex.outcome = CLIENT_ABORTED
        return _fail(ex, provider, 499, "client_gone", "The client closed the connection.")
    except RequestBodyError as exc:
        if exc.kind == "client_gone":
            ex.outcome = CLIENT_ABORTED
        return _fail(ex, provider, 413 if exc.kind == "too_large" else 400, exc.kind,
                     "Request body too large." if exc.kind == "too_large"
                     else "Could not read the request body.")
    except UpstreamError as exc:
        _count_streamed_upload(ex, body)
        log.debug("upstream %s failed: %s", ex.provider, identity.redact_query(exc.detail))
        if exc.kind == "timeout":
            return _fail(ex, provider, 504, "timeout",
                         f"The {provider.name} API did not answer in time.")
        return _fail(ex, provider, 502, exc.kind, f"The {provider.name} API is unreachable.")
    _count_streamed_upload(ex, body)
    return _relay(ex, provider, resp, request.environ.get("gunicorn.socket"))


def _count_streamed_upload(ex: Exchange, body: Any) -> None:
    if isinstance(body, BodyStream):  # chunked uploads have no Content-Length to go by
        ex.request_bytes = body.read_bytes


class _ClientGone(Exception):
    """The client reset its connection while the provider was still to answer."""


def _reset_by_peer(sock: Any) -> bool:
    """True if the readable client socket holds a reset; data or EOF give no verdict.

    Runs in the hub, so it must not block: the socket is known to be readable, and a
    spurious wake-up (which would make gevent wait) counts as no verdict.
    """
    raw = getattr(sock, "_sock", sock)  # the OS-level socket under gevent's wrapper
    try:
        raw.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except ConnectionResetError:
        return True
    except OSError:  # EAGAIN (a spurious wake-up) or another error: no verdict
        return False
    except BaseException:  # noqa: BLE001 - gevent refusing to block in the hub
        return False
    return False


def _send_watching_client(state: ProxyState, method: str, url: str, headers: dict[str, str],
                          body: Any, client: Any) -> requests.Response:
    """``Upstream.send``, abandoned if the client resets its connection before the answer.

    A long non-streamed call (a reasoning model can think for minutes) would otherwise run
    to its end, billed, for nobody. A bare I/O watcher on the client socket costs a few
    microseconds, where a watching greenlet per request cost a tenth of the worker's CPU.
    The reset is thrown into this greenlet like a gevent Timeout, and urllib3 closes the
    upstream connection on any exception. Only for bodies already read: a streamed upload
    reads the client socket itself. Data (pipelining) or EOF (maybe a half-close with the
    client still waiting) end the watch without aborting.
    """
    try:
        fd = client.fileno() if client is not None and not isinstance(body, BodyStream) else -1
    except OSError:
        fd = -1
    if fd < 0:
        return state.upstream.send(method, url, headers, body)
    waiting = gevent.getcurrent()
    watcher = gevent.get_hub().loop.io(fd, 1)

    def readable() -> None:
        watcher.stop()
        if _reset_by_peer(client):
            waiting.throw(_ClientGone())

    watcher.start(readable)
    try:
        return state.upstream.send(method, url, headers, body)
    finally:
        watcher.stop()
        watcher.close()


def _fail(ex: Exchange, provider: Provider, status: int, kind: str, message: str) -> Response:
    ex.status = status
    ex.error_kind = kind
    if ex.outcome is None:
        ex.outcome = UPSTREAM_ERROR if kind in ("connect", "timeout") else None
    return error_response(provider.dialect, status, message, request_id=ex.request_id)


def _relay(ex: Exchange, provider: Provider, resp: requests.Response, client: Any) -> Response:
    raw_headers = resp.raw.headers
    ctype = raw_headers.get("Content-Type")
    parser = provider.parser(ex.upstream_path, ctype, raw_headers.get("Content-Encoding"))
    ex.meta = parser.meta
    ex.status = resp.status_code
    ex.extras[UPSTREAM_STATUS] = resp.status_code
    headers = response_headers(raw_headers)
    sse = bool(ctype and ctype.startswith("text/event-stream"))
    length = raw_headers.get("Content-Length")
    if not sse and not ex.streaming and length is not None and length.isdigit() \
            and int(length) <= SMALL_BODY:
        # Small whole body: one read, one write, the connection goes straight back to the pool.
        try:
            data = resp.raw.read(decode_content=False)  # b"" for HEAD; frees the connection
        except Exception as exc:  # translated like any other upstream read failure
            resp.close()
            log.debug("upstream %s body read failed: %s", ex.provider,
                      identity.redact_query(str(exc)))
            return _fail(ex, provider, 502, "connect", f"The {provider.name} API "
                         "closed the connection before sending the whole response.")
        resp.close()
        parser.feed(data)
        parser.close()
        ex.response_bytes = len(data)
        ex.mark_first_byte()
        # HEAD: no body, and the upstream Content-Length stays as it was.
        out = Response(data if request.method != "HEAD" else None, status=resp.status_code,
                       headers=headers)
    else:
        if sse:
            headers = [(k, v) for k, v in headers if k.lower() != "cache-control"]
            headers += [("Cache-Control", "no-cache"), ("X-Accel-Buffering", "no")]
        # An error event can only be added to an uncompressed SSE body of open length;
        # anything else is ended by dropping the client connection, which every client
        # sees as a broken response rather than a complete one.
        spliceable = sse and length is None and \
            raw_headers.get("Content-Encoding", "identity").lower() == "identity"
        out = Response(_stream(ex, provider, resp, parser, spliceable, client),
                       status=resp.status_code, headers=headers, direct_passthrough=True)
        # A generator that is never started never runs its finally: close on response close too.
        out.call_on_close(resp.close)
    if ctype is None:
        out.headers.pop("Content-Type", None)
    return out


def _stream(ex: Exchange, provider: Provider, resp: requests.Response, parser: ResponseParser,
            spliceable: bool, client: Any) -> Iterator[bytes]:
    """Relay the body; on an upstream break, end it with an SSE error event when
    ``spliceable``, else by shutting the client connection down (when the server gave us
    its socket)."""
    outcome = COMPLETED
    try:
        for chunk in Upstream.iter_raw(resp):
            if ex.ttfb is None:
                ex.mark_first_byte()
            ex.response_bytes += len(chunk)
            ex.chunks += 1
            ex.last_chunk_at = time.monotonic()
            parser.feed(chunk)
            yield chunk
    except UpstreamError as exc:
        outcome = UPSTREAM_ERROR
        ex.error_kind = "midstream"
        log.debug("upstream %s stream broke: %s", ex.provider, identity.redact_query(exc.detail))
        if spliceable:
            message = f"The {provider.name} API connection broke in the middle of the response."
            yield parser.terminator + stream_error_event(provider.dialect, message)
        elif client is not None:
            try:  # gunicorn's next write then fails quietly (ENOTCONN) and it drops the socket
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    except GeneratorExit:
        outcome = CLIENT_ABORTED
        raise
    finally:
        resp.close()
        parser.close()
        ex.finish(outcome)


def finish_on_close(response: Response) -> Response:
    """``after_request``: request id header, and the terminal event for unstreamed answers."""
    response.headers["X-Proxy-Request-ID"] = g.get("request_id", "")
    ex: Exchange | None = g.get("exchange_any")
    if ex is not None:
        ex.status = response.status_code  # whoever answered (upstream, limiter, error handler)
        response.call_on_close(ex.finish)
    return response
