"""The forwarding view: one upstream call, the response streamed back chunk by chunk.

Request path: :func:`llmproxy.inbound.prepare` (a ``before_request`` hook) identifies the
call and builds its :class:`~llmproxy.exchange.Exchange`; other hooks (rate limiting) may
answer instead; :func:`proxy_view` sends it upstream with ``stream=True`` and returns either
the whole small body or a generator that flushes each chunk as it arrives. The
exchange's single terminal event fires from that generator's ``finally`` or, for
anything never streamed, when the WSGI server closes the response.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import gevent
import requests
from flask import Response, current_app, g, request

from . import identity
from .errors import error_response
from .exchange import ErrorKind, Exchange, Outcome
from .inflight import Call
from .keys.credentials import forward_headers
from .observe.telemetry import EXTENSION_KEY as TELEMETRY_KEY
from .providers import Provider
from .state import ProxyState, get_state
from .streams.reader import ResponseReader, readable_accept_encoding
from .upstream import (
    BodyStream,
    RequestBodyError,
    Upstream,
    UpstreamError,
    response_headers,
)

log = logging.getLogger("llmproxy.relay")

#: Bodies with a known length up to this size are read whole and sent in one piece.
SMALL_BODY = 1 << 20


def proxy_view(rest: str, user_id: str | None = None) -> Response:
    """Forward the prepared exchange upstream and relay the answer."""
    ex: Exchange = g.exchange
    call: Call = g.call
    state = get_state(current_app)
    provider = state.providers[ex.provider or ""]
    body: Any = g.get("body")  # small bodies were read whole by prepare()
    length = request.content_length
    if body is None and length:
        body = BodyStream(request.stream, length, state.settings.server.max_body_bytes, call)
    elif body is None and "Transfer-Encoding" in request.headers:
        # gunicorn only accepts a Transfer-Encoding that ends in chunked and removes that
        # layer; anything left (gzip, deflate) would reach the provider still coded.
        codings = [c.strip().lower() for c in request.headers["Transfer-Encoding"].split(",")]
        if [c for c in codings if c] != ["chunked"]:
            return _fail(ex, provider, 501, ErrorKind.TRANSFER_CODING,
                         "Transfer-Encoding other than chunked is not supported.")
        body = BodyStream(request.stream, None, state.settings.server.max_body_bytes, call,
                          g.get("body_head", b""))
    headers: dict[str, str] = g.upstream_headers  # the ones the credential was read from
    if ex.key_id is not None:  # a proxy-key call: the provider's own key replaces it
        headers = forward_headers(headers, provider.credential)
    for name in headers:
        if name.lower() == "accept-encoding":  # only what the usage reader can decode
            headers[name] = readable_accept_encoding(headers[name])
    if ex.span is not None:  # telemetry on: the provider sees the proxy's span as parent
        current_app.extensions[TELEMETRY_KEY].inject(ex, headers)
    ex.forwarded = True
    try:
        resp = _send_watching_client(state, request.method, g.upstream_url, headers, body,
                                     request.environ.get("gunicorn.socket"))
    except _ClientGone:
        ex.outcome = Outcome.CLIENT_ABORTED
        return _fail(ex, provider, 499, ErrorKind.CLIENT_GONE,
                     "The client closed the connection.")
    except RequestBodyError as exc:
        ex.forwarded = False  # an upload cut short: the provider has no whole request to run
        if exc.kind in (ErrorKind.CLIENT_GONE, ErrorKind.BODY_TIMEOUT):
            ex.outcome = Outcome.CLIENT_ABORTED
        if exc.kind == ErrorKind.BODY_TIMEOUT:
            out = _fail(ex, provider, 408, exc.kind, "The request body did not arrive within "
                        f"{state.settings.server.body_timeout:g} s.")
            out.call_on_close(call.hang_up)  # the rest of the body must not pass for a request
            return out
        too_large = exc.kind == ErrorKind.TOO_LARGE
        return _fail(ex, provider, 413 if too_large else 400, exc.kind,
                     "Request body too large." if too_large
                     else "Could not read the request body.")
    except UpstreamError as exc:
        _count_streamed_upload(ex, body)
        log.debug("upstream %s failed: %s", ex.provider, identity.redact_query(exc.detail))
        ex.forwarded = exc.kind == ErrorKind.TIMEOUT  # a connection that failed ran nothing
        if exc.kind == ErrorKind.TIMEOUT:
            return _fail(ex, provider, 504, exc.kind,
                         f"The {provider.name} API did not answer in time.")
        return _fail(ex, provider, 502, exc.kind, f"The {provider.name} API is unreachable.")
    _count_streamed_upload(ex, body)
    chars_per_token = state.settings.ratelimit.estimation.divisor(ex.provider, ex.dialect)
    return _relay(ex, provider, resp, call, chars_per_token)


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


def _fail(ex: Exchange, provider: Provider, status: int, kind: ErrorKind,
          message: str) -> Response:
    ex.status = status
    ex.error_kind = kind
    if ex.outcome is None and kind in (ErrorKind.CONNECT, ErrorKind.TIMEOUT):
        ex.outcome = Outcome.UPSTREAM_ERROR
    return error_response(provider.dialect, status, message, request_id=ex.request_id)


def _relay(ex: Exchange, provider: Provider, resp: requests.Response, call: Call,
           chars_per_token: float) -> Response:
    raw_headers = resp.raw.headers
    ctype = raw_headers.get("Content-Type")
    parser = provider.reader(ex.upstream_path, ctype, raw_headers.get("Content-Encoding"))
    ex.meta = parser.meta
    ex.status = resp.status_code
    ex.upstream_status = resp.status_code
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
            return _fail(ex, provider, 502, ErrorKind.CONNECT, f"The {provider.name} API "
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
        out = Response(_stream(ex, provider, resp, parser, spliceable, call, chars_per_token),
                       status=resp.status_code, headers=headers, direct_passthrough=True)
        # A generator that is never started never runs its finally: close on response close too.
        out.call_on_close(resp.close)
    if ctype is None:
        out.headers.pop("Content-Type", None)
    return out


def _stream(ex: Exchange, provider: Provider, resp: requests.Response, parser: ResponseReader,
            spliceable: bool, call: Call, chars_per_token: float) -> Iterator[bytes]:
    """Relay the body; on an upstream break, end it with an SSE error event when
    ``spliceable``, else by shutting the client connection down (when the server gave us
    its socket). A stream whose final output count never came is counted from the text it
    relayed (``chars_per_token``: the limiter's estimation divisor for this provider).

    Each write is marked in ``call.writing`` (the server writes a chunk between our yield
    and our next resumption), so a client that stops reading is dropped after
    ``server.send_timeout``; see :mod:`llmproxy.inflight`.
    """
    outcome = Outcome.COMPLETED
    client = call.client
    try:
        for chunk in Upstream.iter_raw(resp):
            if ex.ttfb is None:
                ex.mark_first_byte()
            ex.response_bytes += len(chunk)
            ex.chunks += 1
            ex.last_chunk_at = time.monotonic()
            parser.feed(chunk)
            call.writing = time.monotonic()
            yield chunk
            call.writing = 0.0
    except UpstreamError as exc:
        outcome = Outcome.UPSTREAM_ERROR
        ex.error_kind = ErrorKind.MIDSTREAM
        log.debug("upstream %s stream broke: %s", ex.provider, identity.redact_query(exc.detail))
        if spliceable:
            message = f"The {provider.name} API connection broke in the middle of the response."
            call.writing = time.monotonic()
            yield parser.terminator + provider.dialect.stream_error_event(message)
        elif client is not None:
            try:  # gunicorn's next write then fails quietly (ENOTCONN) and it drops the socket
                client.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
    except GeneratorExit:
        outcome = Outcome.CLIENT_ABORTED
        raise
    finally:
        call.writing = time.monotonic()  # the server's last write (the end of the body) follows
        resp.close()
        parser.close()
        ex.meta.estimate_output(chars_per_token)
        ex.finish(outcome)


def finish_on_close(response: Response) -> Response:
    """``after_request``: request id header, the terminal event for unstreamed answers, and
    the end of the call's registration when the server closes the response."""
    response.headers["X-Proxy-Request-ID"] = g.get("request_id", "")
    ex: Exchange | None = g.get("exchange_any")
    if ex is not None:
        ex.status = response.status_code  # whoever answered (upstream, limiter, error handler)
        response.call_on_close(ex.finish)
    call: Call | None = g.get("call")
    if call is not None:
        if not response.is_streamed:  # the server writes it whole from here to the close
            call.writing = time.monotonic()
        response.call_on_close(call.done)
    return response
