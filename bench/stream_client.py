"""Open N concurrent SSE streams and measure them: chunks delivered, TTFB, inter-chunk gaps.

Runs as its own process (the orchestrator pins it to a core). Each stream is one HTTP/1.1
request on its own connection with ``Connection: close``; the body is read to EOF and SSE
events are counted by their ``data:`` lines, so the count does not depend on how the proxy
re-frames chunks. Raw ``asyncio.Protocol`` (no HTTP library) keeps the client's cost per
event at a few microseconds, which is what lets one core drive 2,000 streams x 50 events/s.

Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from array import array

from fake_upstream import expected_data_events  # bench/ is on sys.path when run as a script

_DATA = b"data:"


def percentile(values: list[float] | array[float], pct: float) -> float:
    """Nearest-rank percentile of ``values`` (0.0 for no values)."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, int(round(pct / 100.0 * len(ordered) + 0.5)) - 1))
    return float(ordered[k])


class _Stats:
    def __init__(self) -> None:
        self.ttfb = array("d")
        self.gaps = array("d")
        self.events = 0
        self.complete = 0
        self.status_errors = 0
        self.conn_errors = 0
        self.timeouts = 0
        self.short = 0
        self.statuses: dict[str, int] = {}


class _StreamProto(asyncio.Protocol):
    def __init__(self, stats: _Stats) -> None:
        self.stats = stats
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None
        self.head = bytearray()
        self.in_body = False
        self.status = 0
        self.tail = b""
        self.count = 0
        self.t0 = 0.0
        self.last = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def send(self, request: bytes) -> None:
        assert self.transport is not None
        self.t0 = time.perf_counter()
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            try:
                self.status = int(self.head[9:12])
            except ValueError:
                self.status = 0
            data = bytes(self.head[end + 4:])
            self.head = bytearray()
            self.in_body = True
            if not data:
                return
        chunk = self.tail + data
        n = chunk.count(_DATA)
        # Keep 4 bytes: a "data:" split across two reads is counted once, when completed.
        self.tail = chunk[-4:]
        if n:
            st = self.stats
            if self.count == 0:
                st.ttfb.append(now - self.t0)
            else:
                st.gaps.append(now - self.last)
            # Events that arrived in the same read come with no gap between them.
            for _ in range(n - 1):
                st.gaps.append(0.0)
            self.count += n
            self.last = now

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)

    def account(self, expected: int) -> None:
        st = self.stats
        st.events += self.count
        key = str(self.status)
        st.statuses[key] = st.statuses.get(key, 0) + 1
        if self.status != 200:
            st.status_errors += 1
        elif self.count >= expected:
            st.complete += 1
        else:
            st.short += 1


async def _connect(loop: asyncio.AbstractEventLoop, host: str, port: int, stats: _Stats,
                   gate: asyncio.Semaphore, timeout: float) -> _StreamProto | None:
    async with gate:
        proto = _StreamProto(stats)
        try:
            await asyncio.wait_for(loop.create_connection(lambda: proto, host, port), timeout)
        except (OSError, asyncio.TimeoutError):
            stats.conn_errors += 1
            return None
        return proto


def build_request(host: str, port: int, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}:{port}",
             "Content-Type: application/json", "Accept: text/event-stream",
             "Connection: close", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def stream_body(dialect: str) -> bytes:
    """A small streaming request body for ``dialect``."""
    msg = [{"role": "user", "content": "Write a short poem about latency."}]
    if dialect == "openai":
        obj: dict[str, object] = {"model": "gpt-4o-mini", "messages": msg, "stream": True,
                                  "stream_options": {"include_usage": True}}
    elif dialect == "anthropic":
        obj = {"model": "claude-3-5-haiku-20241022", "max_tokens": 256, "messages": msg,
               "stream": True}
    else:
        obj = {"contents": [{"role": "user", "parts": [{"text": msg[0]["content"]}]}]}
    return json.dumps(obj, separators=(",", ":")).encode()


def stream_path(dialect: str, prefix: str) -> str:
    if dialect == "openai":
        return prefix + "/v1/chat/completions"
    if dialect == "anthropic":
        return prefix + "/v1/messages"
    return prefix + "/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"


def auth_headers(dialect: str) -> dict[str, str]:
    # Dummy credentials: the fake upstream ignores them; the proxy only passes them through.
    if dialect == "openai":
        return {"Authorization": "Bearer sk-bench-0000"}
    if dialect == "anthropic":
        return {"x-api-key": "sk-ant-bench-0000", "anthropic-version": "2023-06-01"}
    return {"x-goog-api-key": "bench-0000"}


async def run(host: str, port: int, prefix: str, dialect: str, n: int, chunks: int,
              chunk_bytes: int, delay_ms: float, timeout: float,
              ramp_s: float) -> dict[str, object]:
    loop = asyncio.get_running_loop()
    headers = {"x-bench-chunks": str(chunks), "x-bench-chunk-bytes": str(chunk_bytes),
               "x-bench-delay-ms": str(delay_ms), **auth_headers(dialect)}
    request = build_request(host, port, stream_path(dialect, prefix), stream_body(dialect),
                            headers)
    expected = expected_data_events(dialect, chunks)
    stats = _Stats()
    # Phase 1: open every connection first, so that the connection storm (which costs the
    # client more than the streams do) is not inside the measurement.
    gate = asyncio.Semaphore(256)
    protos = [p for p in await asyncio.gather(
        *(_connect(loop, host, port, stats, gate, timeout) for _ in range(n))) if p is not None]
    # Phase 2: send every request at once (optionally spread over ramp_s), then wait.
    start = time.perf_counter()
    for i, proto in enumerate(protos):
        if ramp_s > 0:
            await asyncio.sleep(max(0.0, start + ramp_s * i / n - time.perf_counter()))
        proto.send(request)
    deadline = start + ramp_s + timeout
    for proto in protos:
        try:
            await asyncio.wait_for(asyncio.shield(proto.done),
                                   max(0.01, deadline - time.perf_counter()))
        except asyncio.TimeoutError:
            stats.timeouts += 1
            if proto.transport is not None:
                proto.transport.abort()
        proto.account(expected)
    wall = time.perf_counter() - start
    ms = 1000.0
    return {
        "dialect": dialect,
        "streams": n,
        "chunks": chunks,
        "delay_ms": delay_ms,
        "events_expected": expected * n,
        "events_received": stats.events,
        "delivered": stats.events / (expected * n) if n else 1.0,
        "complete_streams": stats.complete,
        "short_streams": stats.short,
        "status_errors": stats.status_errors,
        "conn_errors": stats.conn_errors,
        "timeouts": stats.timeouts,
        "statuses": stats.statuses,
        "ttfb_ms": {"p50": percentile(stats.ttfb, 50) * ms, "p99": percentile(stats.ttfb, 99) * ms,
                    "max": max(stats.ttfb, default=0.0) * ms},
        "gap_ms": {"p50": percentile(stats.gaps, 50) * ms, "p99": percentile(stats.gaps, 99) * ms,
                   "p999": percentile(stats.gaps, 99.9) * ms,
                   "max": max(stats.gaps, default=0.0) * ms},
        "wall_s": wall,
    }


def _install_uvloop() -> None:
    try:
        import uvloop  # type: ignore[import-not-found,unused-ignore]

        uvloop.install()
    except ImportError:
        print("uvloop not installed; using asyncio", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--prefix", default="", help="path prefix, e.g. /openai for the proxy")
    ap.add_argument("--dialect", choices=("openai", "anthropic", "gemini"), default="openai")
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--chunks", type=int, default=50)
    ap.add_argument("--chunk-bytes", type=int, default=8)
    ap.add_argument("--delay-ms", type=float, default=20.0)
    ap.add_argument("--timeout", type=float, default=60.0, help="per stream, seconds")
    ap.add_argument("--uvloop", action="store_true", help="use uvloop if installed")
    ap.add_argument("--ramp", type=float, default=0.0, help="spread stream starts over seconds")
    args = ap.parse_args(argv)
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        ap.error("the stream client only targets loopback")
    if args.uvloop:
        _install_uvloop()
    result = asyncio.run(run(args.host, args.port, args.prefix, args.dialect, args.streams,
                             args.chunks, args.chunk_bytes, args.delay_ms, args.timeout,
                             args.ramp))
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
