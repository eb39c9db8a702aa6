"""A small OTLP receiver for end-to-end tests: OTLP/HTTP (protobuf) and OTLP/gRPC on loopback.

It decodes the payloads with the ``opentelemetry-proto`` package and keeps every span and
every histogram data point it was sent, flattened to plain values. Tests wait for what they
expect with :meth:`Received.wait_for` (a condition with a deadline), never with sleeps.
"""

from __future__ import annotations

import gzip
import threading
import zlib
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, TypeVar

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as metrics_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as trace_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue

T = TypeVar("T")
SPAN_KIND_CLIENT = 3  # opentelemetry.proto.trace.v1.Span.SpanKind
STATUS_ERROR = 2  # opentelemetry.proto.trace.v1.Status.StatusCode


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return tuple(_value(x) for x in v.array_value.values)
    if kind == "kvlist_value":
        return _attributes(v.kvlist_value.values)
    return getattr(v, kind) if kind else None


def _attributes(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass
class Span:
    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    status_code: int
    attributes: dict[str, Any]
    resource: dict[str, Any]

    @property
    def traceparent_prefix(self) -> str:
        """``00-<trace id>-<span id>-``: a traceparent naming this span, minus the flags."""
        return f"00-{self.trace_id}-{self.span_id}-"


@dataclass
class Point:
    """One histogram data point of one export (cumulative: later ones include earlier)."""

    metric: str
    unit: str
    attributes: dict[str, Any]
    resource: dict[str, Any]
    time: int
    count: int
    sum: float
    bounds: tuple[float, ...]


@dataclass
class Received:
    """Everything the receiver was sent; thread-safe, with waiting."""

    spans: list[Span] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    requests: int = 0
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def add_traces(self, req: trace_pb.ExportTraceServiceRequest) -> None:
        spans = []
        for rs in req.resource_spans:
            resource = _attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    spans.append(Span(s.name, s.kind, s.trace_id.hex(), s.span_id.hex(),
                                      s.parent_span_id.hex(), s.status.code,
                                      _attributes(s.attributes), resource))
        with self._cond:
            self.requests += 1
            self.spans.extend(spans)
            self._cond.notify_all()

    def add_metrics(self, req: metrics_pb.ExportMetricsServiceRequest) -> None:
        points = []
        for rm in req.resource_metrics:
            resource = _attributes(rm.resource.attributes)
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    if m.WhichOneof("data") != "histogram":
                        continue
                    for p in m.histogram.data_points:
                        points.append(Point(m.name, m.unit, _attributes(p.attributes), resource,
                                            p.time_unix_nano, p.count, p.sum,
                                            tuple(p.explicit_bounds)))
        with self._cond:
            self.requests += 1
            self.points.extend(points)
            self._cond.notify_all()

    def wait_for(self, find: Callable[[Received], T | None], timeout: float = 10.0,
                 what: str = "telemetry") -> T:
        """Block until ``find(self)`` returns something other than None (or fail)."""
        found: list[T] = []

        def ready() -> bool:
            result = find(self)
            if result is None:
                return False
            found.append(result)
            return True

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                names = sorted({s.name for s in self.spans})
                raise AssertionError(f"no {what} within {timeout} s; spans seen: {names}")
        return found[0]

    # -- queries (call with the condition held, i.e. from wait_for, or after it) ------------
    def span(self, request_id: str) -> Span | None:
        for s in self.spans:
            if s.attributes.get("llmproxy.request.id") == request_id:
                return s
        return None

    def wait_span(self, request_id: str, timeout: float = 10.0) -> Span:
        return self.wait_for(lambda r: r.span(request_id), timeout, f"span for {request_id}")

    def histogram(self, metric: str, **match: Any) -> tuple[int, float]:
        """(count, sum) over every worker for the points whose attributes include ``match``:
        the latest point per worker and attribute set, summed."""
        latest: dict[tuple[Any, ...], Point] = {}
        for p in self.points:
            if p.metric != metric or any(p.attributes.get(k) != v for k, v in match.items()):
                continue
            key = (p.resource.get("service.instance.id"),
                   tuple(sorted(p.attributes.items())))
            if key not in latest or latest[key].time < p.time:
                latest[key] = p
        return (sum(p.count for p in latest.values()), sum(p.sum for p in latest.values()))

    def wait_histogram(self, metric: str, count: int, timeout: float = 10.0,
                       **match: Any) -> tuple[int, float]:
        """Wait until the histogram has at least ``count`` observations matching ``match``."""
        return self.wait_for(
            lambda r: (got if (got := r.histogram(metric, **match))[0] >= count else None),
            timeout, f"{count} observations of {metric} {match}")

    def points_of(self, metric: str, **match: Any) -> Iterator[Point]:
        for p in self.points:
            if p.metric == metric and all(p.attributes.get(k) == v for k, v in match.items()):
                yield p


class _HTTPHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        encoding = (self.headers.get("Content-Encoding") or "").lower()
        if encoding == "gzip":
            body = gzip.decompress(body)
        elif encoding == "deflate":
            body = zlib.decompress(body)
        received = self.server.received
        if self.path == "/v1/traces":
            received.add_traces(trace_pb.ExportTraceServiceRequest.FromString(body))
            answer = trace_pb.ExportTraceServiceResponse().SerializeToString()
        elif self.path == "/v1/metrics":
            received.add_metrics(metrics_pb.ExportMetricsServiceRequest.FromString(body))
            answer = metrics_pb.ExportMetricsServiceResponse().SerializeToString()
        else:
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    received: Received


class _Traces(trace_grpc.TraceServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        self.received.add_traces(request)
        return trace_pb.ExportTraceServiceResponse()


class _Metrics(metrics_grpc.MetricsServiceServicer):
    def __init__(self, received: Received) -> None:
        self.received = received

    def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
        self.received.add_metrics(request)
        return metrics_pb.ExportMetricsServiceResponse()


class OTLPReceiver:
    """OTLP/HTTP on ``url`` and, if asked, OTLP/gRPC on ``grpc_url``; both on loopback."""

    def __init__(self, grpc: bool = False) -> None:
        self.received = Received()
        self._http = _HTTPServer(("127.0.0.1", 0), _HTTPHandler)
        self._http.received = self.received
        self._thread = threading.Thread(target=self._http.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True,
                                        name="otlp-receiver")
        self._thread.start()
        self.url = f"http://127.0.0.1:{self._http.server_address[1]}"
        self._grpc: Any = None
        self.grpc_url = ""
        if grpc:
            import grpc as grpc_lib

            server = grpc_lib.server(futures.ThreadPoolExecutor(max_workers=4))
            trace_grpc.add_TraceServiceServicer_to_server(_Traces(self.received), server)
            metrics_grpc.add_MetricsServiceServicer_to_server(_Metrics(self.received), server)
            port = server.add_insecure_port("127.0.0.1:0")
            server.start()
            self._grpc = server
            self.grpc_url = f"http://127.0.0.1:{port}"

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join(5)
        if self._grpc is not None:
            self._grpc.stop(grace=None)
