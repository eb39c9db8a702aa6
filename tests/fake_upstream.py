"""A scriptable fake of the OpenAI, Anthropic and Gemini HTTP APIs for end-to-end tests.

A real HTTP/1.1 server on 127.0.0.1, run in a background thread of the pytest process. It
records every request exactly as it arrived (method, raw request target, headers, body) and
answers like the providers do: JSON bodies, SSE streams with chunked transfer encoding, each
event written (and timestamped) separately so tests can check that the proxy does not buffer.

Tests change its behaviour with :meth:`FakeUpstream.script` (a handler for the next requests)
and :attr:`FakeUpstream.scenario` (the text and token counts the default answers carry).
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import socket
import struct
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

# Bodies above this size are hashed and counted but not kept in memory.
RECORD_BODY_LIMIT = 8 * 1024 * 1024


@dataclass
class Scenario:
    """What the default handlers answer; tests compare what the client saw against it."""

    model: str = "fake-model-1"
    chunks: list[str] = field(default_factory=lambda: ["Hello", ", pro", "xy ", "wor", "ld!"])
    input_tokens: int = 17
    output_tokens: int = 5
    cached_tokens: int = 3
    reasoning_tokens: int = 2
    finish_reason: str = "stop"
    embedding: list[float] = field(default_factory=lambda: [0.25, -0.5, 0.125, 1.0])
    models: list[str] = field(default_factory=lambda: ["fake-model-1", "fake-model-2"])
    request_id: str = "req_fake_upstream_0001"  # sent as x-request-id / request-id

    @property
    def text(self) -> str:
        return "".join(self.chunks)

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass
class Recorded:
    """One request as the fake upstream received it (recorded as soon as its head arrives)."""

    method: str
    target: str  # the raw request target: path and query exactly as sent
    headers: list[tuple[str, str]]
    received_at: float  # time.monotonic() when the request head was parsed
    body: bytes | None = None  # None while reading, or when larger than RECORD_BODY_LIMIT
    body_size: int = 0
    body_sha256: str = ""
    # Set once the body has been read; body_complete says whether it arrived whole (a
    # truncated body, e.g. a connection closed mid-upload, is never answered).
    body_done: threading.Event = field(default_factory=threading.Event)
    # set once the handler has written (and recorded) everything it was going to send
    response_done: threading.Event = field(default_factory=threading.Event)
    body_complete: bool = False
    sent: list[tuple[float, bytes]] = field(default_factory=list)  # (monotonic, bytes) per write
    client_gone: threading.Event = field(default_factory=threading.Event)
    client_gone_at: float | None = None
    compressed: str | None = None  # Content-Encoding used for the response, if any

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for key, value in self.headers:
            if key.lower() == lname:
                return value
        return None

    def header_names(self) -> set[str]:
        return {key.lower() for key, _ in self.headers}

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def json(self) -> Any:
        assert self.body is not None
        return json.loads(self.body) if self.body else None

    def all_sent(self, timeout: float = 5.0) -> list[tuple[float, bytes]]:
        """Every (time, data) written, once the handler is done writing.

        A client can finish reading before the server thread has recorded its last write.
        """
        if not self.response_done.wait(timeout):
            raise AssertionError("the fake upstream is still answering")
        return list(self.sent)

    def sent_time_of(self, needle: bytes) -> float:
        """Monotonic time at which the first write containing ``needle`` was flushed."""
        for when, data in self.sent:
            if needle in data:
                return when
        raise AssertionError(f"{needle!r} was never sent")


class Abort(Exception):
    """Raised inside a handler to stop writing (socket closed on purpose, or client gone)."""


class Reply:
    """The response side of one request, handed to handlers."""

    def __init__(self, handler: _Handler, record: Recorded, fake: FakeUpstream) -> None:
        self._h = handler
        self.record = record
        self.fake = fake
        self.encoding: str | None = None  # "gzip" | "deflate": compress whatever is sent
        # Seconds to wait before a stream write (never the first) that follows a write
        # for which pause_after() is true.
        self.pause: float = 0.0
        self.pause_after: Callable[[bytes], bool] = lambda data: True
        self.abort_after: int | None = None  # close the socket after this many stream writes
        self.interval: float = 0.0  # used by endless streams
        self._chunked = False
        self._compressor: Any = None
        self._writes = 0
        self._pause_next = False
        self.started = False

    # -- complete responses -------------------------------------------------------------
    def send(
        self,
        status: int,
        body: bytes,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str | None = "application/json",
    ) -> None:
        hdrs = list(headers)
        if self.encoding:
            body = _compress(body, self.encoding)
            hdrs.append(("Content-Encoding", self.encoding))
            self.record.compressed = self.encoding
        self._head(status, hdrs, content_type, length=len(body))
        if self.record.method != "HEAD" and body:
            self._raw_write(body)

    def json(self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send(status, json.dumps(obj).encode(), headers)

    # -- streams --------------------------------------------------------------------------
    def start_stream(
        self,
        status: int = 200,
        headers: Iterable[tuple[str, str]] = (),
        content_type: str = "text/event-stream",
    ) -> None:
        hdrs = list(headers)
        if self.encoding:
            hdrs.append(("Content-Encoding", self.encoding))
            self.record.compressed = self.encoding
            wbits = 31 if self.encoding == "gzip" else 15
            self._compressor = zlib.compressobj(6, zlib.DEFLATED, wbits)
        hdrs.append(("Transfer-Encoding", "chunked"))
        self._chunked = True
        self._head(status, hdrs, content_type, length=None)

    def write(self, data: bytes) -> None:
        """Send one chunk now (after the configured pause); raise Abort if the client is gone."""
        if self.abort_after is not None and self._writes >= self.abort_after:
            self.kill()
            raise Abort("scripted mid-stream death")
        if self._pause_next and self.pause:
            self.fake.release.wait(self.pause)
        self._pause_next = self.pause_after(data)
        self._writes += 1
        payload = data
        if self._compressor is not None:
            payload = self._compressor.compress(data) + self._compressor.flush(zlib.Z_SYNC_FLUSH)
        if self._chunked:
            payload = b"%x\r\n%s\r\n" % (len(payload), payload)
        self._raw_write(payload)
        self.record.sent.append((time.monotonic(), data))

    def end(self) -> None:
        tail = b""
        if self._compressor is not None:
            tail = self._compressor.flush(zlib.Z_FINISH)
        out = (b"%x\r\n%s\r\n" % (len(tail), tail) if tail else b"") + b"0\r\n\r\n"
        self._raw_write(out)

    def kill(self) -> None:
        """Close the connection abruptly, mid-response."""
        self._h.close_connection = True
        sock = self._h.connection
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- internals ------------------------------------------------------------------------
    def _head(
        self,
        status: int,
        headers: list[tuple[str, str]],
        content_type: str | None,
        length: int | None,
    ) -> None:
        h = self._h
        h.send_response_only(status)
        names = {k.lower() for k, _ in headers}
        if content_type and "content-type" not in names:
            h.send_header("Content-Type", content_type)
        if length is not None and "content-length" not in names:
            h.send_header("Content-Length", str(length))
        h.send_header("Date", h.date_time_string())
        for key, value in headers:
            h.send_header(key, value)
        h.end_headers()
        self.started = True

    def _raw_write(self, data: bytes) -> None:
        try:
            self._h.wfile.write(data)
            self._h.wfile.flush()
        except OSError as exc:
            self.record.client_gone_at = time.monotonic()
            self.record.client_gone.set()
            self.fake.client_gone.set()
            self._h.close_connection = True
            raise Abort("client gone") from exc


Handler = Callable[[Recorded, Reply], None]


def _compress(body: bytes, encoding: str) -> bytes:
    if encoding == "gzip":
        return gzip.compress(body)
    if encoding == "deflate":
        return zlib.compress(body)
    raise ValueError(encoding)


def sse(data: Any, event: str | None = None, sep: bytes = b"\n\n") -> bytes:
    """One server-sent event; ``data`` is JSON-encoded unless it is already bytes."""
    payload = data if isinstance(data, bytes) else json.dumps(data).encode()
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + payload + sep


# -- provider-shaped bodies ----------------------------------------------------------------

def error_body(provider: str, status: int, message: str) -> dict[str, Any]:
    """An error body in ``provider``'s native shape."""
    if provider == "anthropic":
        kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 429: "rate_limit_error", 529: "overloaded_error"}
        return {"type": "error", "error": {"type": kinds.get(status, "api_error"),
                                           "message": message}}
    if provider == "gemini":
        kinds = {400: "INVALID_ARGUMENT", 401: "UNAUTHENTICATED", 403: "PERMISSION_DENIED",
                 404: "NOT_FOUND", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}
        return {"error": {"code": status, "message": message,
                          "status": kinds.get(status, "INTERNAL")}}
    kinds = {400: "invalid_request_error", 401: "invalid_request_error",
             404: "invalid_request_error", 429: "requests"}
    return {"error": {"message": message, "type": kinds.get(status, "server_error"),
                      "param": None, "code": "fake_" + str(status)}}


def detect_provider(rec: Recorded) -> str:
    """Which provider's dialect a request speaks, judged the way a human reading it would."""
    if rec.header("anthropic-version") or rec.header("x-api-key"):
        return "anthropic"
    path = rec.path
    if rec.header("x-goog-api-key") or "key" in rec.query or path.startswith("/v1beta/") \
            or "/models/" in path and ":" in path.rsplit("/", 1)[-1]:
        return "gemini"
    if path.endswith("/messages") or path.endswith("/messages/count_tokens"):
        return "anthropic"
    return "openai"


class Defaults:
    """The default answers, built from the fake's current :class:`Scenario`."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    @property
    def sc(self) -> Scenario:
        return self.fake.scenario

    def id_headers(self, provider: str) -> list[tuple[str, str]]:
        name = "request-id" if provider == "anthropic" else "x-request-id"
        return [(name, self.sc.request_id)]

    def __call__(self, rec: Recorded, reply: Reply) -> None:
        path = rec.path
        provider = detect_provider(rec)
        if rec.method in ("POST", "PUT") and (path.endswith("/files") or
                                              path.endswith("/uploads")):
            return reply.json(200, {"id": "file-fake", "object": "file",
                                    "bytes": rec.body_size, "sha256": rec.body_sha256})
        body: dict[str, Any] = {}
        if rec.method == "POST" and rec.body:
            try:
                parsed = json.loads(rec.body)
                body = parsed if isinstance(parsed, dict) else {}
            except ValueError:
                reply.json(400, error_body(provider, 400, "could not parse JSON body"),
                           self.id_headers(provider))
                return
        last = path.rsplit("/", 1)[-1]
        if provider == "gemini" and ":" in last:
            method = last.split(":", 1)[1]
            if method == "generateContent":
                return reply.json(200, self.gemini_response(last=True, text=self.sc.text))
            if method == "streamGenerateContent":
                return self.gemini_stream(rec, reply)
            if method == "countTokens":
                return reply.json(200, {"totalTokens": self.sc.input_tokens})
        if rec.method == "POST":
            if path.endswith("/chat/completions"):
                return self.openai_chat(body, reply)
            if path.endswith("/completions"):
                return self.openai_completions(body, reply)
            if path.endswith("/responses"):
                return self.openai_responses(body, reply)
            if path.endswith("/embeddings"):
                return self.openai_embeddings(body, reply)
            if path.endswith("/messages/count_tokens"):
                return reply.json(200, {"input_tokens": self.sc.input_tokens},
                                  self.id_headers("anthropic"))
            if path.endswith("/messages"):
                return self.anthropic_messages(body, reply)
        if rec.method in ("GET", "HEAD") and path.endswith("/models"):
            return self.models(provider, reply)
        reply.json(404, error_body(provider, 404, f"no route for {rec.method} {path}"),
                   self.id_headers(provider))

    # -- OpenAI ---------------------------------------------------------------------------
    def openai_usage(self) -> dict[str, Any]:
        sc = self.sc
        return {"prompt_tokens": sc.input_tokens, "completion_tokens": sc.output_tokens,
                "total_tokens": sc.total_tokens,
                "prompt_tokens_details": {"cached_tokens": sc.cached_tokens},
                "completion_tokens_details": {"reasoning_tokens": sc.reasoning_tokens}}

    def openai_chat(self, body: dict[str, Any], reply: Reply) -> None:
        sc = self.sc
        base = {"id": "chatcmpl-fake", "created": 1700000000, "model": sc.model}
        hdrs = self.id_headers("openai")
        if not body.get("stream"):
            return reply.json(200, {**base, "object": "chat.completion", "choices": [
                {"index": 0, "message": {"role": "assistant", "content": sc.text},
                 "finish_reason": sc.finish_reason}], "usage": self.openai_usage()}, hdrs)
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        base = {**base, "object": "chat.completion.chunk"}
        extra = {"usage": None} if include_usage else {}

        def chunk(delta: dict[str, Any], finish: str | None = None) -> bytes:
            return sse({**base, "choices": [{"index": 0, "delta": delta,
                                             "finish_reason": finish}], **extra})

        reply.start_stream(headers=hdrs)
        reply.write(chunk({"role": "assistant", "content": ""}))
        for piece in sc.chunks:
            reply.write(chunk({"content": piece}))
        reply.write(chunk({}, sc.finish_reason))
        if include_usage:
            reply.write(sse({**base, "choices": [], "usage": self.openai_usage()}))
        reply.write(b"data: [DONE]\n\n")
        reply.end()

    def openai_completions(self, body: dict[str, Any], reply: Reply) -> None:
        sc = self.sc
        base = {"id": "cmpl-fake", "object": "text_completion", "created": 1700000000,
                "model": sc.model}
        usage = {k: v for k, v in self.openai_usage().items() if not k.endswith("_details")}
        if not body.get("stream"):
            return reply.json(200, {**base, "choices": [
                {"index": 0, "text": sc.text, "logprobs": None,
                 "finish_reason": sc.finish_reason}], "usage": usage})
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        reply.start_stream()
        for i, piece in enumerate(sc.chunks):
            finish = sc.finish_reason if i == len(sc.chunks) - 1 else None
            reply.write(sse({**base, "choices": [{"index": 0, "text": piece, "logprobs": None,
                                                  "finish_reason": finish}]}))
        if include_usage:
            reply.write(sse({**base, "choices": [], "usage": usage}))
        reply.write(b"data: [DONE]\n\n")
        reply.end()

    def responses_object(self, status: str, with_output: bool) -> dict[str, Any]:
        sc = self.sc
        output = [{"id": "msg_fake", "type": "message", "role": "assistant",
                   "status": "completed",
                   "content": [{"type": "output_text", "text": sc.text, "annotations": []}]}]
        usage = {"input_tokens": sc.input_tokens, "output_tokens": sc.output_tokens,
                 "total_tokens": sc.total_tokens,
                 "input_tokens_details": {"cached_tokens": sc.cached_tokens},
                 "output_tokens_details": {"reasoning_tokens": sc.reasoning_tokens}}
        return {"id": "resp_fake", "object": "response", "created_at": 1700000000,
                "status": status, "model": sc.model,
                "output": output if with_output else [], "parallel_tool_calls": True,
                "tool_choice": "auto", "tools": [], "temperature": 1.0, "top_p": 1.0,
                "usage": usage if with_output else None}

    def openai_responses(self, body: dict[str, Any], reply: Reply) -> None:
        sc = self.sc
        if not body.get("stream"):
            return reply.json(200, self.responses_object("completed", True),
                              self.id_headers("openai"))
        reply.start_stream(headers=self.id_headers("openai"))
        seq = iter(range(1000))

        def ev(kind: str, **fields: Any) -> bytes:
            return sse({"type": kind, "sequence_number": next(seq), **fields}, event=kind)

        reply.write(ev("response.created", response=self.responses_object("in_progress", False)))
        reply.write(ev("response.in_progress",
                       response=self.responses_object("in_progress", False)))
        item = {"id": "msg_fake", "type": "message", "role": "assistant",
                "status": "in_progress", "content": []}
        reply.write(ev("response.output_item.added", output_index=0, item=item))
        reply.write(ev("response.content_part.added", item_id="msg_fake", output_index=0,
                       content_index=0, part={"type": "output_text", "text": "",
                                              "annotations": []}))
        for piece in sc.chunks:
            reply.write(ev("response.output_text.delta", item_id="msg_fake", output_index=0,
                           content_index=0, delta=piece, logprobs=[]))
        reply.write(ev("response.output_text.done", item_id="msg_fake", output_index=0,
                       content_index=0, text=sc.text, logprobs=[]))
        done = self.responses_object("completed", True)
        reply.write(ev("response.output_item.done", output_index=0, item=done["output"][0]))
        reply.write(ev("response.completed", response=done))
        reply.end()

    def openai_embeddings(self, body: dict[str, Any], reply: Reply) -> None:
        sc = self.sc
        vector: Any = sc.embedding
        if body.get("encoding_format") == "base64":
            vector = base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
        inputs = body.get("input")
        count = len(inputs) if isinstance(inputs, list) and inputs and isinstance(
            inputs[0], str) else 1
        reply.json(200, {"object": "list", "model": sc.model,
                         "data": [{"object": "embedding", "index": i, "embedding": vector}
                                  for i in range(count)],
                         "usage": {"prompt_tokens": sc.input_tokens,
                                   "total_tokens": sc.input_tokens}},
                   self.id_headers("openai"))

    def models(self, provider: str, reply: Reply) -> None:
        sc = self.sc
        if provider == "gemini":
            return reply.json(200, {"models": [
                {"name": f"models/{m}", "displayName": m, "inputTokenLimit": 1000,
                 "supportedGenerationMethods": ["generateContent"]} for m in sc.models]})
        if provider == "anthropic":
            return reply.json(200, {"data": [
                {"type": "model", "id": m, "display_name": m,
                 "created_at": "2025-01-01T00:00:00Z"} for m in sc.models],
                "has_more": False, "first_id": sc.models[0], "last_id": sc.models[-1]},
                self.id_headers("anthropic"))
        reply.json(200, {"object": "list", "data": [
            {"id": m, "object": "model", "created": 1700000000, "owned_by": "fake"}
            for m in sc.models]}, self.id_headers("openai"))

    # -- Anthropic ------------------------------------------------------------------------
    def anthropic_messages(self, body: dict[str, Any], reply: Reply) -> None:
        sc = self.sc
        hdrs = self.id_headers("anthropic")
        finish = "end_turn" if sc.finish_reason == "stop" else sc.finish_reason
        usage = {"input_tokens": sc.input_tokens, "output_tokens": sc.output_tokens,
                 "cache_read_input_tokens": sc.cached_tokens,
                 "cache_creation_input_tokens": 0}
        message = {"id": "msg_fake", "type": "message", "role": "assistant",
                   "model": sc.model, "stop_reason": finish, "stop_sequence": None}
        if not body.get("stream"):
            return reply.json(200, {**message, "content": [{"type": "text", "text": sc.text}],
                                    "usage": usage}, hdrs)
        reply.start_stream(headers=hdrs)
        # message_start reports 1 output token so far; message_delta's count is cumulative,
        # so a consumer that adds them over-counts.
        reply.write(sse({"type": "message_start", "message": {
            **message, "content": [], "stop_reason": None,
            "usage": {**usage, "output_tokens": 1}}}, event="message_start"))
        reply.write(sse({"type": "content_block_start", "index": 0,
                         "content_block": {"type": "text", "text": ""}},
                        event="content_block_start"))
        reply.write(sse({"type": "ping"}, event="ping"))
        for piece in sc.chunks:
            reply.write(sse({"type": "content_block_delta", "index": 0,
                             "delta": {"type": "text_delta", "text": piece}},
                            event="content_block_delta"))
        reply.write(sse({"type": "content_block_stop", "index": 0},
                        event="content_block_stop"))
        reply.write(sse({"type": "message_delta",
                         "delta": {"stop_reason": finish, "stop_sequence": None},
                         "usage": {"output_tokens": sc.output_tokens}}, event="message_delta"))
        reply.write(sse({"type": "message_stop"}, event="message_stop"))
        reply.end()

    # -- Gemini ---------------------------------------------------------------------------
    def gemini_response(self, last: bool, text: str) -> dict[str, Any]:
        sc = self.sc
        cand: dict[str, Any] = {"content": {"role": "model", "parts": [{"text": text}]},
                                "index": 0}
        frame: dict[str, Any] = {"candidates": [cand], "modelVersion": sc.model,
                                 "responseId": "gem_fake"}
        if last:
            cand["finishReason"] = "STOP"
            frame["usageMetadata"] = {
                "promptTokenCount": sc.input_tokens,
                "candidatesTokenCount": sc.output_tokens,
                "thoughtsTokenCount": sc.reasoning_tokens,
                "cachedContentTokenCount": sc.cached_tokens,
                "totalTokenCount": sc.input_tokens + sc.output_tokens + sc.reasoning_tokens,
            }
        return frame

    def gemini_frames(self) -> Iterator[dict[str, Any]]:
        chunks = self.sc.chunks
        for i, piece in enumerate(chunks):
            yield self.gemini_response(last=i == len(chunks) - 1, text=piece)

    def gemini_stream(self, rec: Recorded, reply: Reply) -> None:
        if rec.query.get("alt") == ["sse"]:
            reply.start_stream()
            for frame in self.gemini_frames():
                reply.write(sse(frame, sep=b"\r\n\r\n"))
            return reply.end()
        # Without alt=sse: one JSON array, streamed element by element.
        reply.start_stream(content_type="application/json; charset=UTF-8")
        for i, frame in enumerate(self.gemini_frames()):
            reply.write((b"[" if i == 0 else b"\n,\r\n") + json.dumps(frame, indent=1).encode())
        reply.write(b"]")
        reply.end()


# -- scripted behaviours -------------------------------------------------------------------

def respond(status: int, body: bytes | str | dict[str, Any],
            headers: Iterable[tuple[str, str]] = (),
            content_type: str | None = "application/json") -> Handler:
    """Answer every request with this exact response."""
    raw = json.dumps(body).encode() if isinstance(body, dict) else (
        body.encode() if isinstance(body, str) else body)
    hdrs = list(headers)

    def handler(rec: Recorded, reply: Reply) -> None:
        reply.send(status, raw, hdrs, content_type)
    return handler


def error(provider: str, status: int, message: str = "scripted upstream error",
          headers: Iterable[tuple[str, str]] = ()) -> Handler:
    """Answer with ``status`` and ``provider``'s native error body."""
    return respond(status, error_body(provider, status, message), headers)


class Script:
    """Factories for common per-test behaviours, bound to one fake."""

    def __init__(self, fake: FakeUpstream) -> None:
        self.fake = fake

    def compressed(self, encoding: str = "gzip") -> Handler:
        """The default answer, compressed (streams too, flushed per event)."""
        def handler(rec: Recorded, reply: Reply) -> None:
            reply.encoding = encoding
            self.fake.defaults(rec, reply)
        return handler

    def delayed(self, seconds: float) -> Handler:
        """Wait before sending anything (cut short by reset()), then the default answer."""
        def handler(rec: Recorded, reply: Reply) -> None:
            self.fake.release.wait(seconds)
            self.fake.defaults(rec, reply)
        return handler

    def paused(self, seconds: float, after: Iterable[bytes] | None = None) -> Handler:
        """The default answer, pausing ``seconds`` after every stream write (or only after
        writes containing one of ``after``)."""
        needles = list(after) if after is not None else None

        def handler(rec: Recorded, reply: Reply) -> None:
            reply.pause = seconds
            if needles is not None:
                reply.pause_after = lambda data: any(n in data for n in needles)
            self.fake.defaults(rec, reply)
        return handler

    def dying(self, after: int) -> Handler:
        """The default stream, with the socket closed after ``after`` writes."""
        def handler(rec: Recorded, reply: Reply) -> None:
            reply.abort_after = after
            self.fake.defaults(rec, reply)
        return handler

    def endless(self, provider: str = "openai", interval: float = 0.05,
                count: int = 400) -> Handler:
        """A stream that keeps sending small events until the client goes (or ``count``)."""
        def handler(rec: Recorded, reply: Reply) -> None:
            reply.start_stream()
            for i in range(count):
                if i:
                    self.fake.release.wait(interval)
                if provider == "anthropic":
                    data = sse({"type": "content_block_delta", "index": 0,
                                "delta": {"type": "text_delta", "text": f"t{i} "}},
                               event="content_block_delta")
                elif provider == "gemini":
                    data = sse(self.fake.defaults.gemini_response(False, f"t{i} "),
                               sep=b"\r\n\r\n")
                else:
                    data = sse({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                "created": 1700000000, "model": self.fake.scenario.model,
                                "choices": [{"index": 0, "delta": {"content": f"t{i} "},
                                             "finish_reason": None}]})
                reply.write(data)
            reply.end()
        return handler


# -- the server ----------------------------------------------------------------------------

class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Head and body go out in separate writes; without this, Nagle's algorithm and the
    # client's delayed ACK add 40 ms to every answer, like no real provider does.
    disable_nagle_algorithm = True
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass  # keep pytest output clean; the records are the log

    def _read_body(self) -> tuple[bytes | None, int, str]:
        digest = hashlib.sha256()
        kept = bytearray()
        size = 0

        def take(data: bytes) -> None:
            nonlocal size
            size += len(data)
            digest.update(data)
            if size <= RECORD_BODY_LIMIT:
                kept.extend(data)

        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\n"):  # EOF before the terminating chunk
                    raise ConnectionError("truncated chunked body")
                n = int(line.split(b";", 1)[0].strip(), 16)
                if n == 0:
                    while True:
                        trailer = self.rfile.readline(65537)
                        if not trailer.endswith(b"\n"):
                            raise ConnectionError("truncated chunked body")
                        if trailer in (b"\r\n", b"\n"):
                            break
                    break
                remaining = n
                while remaining:
                    data = self.rfile.read(min(remaining, 1 << 20))
                    if not data:
                        raise ConnectionError("truncated chunked body")
                    take(data)
                    remaining -= len(data)
                if self.rfile.readline(65537) not in (b"\r\n", b"\n"):
                    raise ConnectionError("malformed chunked body")
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                data = self.rfile.read(min(remaining, 1 << 20))
                if not data:
                    raise ConnectionError("truncated body")
                take(data)
                remaining -= len(data)
        return (bytes(kept) if size <= RECORD_BODY_LIMIT else None), size, digest.hexdigest()

    def _serve(self) -> None:
        fake = self.server.fake
        rec = Recorded(self.command, self.path, list(self.headers.items()), time.monotonic())
        fake._add(rec)
        try:
            rec.body, rec.body_size, rec.body_sha256 = self._read_body()
            rec.body_complete = True
        except (OSError, ValueError):
            self.close_connection = True
            return
        finally:
            rec.body_done.set()
        reply = Reply(self, rec, fake)
        try:
            fake._handler_for(rec)(rec, reply)
        except Abort:
            self.close_connection = True
        finally:
            rec.response_done.set()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = do_OPTIONS = _serve


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 256  # the default 5 drops bursts of connections (1 s SYN retries)
    fake: FakeUpstream

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client going away mid-request is normal in these tests


class FakeUpstream:
    """The fake provider API server; start() once, reset() between tests."""

    def __init__(self) -> None:
        self.scenario = Scenario()
        self.defaults = Defaults(self)
        self.scripts = Script(self)
        self.requests: list[Recorded] = []
        self.client_gone = threading.Event()
        self.release = threading.Event()  # set by reset() to end pending waits early
        self._lock = threading.Condition()
        self._handler: Handler | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle --------------------------------------------------------------------------
    def start(self) -> FakeUpstream:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.fake = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fake-upstream", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    def reset(self) -> None:
        """Forget requests and scripts; end any pending delays of the previous test."""
        self.release.set()
        with self._lock:
            self.requests = []
            self._handler = None
            self.scenario = Scenario()
            self.client_gone = threading.Event()
            self.release = threading.Event()

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, the string that must never leak into a client-visible body."""
        return f"127.0.0.1:{self.port}"

    # -- scripting --------------------------------------------------------------------------
    def script(self, handler: Handler) -> None:
        """Answer every following request with ``handler`` until reset()."""
        with self._lock:
            self._handler = handler

    def _handler_for(self, rec: Recorded) -> Handler:
        with self._lock:
            return self._handler or self.defaults

    def _add(self, rec: Recorded) -> None:
        with self._lock:
            self.requests.append(rec)
            self._lock.notify_all()

    def complete_requests(self, settle: float = 0.3) -> list[Recorded]:
        """Requests whose body arrived whole, once the upstream has been idle for ``settle``
        seconds: for asserting that something did NOT reach the upstream, where there is no
        event to wait for (a proxy may still be connecting when the client has its answer)."""
        while True:
            with self._lock:
                count = len(self.requests)
                pending = [r for r in self.requests if not r.body_done.is_set()]
            for rec in pending:
                rec.body_done.wait(5)
            def grew(n: int = count) -> bool:
                return len(self.requests) > n

            with self._lock:
                self._lock.wait_for(grew, settle)
                if len(self.requests) == count:
                    return [r for r in self.requests if r.body_complete]

    # -- inspection -------------------------------------------------------------------------
    def wait_for_requests(self, count: int = 1, timeout: float = 5.0) -> list[Recorded]:
        """Block until at least ``count`` requests arrived; return them all."""
        with self._lock:
            if not self._lock.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"expected {count} upstream requests, got "
                                     f"{len(self.requests)}")
            return list(self.requests)

    @property
    def last(self) -> Recorded:
        with self._lock:
            assert self.requests, "the fake upstream received no request"
            return self.requests[-1]
