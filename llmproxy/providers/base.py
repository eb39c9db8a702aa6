"""What every provider shares: a route forwarding to a base URL, and the Dialect interface.

A :class:`Provider` is one configured route (``/<name>/<rest>`` -> ``<base_url><rest>``); its
:class:`Dialect` is the wire format it speaks. Everything that differs between wire formats
lives in the dialect's own module (``openai.py``, ``anthropic.py``, ``gemini.py``): how a
request is inspected, how usage is read off a response, the error shape, where the SDKs put
the credential, and what the token counts mean. Nothing here may raise on hostile input.
"""

from __future__ import annotations

import json
import logging
import re
import sys
from collections.abc import Iterable
from typing import Any, ClassVar, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

from flask import Blueprint

from ..exchange import RequestInfo, ResponseMeta, Usage
from ..streams.reader import ResponseReader

log = logging.getLogger(__name__)

# Characters never allowed in a forwarded path: controls, space, backslash (some servers
# treat it as '/'), and their percent-encoded forms.
_BAD_PATH_RE = re.compile(r"[\x00-\x20\x7f\\]|%(?:0[0-9a-f]|1[0-9a-f]|5c|7f)", re.IGNORECASE)
_MAX_ERROR_CHARS = 1000
_MODEL_PROBES = 3  # events parsed unconditionally at the start, to learn model and id


class HeadersLike(Protocol):
    """A plain ``Mapping[str, str]`` or werkzeug's ``Headers`` (not a Mapping for mypy)."""

    def get(self, key: str, /) -> str | None: ...

    def items(self) -> Iterable[tuple[str, str]]: ...


# ------------------------------------------------------------ helpers for dialect modules


def count(value: object) -> int | None:
    """A token count, or None for anything that is not a non-negative integer."""
    if type(value) is int:
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


#: The largest output cap a request is taken to ask for, whatever larger number it writes:
#: the APIs' own int32 bound (Gemini's ``maxOutputTokens`` is an int32), far above any model's
#: output window. With :data:`MAX_CHOICES` it keeps what the limiter and the budgets hold for a
#: call under 2**38 tokens: finite and exact in their float and Lua arithmetic.
MAX_OUTPUT_TOKENS = 2**31 - 1
#: The most completions one request is taken to ask for at once (OpenAI's own bound on ``n``;
#: ``best_of`` stops at 20, Gemini's ``candidateCount`` at 8).
MAX_CHOICES = 128


def output_cap(value: object) -> int | None:
    """An output cap: a non-negative JSON integer (the APIs take no floats), at most
    :data:`MAX_OUTPUT_TOKENS`; None for anything else."""
    return min(value, MAX_OUTPUT_TOKENS) if type(value) is int and value >= 0 else None


def choices(value: object) -> int:
    """Completions asked for at once: a JSON integer from 1 to :data:`MAX_CHOICES`; 1 for
    anything else."""
    return min(value, MAX_CHOICES) if type(value) is int and value > 1 else 1


def text(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def loads(data: bytes | None) -> Any:
    """Parsed JSON, or None for anything that is not JSON (never raises)."""
    if not data:
        return None
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def first(doc: dict[str, Any], *keys: str) -> Any:
    """The first of ``keys`` that ``doc`` holds a non-null value for."""
    for key in keys:
        value = doc.get(key)
        if value is not None:
            return value
    return None


def header(headers: HeadersLike, name: str) -> str | None:
    """A header by lower-case name, from werkzeug's Headers or a plain dict."""
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; werkzeug's Headers are not
        for key, val in headers.items():
            if isinstance(key, str) and key.lower() == name:
                return val if isinstance(val, str) else None
    return value if isinstance(value, str) else None


def error_message(err: object) -> str | None:
    """The human-readable message of an error object (OpenAI, Anthropic or Gemini shape)."""
    if isinstance(err, str):
        msg: str | None = err
    elif isinstance(err, dict):
        msg = text(err.get("message")) or text(err.get("code")) or text(err.get("type"))
        if msg is None and err:
            msg = "error"
    else:
        msg = None
    return msg[:_MAX_ERROR_CHARS] if msg else None


def keep(target: object, attr: str, value: object) -> None:
    """Set ``attr`` unless ``value`` is None: a later frame that omits a field keeps the
    value an earlier frame gave."""
    if value is not None:
        setattr(target, attr, value)


def parts_chars(content: object, nested: bool = False) -> int:
    """Text in a string, or in a list of parts/blocks that carry "text" (any part type)."""
    if isinstance(content, str):
        return len(content)
    total = 0
    if isinstance(content, list):
        for part in content:
            if isinstance(part, str):
                total += len(part)
            elif isinstance(part, dict):
                value = part.get("text")
                if isinstance(value, str):
                    total += len(value)
                elif not nested and part.get("type") == "tool_result":
                    # Anthropic tool results nest their text blocks exactly one level down.
                    total += parts_chars(part.get("content"), nested=True)
    return total


# A JSON string's body, up to its closing quote. Possessive (Python >= 3.11): an unterminated
# value then fails at once instead of backtracking through a stack as long as itself.
_STRING_BODY = (rb'([^"\\]*+(?:\\.[^"\\]*+)*+)"' if sys.version_info >= (3, 11)
                else rb'([^"\\]*(?:\\.[^"\\]*)*)"')


def text_fields(*keys: str) -> re.Pattern[bytes]:
    """A pattern for the string values of ``keys`` in a JSON document (group 1: the value,
    still escaped). Generated text escapes its quotes, so it cannot fake a key."""
    names = "|".join(re.escape(k) for k in keys).encode()
    return re.compile(rb'"(?:' + names + rb')"\s*:\s*"' + _STRING_BODY)


def relayed_text(fields: re.Pattern[bytes], data: bytes) -> int:
    """Bytes of generated text (still JSON-escaped) in one stream event, found by a scan of
    its bytes in C, not by parsing it: text deltas are most of a stream, and are otherwise
    never parsed."""
    total = 0
    for match in fields.finditer(data):
        total += match.end(1) - match.start(1)
    return total


def accepts_event_stream(headers: HeadersLike) -> bool:
    accept = header(headers, "accept")
    return accept is not None and "text/event-stream" in accept.lower()


def query_has(query: str, name: str, value: str) -> bool:
    return (name, value) in parse_qsl(query)


# ------------------------------------------------------------------------------ dialects


class UsageHandler:
    """Turns one response's decoded events or JSON documents into :class:`ResponseMeta`."""

    __slots__ = ("meta", "probes")

    def __init__(self, meta: ResponseMeta) -> None:
        self.meta = meta
        self.probes = 0  # events parsed without a prefilter hit

    def event(self, name: str, data: bytes) -> None:
        """One SSE event."""
        self.element(data)

    def element(self, data: bytes) -> None:
        """One streamed JSON document (SSE data or JSON-array element)."""
        raise NotImplementedError

    def body(self, data: bytes) -> None:
        """A complete, non-streamed JSON body."""
        self.apply(loads(data))

    def apply(self, obj: Any) -> None:
        raise NotImplementedError

    def _probe(self) -> bool:
        """Parse the first events regardless of content until the model is known."""
        if self.meta.model is None and self.probes < _MODEL_PROBES:
            self.probes += 1
            return True
        return False


class Dialect:
    """One wire format. Subclasses own everything that differs between providers."""

    name: ClassVar[str]
    #: Request headers that carry the caller's provider credential, in the SDKs' order.
    credential_headers: ClassVar[tuple[str, ...]] = ("Authorization",)
    #: Query parameters that carry it (Gemini's ``?key=``).
    credential_params: ClassVar[tuple[str, ...]] = ()
    #: HTTP status -> this dialect's error type (``type`` or ``status`` field).
    error_types: ClassVar[dict[int, str]] = {}
    default_error_type: ClassVar[str] = "api_error"

    def credential_header(self, key: str) -> tuple[str, str]:
        """The header (name, value) in which this provider expects its own API key."""
        return "Authorization", f"Bearer {key}"

    def inspect(self, method: str, path: str, query: str, headers: HeadersLike,
                body: bytes | None) -> RequestInfo:
        """Model, streaming, user and prompt size; ``body`` is None when not inspected."""
        try:
            return self._inspect(method.upper(), path, query, headers, body)
        except Exception:  # a bug in inspection must never fail a request
            return RequestInfo()

    def _inspect(self, method: str, path: str, query: str, headers: HeadersLike,
                 body: bytes | None) -> RequestInfo:
        raise NotImplementedError

    def usage_handler(self, meta: ResponseMeta, route: str) -> UsageHandler:
        """The handler reading usage off a response to ``route`` (path without query)."""
        raise NotImplementedError

    def json_array_stream(self, route: str, query: str) -> bool:
        """Whether a JSON response to this route is a streamed JSON array."""
        return False

    def error_type(self, status: int) -> str:
        return self.error_types.get(status, self.default_error_type)

    def error_payload(self, status: int, message: str, code: str | None) -> object:
        raise NotImplementedError

    def error_body(self, status: int, message: str, code: str | None = None) -> bytes:
        """The JSON error body this provider would send for ``status``."""
        return json.dumps(self.error_payload(status, message, code),
                          separators=(",", ":")).encode()

    def quota_error_body(self, message: str) -> bytes:
        """The 429 body this provider sends when an account's money has run out."""
        return self.error_body(429, message, "insufficient_quota")

    def stream_error_event(self, message: str) -> bytes:
        """An SSE event the SDKs raise on, for a failure in the middle of a stream."""
        return b"data: " + self.error_body(502, message, "upstream_stream_error") + b"\n\n"

    def normalized_tokens(self, usage: Usage) -> dict[str, int]:
        """Token counts with one meaning across dialects (see docs/observability.md).

        ``input`` is the whole prompt (cached and cache-written tokens included), ``output``
        everything generated (reasoning included); ``cached``, ``cache_creation`` and
        ``reasoning`` are parts of those. Counts not reported are 0.
        """
        input_ = usage.input_tokens or 0
        cached = usage.cached_tokens or 0
        return {"input": input_, "output": usage.output_tokens or 0,
                "cached": min(cached, input_), "cache_creation": usage.cache_creation_tokens or 0,
                "reasoning": usage.reasoning_tokens or 0}

    def is_token_count(self, route: str) -> bool:
        """A free token-counting route: its ``input_tokens`` is a measurement, not usage."""
        return False

    #: Route endings -> the GenAI ``gen_ai.operation.name`` (first match wins); the values
    #: of the OpenTelemetry conventions, plus ``count_tokens`` for free token counts.
    operations: ClassVar[tuple[tuple[str, str], ...]] = ()

    def operation(self, route: str) -> str:
        """The GenAI operation of ``route`` (a path without query), ``other`` when none."""
        for ending, name in self.operations:
            if route.endswith(ending):
                return name
        return "other"


class Provider:
    """A provider route: ``/<name>/<rest>`` forwarded to ``<base_url><rest>``."""

    def __init__(self, name: str, base_url: str, dialect: Dialect,
                 api_key: str | None = None) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.dialect = dialect
        #: What the proxy sends for calls made with a proxy key: the provider's own key in
        #: its native header; None when no key is configured (e.g. a local server).
        self.credential = dialect.credential_header(api_key) if api_key else None
        parts = urlsplit(self.base_url)
        self._scheme = parts.scheme
        self._netloc = parts.netloc

    def upstream_url(self, rest: str) -> str | None:
        """``base_url + rest`` if ``rest`` cannot leave the base URL, else ``None``.

        ``rest`` is the raw request target after the route prefix (path and query,
        still percent-encoded). Dot segments are refused even when encoded, because the
        HTTP client would resolve them and climb out of the base path.
        """
        path, sep, query = rest.partition("?")
        if not path.startswith("/") or path.startswith("//") or _BAD_PATH_RE.search(path):
            return None
        for segment in path.split("/"):
            if "." in segment or "%" in segment:
                decoded = segment
                for _ in range(3):  # %252e%252e is as dangerous as %2e%2e after decoding
                    decoded = unquote(decoded)
                if "\\" in decoded or any(p in (".", "..") for p in decoded.split("/")):
                    return None
        if any(c in query for c in "\x00\r\n\\ #"):
            return None
        url = self.base_url + path + sep + query
        parts = urlsplit(url)
        if parts.scheme != self._scheme or parts.netloc != self._netloc:
            return None
        return url

    def reader(self, path: str, content_type: str | None,
               content_encoding: str | None) -> ResponseReader:
        """A usage reader for one response to ``path`` (path and query, as forwarded)."""
        return response_reader(self.dialect, path, content_type, content_encoding)

    def blueprint(self, view: Any) -> Blueprint:
        """One blueprint per provider; register it under ``/<name>`` and ``/meta/<user>/<name>``."""
        bp = Blueprint(self.name, __name__)
        bp.add_url_rule("/<path:rest>", "proxy", view,
                        methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
        return bp


def response_reader(dialect: Dialect, path: str, content_type: str | None,
                    content_encoding: str | None) -> ResponseReader:
    """A reader feeding ``dialect``'s usage handler; never raises."""
    try:
        route, _, query = path.partition("?")
        route = route.rstrip("/")
        meta = ResponseMeta()
        return ResponseReader(meta, dialect.usage_handler(meta, route), content_type,
                              content_encoding, dialect.json_array_stream(route, query))
    except Exception:  # a bug here must not break the proxy: read nothing instead
        log.warning("usage reader setup failed", exc_info=True)
        return ResponseReader.blind()
