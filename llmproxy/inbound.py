"""Inbound: who is calling what. Runs as the first ``before_request`` hook.

For a provider route it builds the request's :class:`~llmproxy.exchange.Exchange`: request
id, the raw target (what is forwarded), the provider, size checks, the credential, the
client IP, what the dialect reads off the body (model, streaming, user, prompt size) and the
user id. Bad requests are answered here (404, 413, 400, 408) before anything is forwarded;
the rate limiter and the relay then work from ``flask.g.exchange``. The call is registered
with the worker's :class:`~llmproxy.inflight.InFlight` (``flask.g.call``) until its response
is closed.
"""

from __future__ import annotations

import re
import time
import uuid
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Response, current_app, g, request

from . import identity
from .errors import error_response
from .exchange import ErrorKind, Exchange, Outcome
from .inflight import BodyTimeout, Call
from .keys.credentials import forward_target
from .observe.telemetry import EXTENSION_KEY as TELEMETRY_KEY
from .providers import Dialect
from .state import get_state
from .upstream import request_headers

_REQUEST_ID_RE = re.compile(r"^[A-Za-z0-9._:\-]{8,128}$")


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


def _body_timeout(ex: Exchange, dialect: Dialect, call: Call, seconds: float) -> Response:
    """408 for a body that did not arrive in time; the connection is closed after it, since
    the rest of the body may still come and must not pass for the next request."""
    ex.status = 408
    ex.error_kind = ErrorKind.BODY_TIMEOUT
    ex.outcome = Outcome.CLIENT_ABORTED
    out = error_response(dialect, 408, f"The request body did not arrive within {seconds:g} s.",
                         request_id=ex.request_id)
    out.call_on_close(call.hang_up)
    return out


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
                                  _listeners=tuple(state.other_listeners))
        return None
    view_args = request.view_args or {}
    path_user = view_args.get("user_id")
    segments = 3 if path_user is not None else 1
    rest = _strip_prefix(target, segments)
    dialect = provider.dialect
    ex = Exchange(rid, request.method, path_for_log, provider=provider.name,
                  dialect=dialect.name, _listeners=tuple(state.listeners))
    g.exchange_any = ex
    call = g.call = state.inflight.add(ex, request.environ.get("gunicorn.socket"))
    if target.split("/", segments + 1)[segments] != provider.name:
        # Routing saw the decoded path; the raw one is forwarded. An encoded prefix
        # ("/openai%2Fv1/...") would make the two disagree on where <rest> starts.
        ex.status = 404
        return error_response(dialect, 404, "Unknown route.", request_id=rid)
    headers = request.headers
    # The credential is read off exactly what is forwarded: a header the client names in
    # Connection: is dropped, so it must not be the one that limits and records count.
    forwarded = request_headers(headers.items())
    try:
        ex.api_key = identity.api_key(forwarded, rest.partition("?")[2],
                                      dialect.credential_headers, dialect.credential_params)
    except identity.CredentialConflict:
        ex.status = 400
        ex.error_kind = ErrorKind.CREDENTIAL_CONFLICT
        return error_response(dialect, 400, "The request carries two different credentials; "
                              "send one.", request_id=rid)
    query = request.query_string.decode("latin-1")
    if ex.api_key:
        ex.key_fingerprint = identity.fingerprint(ex.api_key)
    keys = state.keys  # set for auth.mode keys|mixed: proxy keys (llmproxy/keys/guard.py)
    proxy_key = keys.authenticate(ex, dialect, headers, query) if keys is not None else None
    if isinstance(proxy_key, Response):
        return proxy_key
    if proxy_key is not None:  # forwarded without it: the relay adds the provider's own key
        rest = forward_target(rest, dialect.credential_params)
    ex.client_ip = identity.client_ip(request.remote_addr, headers.get("X-Forwarded-For"),
                                      state.settings.server.trusted_proxies)
    url = provider.upstream_url(rest)
    if url is None:
        ex.status = 404
        return error_response(dialect, 404, "Unknown or unsafe path.", request_id=rid)
    ex.upstream_path = rest
    length = request.content_length
    settings = state.settings.server
    if length is not None and length > settings.max_body_bytes:
        ex.status = 413
        ex.error_kind = ErrorKind.TOO_LARGE
        return error_response(dialect, 413, f"Request body larger than "
                              f"{settings.max_body_bytes} bytes.", request_id=rid)
    body: bytes | None = None
    if length and length <= settings.inspect_max_bytes:
        call.reading = time.monotonic()  # the whole body within server.body_timeout
        try:
            body = request.get_data(cache=True)
        except BodyTimeout:
            return _body_timeout(ex, dialect, call, settings.body_timeout)
        finally:
            call.reading = 0.0
        if len(body) < length:
            # gunicorn ends the body at EOF without an error: the client left mid-upload.
            # Forwarding it would hand the provider a truncated request posing as whole.
            ex.status = 400
            ex.error_kind = ErrorKind.CLIENT_GONE
            ex.outcome = Outcome.CLIENT_ABORTED
            return error_response(dialect, 400, "Incomplete request body.",
                                  request_id=rid)
        ex.request_bytes = length
    elif length:
        ex.request_bytes = length
        ex.body_uninspected = not _multipart(headers)
    elif _chunked_only(headers.get("Transfer-Encoding")):
        # No length to go by: read up to the inspection cap. A body that ends within it is
        # inspected (and forwarded with a length) like any other; a longer one streams on
        # from what was read.
        cap = min(settings.inspect_max_bytes, settings.max_body_bytes)
        call.reading = time.monotonic()  # the head within server.body_timeout, like a body
        try:
            head = request.stream.read(cap + 1)
        except BodyTimeout:
            return _body_timeout(ex, dialect, call, settings.body_timeout)
        except Exception:  # malformed chunking, or the client left mid-upload
            ex.status = 400
            ex.error_kind = ErrorKind.CLIENT_READ
            return error_response(dialect, 400, "Could not read the request body.",
                                  request_id=rid)
        finally:
            call.reading = 0.0
        if len(head) <= cap:
            body = head
            ex.request_bytes = len(body)
        elif len(head) > settings.max_body_bytes:
            ex.status = 413
            ex.error_kind = ErrorKind.TOO_LARGE
            return error_response(dialect, 413, f"Request body larger than "
                                  f"{settings.max_body_bytes} bytes.", request_id=rid)
        else:
            g.body_head = head
            ex.request_bytes = len(head)  # at least: the estimate's floor until the end
            ex.body_uninspected = not _multipart(headers)
    path, _, query = rest.partition("?")
    info = dialect.inspect(request.method, path, query, headers, body)
    ex.request_info = info
    ex.model = info.model
    ex.streaming = info.streaming
    ex.user, ex.user_source = identity.resolve_user(path_user, headers, info.user, query,
                                                     ex.client_ip, ex.key_fingerprint,
                                                     settings.user_sources)
    if proxy_key is not None and keys is not None:
        refused = keys.authorize(ex, proxy_key)
        if refused is not None:
            return refused
    g.exchange = ex
    g.upstream_url = url
    g.upstream_headers = forwarded
    g.body = body
    tracing = current_app.extensions.get(TELEMETRY_KEY)
    if tracing is not None:  # telemetry on: the call is identified, its span starts
        ex.span = tracing.start(ex, headers)
    return None


def _chunked_only(transfer_encoding: str | None) -> bool:
    """Chunked and nothing else: other codings are refused by the relay (501), unread."""
    if not transfer_encoding:
        return False
    codings = [c.strip().lower() for c in transfer_encoding.split(",")]
    return [c for c in codings if c] == ["chunked"]


def _multipart(headers: Any) -> bool:
    """Form uploads (files, audio): not JSON, so never inspected whatever their size."""
    ctype = headers.get("Content-Type") or ""
    return bool(ctype.lower().lstrip().startswith("multipart/form-data"))


