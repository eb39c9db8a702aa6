"""Reads model, usage, finish reason and errors off a response body as it streams.

The relay feeds every upstream chunk, exactly as received, to a :class:`ResponseReader`
and calls :meth:`ResponseReader.close` at the end of the body. Reading is incremental and
bounded: compressed bodies are inflated piece by piece, SSE and JSON-array streams are split
by :mod:`.sse` and :mod:`.jsonarray`, a plain JSON body is buffered up to a cap. What the
events mean is the dialect's business: each event or document goes to its usage handler
(``llmproxy/providers/<dialect>.py``), whose cheap byte-substring prefilters decide which are
worth ``json.loads``. Nothing here ever raises to the caller: on malformed input the fields
just stay ``None``.
"""

from __future__ import annotations

import logging
import zlib
from typing import Any, Protocol

from ..exchange import ResponseMeta
from .jsonarray import JSONArraySplitter
from .sse import SSEDecoder

log = logging.getLogger(__name__)

MAX_JSON_BODY = 8 * 1024 * 1024  # a plain JSON body larger than this is not parsed
_INFLATE_PIECE = 256 * 1024  # inflate in bounded pieces: a small gzip chunk can expand a lot

_SSE, _ARRAY, _BODY = 1, 2, 3

#: Content codings this reader decodes; providers are asked for no other (see
#: :func:`readable_accept_encoding`), so no response escapes the usage count.
DECODED_CODINGS = frozenset({"gzip", "x-gzip", "deflate", "identity"})
_WILDCARD_CODINGS = ("gzip", "deflate")


def readable_accept_encoding(value: str) -> str:
    """A client's ``Accept-Encoding`` cut down to the codings this reader decodes.

    Codings the reader cannot inflate (br, zstd, ...) are dropped, ``*`` stands for gzip and
    deflate, and when nothing acceptable is left the answer is ``identity`` (every client
    reads an uncompressed body). Linear in the header's length.
    """
    kept: list[str] = []
    named: set[str] = set()
    wildcard: str | None = None
    for item in value.split(","):
        coding, sep, params = item.strip().partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        weight = _weight(params) if sep else 1.0
        if weight is None:  # unreadable parameters: not an offer the proxy understands
            continue
        named.add(coding)
        if coding == "*":
            wildcard = (f";{params.strip()}" if sep else "") if weight > 0 else None
        elif coding in DECODED_CODINGS and weight > 0:
            kept.append(item.strip())
    if wildcard is not None:
        kept += [c + wildcard for c in _WILDCARD_CODINGS if c not in named]
    return ", ".join(kept) if kept else "identity"


def _weight(params: str) -> float | None:
    """The ``q`` of one Accept-Encoding entry (1 when absent), None when malformed."""
    weight = 1.0
    for param in params.split(";"):
        name, _, val = param.strip().partition("=")
        if name.strip().lower() == "q":
            try:
                weight = float(val.strip())
            except ValueError:
                return None
            if not 0.0 <= weight <= 1.0:
                return None
    return weight


class Handler(Protocol):
    """What a dialect's usage handler takes (see ``providers/base.py``)."""

    def event(self, name: str, data: bytes) -> None: ...

    def element(self, data: bytes) -> None: ...

    def body(self, data: bytes) -> None: ...


class _Nothing:
    def event(self, name: str, data: bytes) -> None:
        pass

    def element(self, data: bytes) -> None:
        pass

    def body(self, data: bytes) -> None:
        pass


class ResponseReader:
    """Incremental, bounded, never-raising reader of one upstream response body."""

    __slots__ = (
        "meta",
        "_handler",
        "_mode",
        "_sse",
        "_array",
        "_body",
        "_inflate",
        "_encoding",
        "_deflate_head",
        "_off",
        "_blind",
    )

    def __init__(self, meta: ResponseMeta, handler: Handler, content_type: str | None,
                 content_encoding: str | None, json_array: bool = False) -> None:
        """``json_array``: a JSON body is a streamed array of documents (the dialect knows)."""
        self.meta = meta
        self._handler = handler
        self._sse: SSEDecoder | None = None
        self._array: JSONArraySplitter | None = None
        self._body: bytearray | None = None
        self._off = False  # parse nothing more (closed, failed, or nothing to parse)
        self._blind = False  # the decoder did not see the whole body: its state is unknown
        mime = (content_type or "").split(";", 1)[0].strip().lower()
        if mime == "text/event-stream":
            self._mode = _SSE
            self._sse = SSEDecoder()
        elif json_array and (not mime or "json" in mime):
            self._mode = _ARRAY
            self._array = JSONArraySplitter()
        elif not mime or "json" in mime:
            self._mode = _BODY
            self._body = bytearray()
        else:  # audio, images, files...: nothing to account for, nothing to hold
            self._mode = 0
            self._off = True
        self._encoding = (content_encoding or "").strip().lower()
        self._deflate_head: bytearray | None = None  # first bytes, until zlib vs raw is known
        self._inflate: Any = None
        if self._encoding in ("gzip", "x-gzip"):
            self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)
        elif self._encoding == "deflate":
            self._inflate = zlib.decompressobj(zlib.MAX_WBITS)
            self._deflate_head = bytearray()
        elif self._encoding not in ("", "identity"):
            self._off = True  # br, zstd...: pass through untouched, but unparsed
            self._blind = True

    @classmethod
    def blind(cls) -> ResponseReader:
        """A reader that reads nothing (used when setting one up failed)."""
        return cls(ResponseMeta(), _Nothing(), "application/octet-stream", None)

    @property
    def at_boundary(self) -> bool:
        """SSE: the body so far ends between events (False when unsure); True otherwise."""
        if self._mode != _SSE:
            return True
        return self._sse is not None and not self._blind and self._sse.at_boundary

    @property
    def terminator(self) -> bytes:
        """SSE: bytes to write before an injected event so it stands alone; else b""."""
        if self._mode != _SSE:
            return b""
        if self._sse is None or self._blind:
            return b"\n\n"  # harmless at a boundary: blank lines dispatch nothing
        return self._sse.terminator

    def feed(self, chunk: bytes) -> None:
        """Account for one chunk of the body, exactly as received from upstream."""
        if self._off or not chunk:
            return
        try:
            if self._inflate is None:
                self._framed(chunk)
            else:
                self._feed_compressed(chunk)
        except Exception:
            self._fail()

    def close(self) -> None:
        """End of body: flush what is pending and parse a buffered JSON body."""
        if self._off:
            return
        try:
            if self._inflate is not None:
                rest = self._inflate.flush()
                if rest:
                    self._framed(rest)
            if self._sse is not None:
                for name, data in self._sse.close():
                    self._handler.event(name, data)
            elif self._body is not None:
                body, self._body = self._body, None
                if body:
                    self._handler.body(bytes(body))
        except Exception:
            self._fail()
        self._off = True

    def _fail(self) -> None:
        # Never log the payload: it is user content.
        log.debug("usage parsing stopped", exc_info=True)
        self._off = True
        self._blind = True
        self._body = None

    def _feed_compressed(self, chunk: bytes) -> None:
        d = self._inflate
        head = self._deflate_head
        if head is None:
            data = d.decompress(chunk, _INFLATE_PIECE)
        else:
            # "deflate" is meant to be zlib-wrapped, but some servers send raw deflate; zlib
            # rejects a bad header within its first two bytes, so only those are kept.
            head += chunk
            try:
                data = d.decompress(chunk, _INFLATE_PIECE)
            except zlib.error:
                d = self._inflate = zlib.decompressobj(-zlib.MAX_WBITS)
                data = d.decompress(bytes(head), _INFLATE_PIECE)
                self._deflate_head = None
            else:
                if len(head) >= 2:
                    self._deflate_head = None
        while True:
            if data:
                self._framed(data)
                if self._off:
                    return
            if d.eof:
                rest = d.unused_data
                if not rest or self._encoding == "deflate":
                    return
                d = self._inflate = zlib.decompressobj(16 + zlib.MAX_WBITS)  # next gzip member
                data = d.decompress(rest, _INFLATE_PIECE)
                continue
            tail = d.unconsumed_tail
            if not tail:
                return
            data = d.decompress(tail, _INFLATE_PIECE)

    def _framed(self, data: bytes) -> None:
        handler = self._handler
        if self._sse is not None:
            for name, payload in self._sse.feed(data):
                handler.event(name, payload)
        elif self._array is not None:
            for element in self._array.feed(data):
                handler.element(element)
        elif self._body is not None:
            if len(self._body) + len(data) > MAX_JSON_BODY:
                self._body = None
                self._off = True  # too big to parse: stop holding it
            else:
                self._body += data
