"""A fast fake LLM upstream for the benchmarks: raw HTTP/1.1 on asyncio, loopback only.

Routes (what llmproxy forwards ``/openai/<rest>``, ``/anthropic/<rest>``, ``/gemini/<rest>`` to):

- ``POST /v1/chat/completions``: OpenAI chat JSON, or SSE when the body has ``"stream": true``
  (an ``include_usage`` chunk is added when the body mentions ``include_usage``, then ``[DONE]``).
- ``POST /v1/messages``: Anthropic JSON, or SSE when the body has ``"stream": true``.
- ``POST /v1beta/models/<m>:generateContent`` (also ``/v1/``): Gemini JSON;
  ``...:streamGenerateContent?alt=sse``: Gemini SSE (``\\r\\n\\r\\n``-separated frames, no [DONE]).
- ``POST /v1/files`` (or any path ending in ``/upload``): drains a body of any size, answers
  ``{"received": <bytes>}``.
- ``GET /health``: 200.

Every stream is shaped per request by headers (or query parameters of the same name without the
``x-bench-`` prefix and with ``_`` for ``-``): ``x-bench-chunks`` (content events, default 20),
``x-bench-chunk-bytes`` (text bytes per event, default 8) and ``x-bench-delay-ms`` (between
events, default 0). One server serves every scenario.

Why raw ``asyncio.Protocol`` rather than a framework: the fake must never be the bottleneck, so
each request costs one header parse and one ``write``; timed stream events are driven by one
shared millisecond ticker instead of a sleeping task per stream (a ``sleep`` per event costs a
future and a timer handle, which at 2,000 streams x 50 events/s would be the bottleneck).
Stdlib only; ``--uvloop`` uses uvloop when it is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import sys
from collections.abc import Callable
from urllib.parse import parse_qsl

# Defaults for a stream when the request does not say.
DEFAULT_CHUNKS = 20
DEFAULT_CHUNK_BYTES = 8
DEFAULT_DELAY_MS = 0.0

# Request bodies larger than this are drained (counted, not kept): only chat bodies are inspected.
_KEEP_BODY = 64 * 1024
_MAX_HEAD = 64 * 1024

_FILLER = b"lorem ipsum dolor sit amet consectetur adipiscing elit "


def _text(n: int) -> str:
    """``n`` bytes of harmless ASCII text (never contains ``data:``)."""
    reps = n // len(_FILLER) + 1
    return (_FILLER * reps)[:n].decode()


def expected_data_events(dialect: str, chunks: int, include_usage: bool = True) -> int:
    """How many SSE ``data:`` lines a stream of ``chunks`` content events carries."""
    if dialect == "openai":
        return chunks + (1 if include_usage else 0) + 1  # usage chunk, [DONE]
    if dialect == "anthropic":
        # message_start, content_block_start, ping, deltas, content_block_stop,
        # message_delta, message_stop
        return chunks + 6
    if dialect == "gemini":
        return chunks
    raise ValueError(dialect)


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _frame(payload: bytes) -> bytes:
    """One HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(payload), payload)


_LAST_CHUNK = b"0\r\n\r\n"


class _StreamShape:
    """Pre-encoded, chunk-framed events of one (dialect, chunk size) stream."""

    __slots__ = ("head", "first", "middle", "last", "tail")

    def __init__(self, head: bytes, first: bytes, middle: bytes, last: bytes, tail: bytes) -> None:
        self.head = head  # events sent with the headers, before the first content event
        self.first = first
        self.middle = middle
        self.last = last  # the final content event
        self.tail = tail  # events after the last content event, plus the terminating chunk


_SSE_HEADERS = (
    b"HTTP/1.1 200 OK\r\n"
    b"Content-Type: text/event-stream; charset=utf-8\r\n"
    b"Cache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n"
    b"x-request-id: req_bench\r\n"
)


def _openai_shape(chunk_bytes: int, usage: bool, chunks: int) -> _StreamShape:
    base = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-4o-mini-2024-07-18",
        "system_fingerprint": "fp_bench",
    }

    def ev(delta: dict[str, str], finish: str | None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        obj: dict[str, object] = {**base, "choices": [choice]}
        if usage:
            obj["usage"] = None
        return _frame(b"data: " + _dumps(obj) + b"\n\n")

    text = _text(chunk_bytes)
    tail = b""
    if usage:
        u = {"prompt_tokens": 12, "completion_tokens": chunks, "total_tokens": 12 + chunks}
        tail += _frame(b"data: " + _dumps({**base, "choices": [], "usage": u}) + b"\n\n")
    tail += _frame(b"data: [DONE]\n\n") + _LAST_CHUNK
    return _StreamShape(
        head=b"",
        first=ev({"role": "assistant", "content": text}, None),
        middle=ev({"content": text}, None),
        last=ev({"content": text}, "stop"),
        tail=tail,
    )


def _anthropic_shape(chunk_bytes: int, chunks: int) -> _StreamShape:
    def ev(name: str, obj: object) -> bytes:
        return _frame(b"event: " + name.encode() + b"\ndata: " + _dumps(obj) + b"\n\n")

    start = {
        "type": "message_start",
        "message": {
            "id": "msg_bench", "type": "message", "role": "assistant", "content": [],
            "model": "claude-3-5-haiku-20241022", "stop_reason": None, "stop_sequence": None,
            "usage": {"input_tokens": 12, "cache_creation_input_tokens": 0,
                      "cache_read_input_tokens": 0, "output_tokens": 1},
        },
    }
    delta = ev("content_block_delta", {
        "type": "content_block_delta", "index": 0,
        "delta": {"type": "text_delta", "text": _text(chunk_bytes)},
    })
    head = (
        ev("message_start", start)
        + ev("content_block_start", {"type": "content_block_start", "index": 0,
                                     "content_block": {"type": "text", "text": ""}})
        + ev("ping", {"type": "ping"})
    )
    tail = (
        ev("content_block_stop", {"type": "content_block_stop", "index": 0})
        + ev("message_delta", {"type": "message_delta",
                               "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                               "usage": {"output_tokens": chunks}})
        + ev("message_stop", {"type": "message_stop"})
        + _LAST_CHUNK
    )
    return _StreamShape(head=head, first=delta, middle=delta, last=delta, tail=tail)


def _gemini_shape(chunk_bytes: int, chunks: int) -> _StreamShape:
    def ev(finish: bool) -> bytes:
        cand: dict[str, object] = {
            "content": {"parts": [{"text": _text(chunk_bytes)}], "role": "model"}, "index": 0,
        }
        obj: dict[str, object] = {"candidates": [cand], "modelVersion": "gemini-2.0-flash"}
        if finish:
            cand["finishReason"] = "STOP"
            obj["usageMetadata"] = {"promptTokenCount": 12, "candidatesTokenCount": chunks,
                                    "totalTokenCount": 12 + chunks}
        return _frame(b"data: " + _dumps(obj) + b"\r\n\r\n")

    mid = ev(False)
    return _StreamShape(head=b"", first=mid, middle=mid, last=ev(True), tail=_LAST_CHUNK)


_shape_cache: dict[tuple[str, int, bool, int], _StreamShape] = {}


def stream_shape(dialect: str, chunk_bytes: int, usage: bool, chunks: int) -> _StreamShape:
    key = (dialect, chunk_bytes, usage, chunks)
    shape = _shape_cache.get(key)
    if shape is None:
        if dialect == "openai":
            shape = _openai_shape(chunk_bytes, usage, chunks)
        elif dialect == "anthropic":
            shape = _anthropic_shape(chunk_bytes, chunks)
        else:
            shape = _gemini_shape(chunk_bytes, chunks)
        if len(_shape_cache) > 256:
            _shape_cache.clear()
        _shape_cache[key] = shape
    return shape


def _json_response(body: bytes, status: bytes = b"200 OK", close: bool = False) -> bytes:
    return (
        b"HTTP/1.1 " + status + b"\r\nContent-Type: application/json\r\n"
        b"x-request-id: req_bench\r\n"
        + (b"Connection: close\r\n" if close else b"")
        + b"Content-Length: %d\r\n\r\n" % len(body) + body
    )


_json_cache: dict[tuple[str, int, int, bool], bytes] = {}


def json_completion(dialect: str, chunks: int, chunk_bytes: int, close: bool) -> bytes:
    """A whole non-streaming response (status line, headers, body), cached."""
    key = (dialect, chunks, chunk_bytes, close)
    resp = _json_cache.get(key)
    if resp is not None:
        return resp
    text = _text(chunks * chunk_bytes)
    obj: object
    if dialect == "openai":
        obj = {
            "id": "chatcmpl-bench", "object": "chat.completion", "created": 1700000000,
            "model": "gpt-4o-mini-2024-07-18", "system_fingerprint": "fp_bench",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text,
                                                 "refusal": None},
                         "logprobs": None, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 12, "completion_tokens": chunks,
                      "total_tokens": 12 + chunks},
        }
    elif dialect == "anthropic":
        obj = {
            "id": "msg_bench", "type": "message", "role": "assistant",
            "model": "claude-3-5-haiku-20241022",
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 12, "output_tokens": chunks},
        }
    else:
        obj = {
            "candidates": [{"content": {"parts": [{"text": text}], "role": "model"},
                            "finishReason": "STOP", "index": 0}],
            "usageMetadata": {"promptTokenCount": 12, "candidatesTokenCount": chunks,
                              "totalTokenCount": 12 + chunks},
            "modelVersion": "gemini-2.0-flash",
        }
    resp = _json_response(_dumps(obj), close=close)
    if len(_json_cache) > 256:
        _json_cache.clear()
    _json_cache[key] = resp
    return resp


class _Ticker:
    """Fires timed stream events: one loop timer per millisecond slot, shared by all streams."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.slots: dict[int, list[_Stream]] = {}

    def schedule(self, stream: _Stream, when: float) -> None:
        key = math.ceil(when * 1000.0)
        bucket = self.slots.get(key)
        if bucket is None:
            self.slots[key] = [stream]
            self.loop.call_at(key / 1000.0, self._fire, key)
        else:
            bucket.append(stream)

    def _fire(self, key: int) -> None:
        for stream in self.slots.pop(key, ()):
            stream.step()


class _Stream:
    __slots__ = ("conn", "shape", "left", "delay", "due")

    def __init__(self, conn: _Conn, shape: _StreamShape, chunks: int, delay: float) -> None:
        self.conn = conn
        self.shape = shape
        self.left = chunks - 1  # content events still to send after the first
        self.delay = delay
        self.due = 0.0

    def step(self) -> None:
        conn = self.conn
        if conn.closed:
            return
        self.left -= 1
        if self.left > 0:
            conn.transport.write(self.shape.middle)
            # Absolute schedule: a late tick does not push every later event back.
            self.due += self.delay
            conn.server.ticker.schedule(self, self.due)
        else:
            conn.transport.write(self.shape.last + self.shape.tail)
            conn.stream_done()


class _Server:
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.ticker = _Ticker(loop)
        self.requests = 0
        self.streams = 0
        self.bytes_drained = 0


class _Conn(asyncio.Protocol):
    """One client connection: parse requests, answer, keep-alive."""

    def __init__(self, server: _Server) -> None:
        self.server = server
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.buf = bytearray()
        self.closed = False
        self.busy = False  # a timed stream is being written; hold further requests
        # Request being read:
        self.in_body = False
        self.method = b""
        self.target = ""
        self.headers: dict[bytes, bytes] = {}
        self.keep_alive = True
        self.chunked = False
        self.body_left = 0  # Content-Length bytes still to read
        self.chunk_state = 0  # 0 size line, 1 data, 2 CRLF after data, 3 trailers
        self.body = bytearray()
        self.body_size = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True

    def data_received(self, data: bytes) -> None:
        # Fast path for a large upload: count without copying.
        if self.in_body and not self.chunked and not self.buf and not self.busy:
            n = len(data)
            if n <= self.body_left:
                self._keep(data)
                self.body_left -= n
                if self.body_left:
                    return
                self._finish_request()
                return
        self.buf += data
        if not self.busy:
            self._process()

    def _keep(self, data: bytes | bytearray | memoryview) -> None:
        self.body_size += len(data)
        if len(self.body) < _KEEP_BODY:
            self.body += data[: _KEEP_BODY - len(self.body)]

    def _process(self) -> None:
        buf = self.buf
        while not self.busy and not self.closed:
            if not self.in_body:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > _MAX_HEAD:
                        self.transport.close()
                    return
                head = bytes(buf[:end])
                del buf[: end + 4]
                if not self._parse_head(head):
                    return
            if not self._read_body():
                return
            self._finish_request()

    def _parse_head(self, head: bytes) -> bool:
        lines = head.split(b"\r\n")
        try:
            method, target, version = lines[0].split(b" ", 2)
        except ValueError:
            self.transport.write(_json_response(b'{"error":"bad request"}', b"400 Bad Request",
                                                close=True))
            self.transport.close()
            return False
        headers: dict[bytes, bytes] = {}
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers[name.strip().lower()] = value.strip()
        self.method = method
        self.target = target.decode("latin-1")
        self.headers = headers
        conn = headers.get(b"connection", b"").lower()
        if version == b"HTTP/1.0":
            self.keep_alive = conn == b"keep-alive"
        else:
            self.keep_alive = conn != b"close"
        self.chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        self.body_left = 0 if self.chunked else int(headers.get(b"content-length", b"0") or 0)
        self.chunk_state = 0
        self.body = bytearray()
        self.body_size = 0
        self.in_body = True
        return True

    def _read_body(self) -> bool:
        """Consume body bytes from the buffer; True once the whole body has been read."""
        buf = self.buf
        if not self.chunked:
            take = min(self.body_left, len(buf))
            if take:
                self._keep(memoryview(buf)[:take])
                del buf[:take]
                self.body_left -= take
            return self.body_left == 0
        while True:
            if self.chunk_state == 0:  # size line
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return False
                size = int(bytes(buf[:eol]).split(b";", 1)[0], 16)
                del buf[: eol + 2]
                if size == 0:
                    self.chunk_state = 3
                else:
                    self.body_left = size
                    self.chunk_state = 1
            elif self.chunk_state == 1:  # data
                take = min(self.body_left, len(buf))
                if not take:
                    return False
                self._keep(memoryview(buf)[:take])
                del buf[:take]
                self.body_left -= take
                if self.body_left == 0:
                    self.chunk_state = 2
            elif self.chunk_state == 2:  # CRLF after the data
                if len(buf) < 2:
                    return False
                del buf[:2]
                self.chunk_state = 0
            else:  # trailers, ended by an empty line
                eol = buf.find(b"\r\n")
                if eol < 0:
                    return False
                del buf[: eol + 2]
                if eol == 0:
                    return True

    def _param(self, query: dict[str, str], name: str, default: float) -> float:
        raw = self.headers.get(b"x-bench-" + name.encode())
        if raw is not None:
            return float(raw)
        q = query.get(name.replace("-", "_"))
        return float(q) if q is not None else default

    def _finish_request(self) -> None:
        self.in_body = False
        server = self.server
        server.requests += 1
        path, _, qs = self.target.partition("?")
        query = dict(parse_qsl(qs)) if qs else {}
        close = not self.keep_alive
        write = self.transport.write

        if path.endswith("/upload") or path == "/v1/files":
            server.bytes_drained += self.body_size
            write(_json_response(b'{"received":%d}' % self.body_size, close=close))
            self._after_response()
            return
        if path == "/health":
            write(_json_response(b'{"status":"ok"}', close=close))
            self._after_response()
            return
        if self.method != b"POST":
            write(_json_response(b'{"error":"not found"}', b"404 Not Found", close=close))
            self._after_response()
            return

        if path.endswith("/chat/completions"):
            dialect = "openai"
        elif path.endswith("/messages"):
            dialect = "anthropic"
        elif ":generateContent" in path or ":streamGenerateContent" in path:
            dialect = "gemini"
        else:
            write(_json_response(b'{"error":"not found"}', b"404 Not Found", close=close))
            self._after_response()
            return

        chunks = max(1, int(self._param(query, "chunks", DEFAULT_CHUNKS)))
        chunk_bytes = max(1, int(self._param(query, "chunk-bytes", DEFAULT_CHUNK_BYTES)))
        if dialect == "gemini":
            stream = ":streamGenerateContent" in path
        else:
            body = bytes(self.body)
            stream = b'"stream":true' in body or b'"stream": true' in body
        if not stream:
            write(json_completion(dialect, chunks, chunk_bytes, close))
            self._after_response()
            return

        server.streams += 1
        usage = dialect != "openai" or b"include_usage" in self.body
        shape = stream_shape(dialect, chunk_bytes, usage, chunks)
        head = _SSE_HEADERS + (b"Connection: close\r\n\r\n" if close else b"\r\n")
        delay = self._param(query, "delay-ms", DEFAULT_DELAY_MS) / 1000.0
        if chunks == 1:
            write(head + shape.head + shape.last + shape.tail)
            self._after_response()
            return
        if delay <= 0:
            write(head + shape.head + shape.first + shape.middle * (chunks - 2)
                  + shape.last + shape.tail)
            self._after_response()
            return
        write(head + shape.head + shape.first)
        st = _Stream(self, shape, chunks, delay)
        st.due = server.loop.time() + delay
        self.busy = True
        server.ticker.schedule(st, st.due)

    def stream_done(self) -> None:
        self.busy = False
        self._after_response()
        if self.buf and not self.closed and not self.busy:
            self._process()

    def _after_response(self) -> None:
        if not self.keep_alive:
            self.closed = True
            self.transport.close()


async def serve(host: str, port: int, ready: Callable[[int], None] | None = None) -> None:
    loop = asyncio.get_running_loop()
    state = _Server(loop)
    srv = await loop.create_server(lambda: _Conn(state), host, port, backlog=4096,
                                   reuse_address=True)
    bound = srv.sockets[0].getsockname()[1]
    if ready is not None:
        ready(bound)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with srv:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0, help="0 picks a free port")
    ap.add_argument("--uvloop", action="store_true", help="use uvloop if installed")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("the fake upstream only listens on loopback")
    if args.uvloop:
        try:
            import uvloop  # type: ignore[import-not-found,unused-ignore]

            uvloop.install()
        except ImportError:
            print("uvloop not installed; using asyncio", file=sys.stderr)

    def ready(port: int) -> None:
        # The orchestrator reads this line to learn the port.
        sys.stdout.write(json.dumps({"port": port, "pid": os.getpid()}) + "\n")
        sys.stdout.flush()

    asyncio.run(serve(args.host, args.port, ready))
    return 0


if __name__ == "__main__":
    sys.exit(main())
