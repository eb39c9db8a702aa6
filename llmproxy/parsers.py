"""Usage parsers: read model, usage, finish reason and errors off a response as it streams.

The relay feeds every upstream chunk, exactly as received, to a :class:`ResponseParser`
made by :func:`make_parser`, and calls :meth:`ResponseParser.close` at the end of the body.
Parsing is incremental and bounded: compressed bodies are inflated piece by piece, SSE and
JSON-array streams are split by :mod:`llmproxy.sse` and :mod:`llmproxy.jsonarray`, a plain
JSON body is buffered up to a cap. Cheap byte-substring prefilters decide which events are
worth ``json.loads`` (false positives only cost time; there are no false negatives), so
the text deltas that make up almost all of a stream are never decoded. Nothing here ever
raises to the caller: on malformed input the fields just stay ``None``.

Field meanings (see "Usage accounting" in README.md): ``output_tokens`` includes
reasoning tokens for every provider (Gemini's ``thoughtsTokenCount`` is added to
``candidatesTokenCount``); ``cached_tokens`` is part of ``input_tokens`` for OpenAI and
Gemini but separate from it for Anthropic, whose ``input_tokens`` is kept as reported and
whose ``total_tokens`` is input + cache creation + cache read + output.
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from typing import Any

from .jsonarray import JSONArraySplitter
from .sse import SSEDecoder
from .usage import ResponseMeta, Usage

log = logging.getLogger(__name__)

MAX_JSON_BODY = 8 * 1024 * 1024  # a plain JSON body larger than this is not parsed
_INFLATE_PIECE = 256 * 1024  # inflate in bounded pieces: a small gzip chunk can expand a lot
_MAX_ERROR_CHARS = 1000
_MODEL_PROBES = 3  # events parsed unconditionally at the start, to learn model and id

_SSE, _ARRAY, _BODY = 1, 2, 3


def make_parser(
    dialect: str, path: str, content_type: str | None, content_encoding: str | None
) -> ResponseParser:
    """A parser for one upstream response; never raises."""
    try:
        return ResponseParser(dialect, path, content_type, content_encoding)
    except Exception:  # a bug here must not break the proxy: parse nothing instead
        log.warning("usage parser setup failed", exc_info=True)
        return ResponseParser("openai", "", "application/octet-stream", None)


# --------------------------------------------------------------------------- helpers


def _int(value: object) -> int | None:
    """A token count, or None for anything that is not a non-negative integer."""
    if type(value) is int:
        return value if value >= 0 else None
    if isinstance(value, float) and value.is_integer() and value >= 0:
        return int(value)
    return None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None


def _error_message(err: object) -> str | None:
    """The human-readable message of an error object (OpenAI, Anthropic or Gemini shape)."""
    if isinstance(err, str):
        msg: str | None = err
    elif isinstance(err, dict):
        msg = _str(err.get("message")) or _str(err.get("code")) or _str(err.get("type"))
        if msg is None and err:
            msg = "error"
    else:
        msg = None
    return msg[:_MAX_ERROR_CHARS] if msg else None


def _keep(target: object, attr: str, value: object) -> None:
    """Set ``attr`` unless ``value`` is None: a later frame that omits a field keeps the
    value an earlier frame gave."""
    if value is not None:
        setattr(target, attr, value)


# ---------------------------------------------------------------------------- dialects


class _Handler:
    """Turns decoded events / JSON documents of one dialect into ResponseMeta fields."""

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
        self.apply(_loads(data))

    def apply(self, obj: Any) -> None:
        raise NotImplementedError

    def _probe(self) -> bool:
        """Parse the first events regardless of content until the model is known."""
        if self.meta.model is None and self.probes < _MODEL_PROBES:
            self.probes += 1
            return True
        return False


# An OpenAI chunk is worth parsing only for a non-null usage or finish_reason, or an error.
# Text deltas escape their quotes (\"usage\"), so generated text cannot match these keys.
_OPENAI_INTERESTING = re.compile(rb'"(?:usage|finish_reason)"\s*:\s*(?!null)|"error"')


class _OpenAI(_Handler):
    """Chat completions, legacy completions, Responses API, embeddings (and compatibles)."""

    __slots__ = ("embeddings",)

    def __init__(self, meta: ResponseMeta, embeddings: bool) -> None:
        super().__init__(meta)
        self.embeddings = embeddings

    def event(self, name: str, data: bytes) -> None:
        if data == b"[DONE]":
            return
        if name == "error" or _OPENAI_INTERESTING.search(data) is not None or self._probe():
            self.apply(_loads(data))

    def element(self, data: bytes) -> None:
        self.event("", data)

    def apply(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        meta = self.meta
        inner = obj.get("response")  # Responses API stream events wrap the response object
        if isinstance(inner, dict):
            self._apply_object(inner)
        self._apply_object(obj)
        if obj.get("type") == "error":  # Responses API "error" event: message at top level
            meta.error = _error_message(obj) or meta.error

    def _apply_object(self, obj: dict[str, Any]) -> None:
        meta = self.meta
        _keep(meta, "model", _str(obj.get("model")))
        _keep(meta, "response_id", _str(obj.get("id")))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict):
                    reason = _str(choice.get("finish_reason"))
                    if reason is not None:
                        meta.finish_reason = reason
                        break
        if obj.get("object") == "response":
            # Responses API: why it stopped is the incomplete reason, else its final status.
            details = obj.get("incomplete_details")
            reason = _str(details.get("reason")) if isinstance(details, dict) else None
            status = _str(obj.get("status"))
            if reason is not None:
                meta.finish_reason = reason
            elif status is not None and status not in ("queued", "in_progress"):
                meta.finish_reason = status
        err = obj.get("error")
        if err is not None:
            meta.error = _error_message(err) or meta.error

    def _usage(self, raw: dict[str, Any]) -> None:
        u = self.meta.usage
        inp = _int(raw.get("prompt_tokens"))
        if inp is None:
            inp = _int(raw.get("input_tokens"))
        out = _int(raw.get("completion_tokens"))
        if out is None:
            out = _int(raw.get("output_tokens"))
        total = _int(raw.get("total_tokens"))
        details = raw.get("prompt_tokens_details") or raw.get("input_tokens_details")
        cached = _int(details.get("cached_tokens")) if isinstance(details, dict) else None
        details = raw.get("completion_tokens_details") or raw.get("output_tokens_details")
        reasoning = _int(details.get("reasoning_tokens")) if isinstance(details, dict) else None
        if inp is not None:
            u.input_tokens = inp
        if out is not None:
            u.output_tokens = out
        elif self.embeddings and inp is not None:
            u.output_tokens = 0  # embeddings generate no tokens; 0, not "unknown"
        if total is not None:
            u.total_tokens = total
        elif u.input_tokens is not None and u.output_tokens is not None:
            u.total_tokens = u.input_tokens + u.output_tokens
        if cached is not None:
            u.cached_tokens = cached
        if reasoning is not None:
            u.reasoning_tokens = reasoning


_ANTHROPIC_TYPE = re.compile(rb'\s*\{\s*"type"\s*:\s*"([a-z_]+)"')


class _Anthropic(_Handler):
    """Messages (JSON and SSE) and count_tokens."""

    __slots__ = ("count",)

    def __init__(self, meta: ResponseMeta, count: bool) -> None:
        super().__init__(meta)
        self.count = count

    def event(self, name: str, data: bytes) -> None:
        if not name:  # a server that omits "event:" lines: the type leads the payload
            m = _ANTHROPIC_TYPE.match(data)
            name = m.group(1).decode() if m else ""
        if name == "message_start":
            obj = _loads(data)
            if isinstance(obj, dict):
                self.apply(obj.get("message"))
        elif name == "message_delta":
            obj = _loads(data)
            if isinstance(obj, dict):
                delta = obj.get("delta")
                if isinstance(delta, dict):
                    _keep(self.meta, "finish_reason", _str(delta.get("stop_reason")))
                usage = obj.get("usage")
                if isinstance(usage, dict):
                    self._usage(usage)
        elif name == "error":
            obj = _loads(data)
            if isinstance(obj, dict):
                self.meta.error = _error_message(obj.get("error")) or _error_message(obj)
        # ping, content_block_*, message_stop carry nothing the proxy records.

    def element(self, data: bytes) -> None:
        self.body(data)

    def apply(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        meta = self.meta
        if obj.get("type") == "error":
            meta.error = _error_message(obj.get("error")) or _error_message(obj)
            return
        if self.count:
            _keep(meta.usage, "input_tokens", _int(obj.get("input_tokens")))
            return
        _keep(meta, "model", _str(obj.get("model")))
        _keep(meta, "response_id", _str(obj.get("id")))
        _keep(meta, "finish_reason", _str(obj.get("stop_reason")))
        usage = obj.get("usage")
        if isinstance(usage, dict):
            self._usage(usage)

    def _usage(self, raw: dict[str, Any]) -> None:
        # Every field is a running value: the last non-null one wins (never add them up).
        u = self.meta.usage
        for key, attr in (
            ("input_tokens", "input_tokens"),
            ("output_tokens", "output_tokens"),
            ("cache_creation_input_tokens", "cache_creation_tokens"),
            ("cache_read_input_tokens", "cached_tokens"),
        ):
            value = _int(raw.get(key))
            if value is not None:
                setattr(u, attr, value)
        _anthropic_total(u)


def _anthropic_total(u: Usage) -> None:
    """Anthropic reports no total: it is what is billed, input + cache + output."""
    if u.input_tokens is None and u.output_tokens is None:
        return
    u.total_tokens = (
        (u.input_tokens or 0)
        + (u.cache_creation_tokens or 0)
        + (u.cached_tokens or 0)
        + (u.output_tokens or 0)
    )


class _Gemini(_Handler):
    """generateContent, streamGenerateContent (SSE and JSON array) and countTokens."""

    __slots__ = ("count",)

    def __init__(self, meta: ResponseMeta, count: bool) -> None:
        super().__init__(meta)
        self.count = count

    def element(self, data: bytes) -> None:
        if (
            b"usageMetadata" in data
            or b"finishReason" in data
            or b'"error"' in data
            or b"blockReason" in data
            or self._probe()
        ):
            self.apply(_loads(data))

    def apply(self, obj: Any) -> None:
        if not isinstance(obj, dict):
            return
        meta = self.meta
        if "error" in obj:
            meta.error = _error_message(obj.get("error")) or meta.error
        if self.count:
            _keep(meta.usage, "input_tokens", _int(obj.get("totalTokens")))
            _keep(meta.usage, "cached_tokens", _int(obj.get("cachedContentTokenCount")))
            return
        _keep(meta, "model", _str(obj.get("modelVersion")))
        _keep(meta, "response_id", _str(obj.get("responseId")))
        candidates = obj.get("candidates")
        if isinstance(candidates, list) and candidates and isinstance(candidates[0], dict):
            _keep(meta, "finish_reason", _str(candidates[0].get("finishReason")))
        feedback = obj.get("promptFeedback")
        if isinstance(feedback, dict):  # a blocked prompt has no candidates, only this
            _keep(meta, "finish_reason", _str(feedback.get("blockReason")))
        usage = obj.get("usageMetadata")
        if isinstance(usage, dict):
            self._usage(usage)

    def _usage(self, raw: dict[str, Any]) -> None:
        u = self.meta.usage
        prompt = _int(raw.get("promptTokenCount"))
        candidates = _int(raw.get("candidatesTokenCount"))
        thoughts = _int(raw.get("thoughtsTokenCount"))
        total = _int(raw.get("totalTokenCount"))
        cached = _int(raw.get("cachedContentTokenCount"))
        if prompt is not None:
            u.input_tokens = prompt
        if candidates is not None or thoughts is not None:
            # Thinking is billed as output; keep output_tokens meaning "all generated tokens".
            u.output_tokens = (candidates or 0) + (thoughts or 0)
        if thoughts is not None:
            u.reasoning_tokens = thoughts
        if total is not None:
            u.total_tokens = total
        if cached is not None:
            u.cached_tokens = cached


# ------------------------------------------------------------------------------ parser


class ResponseParser:
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

    def __init__(
        self, dialect: str, path: str, content_type: str | None, content_encoding: str | None
    ) -> None:
        self.meta = ResponseMeta()
        route, _, query = path.partition("?")
        route = route.rstrip("/")
        handler: _Handler
        if dialect == "anthropic":
            handler = _Anthropic(self.meta, count=route.endswith("/count_tokens"))
        elif dialect == "gemini":
            handler = _Gemini(self.meta, count=route.endswith(":countTokens"))
        else:
            handler = _OpenAI(self.meta, embeddings=route.endswith("/embeddings"))
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
        elif (
            dialect == "gemini"
            and ":streamGenerateContent" in route
            and "alt=sse" not in query.split("&")
            and (not mime or "json" in mime)
        ):
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
