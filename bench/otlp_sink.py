"""A local OpenTelemetry collector stand-in for the benchmarks: accepts OTLP and counts it.

``--protocol http/protobuf`` serves OTLP/HTTP (``POST /v1/traces``, ``/v1/metrics``);
``--protocol grpc`` serves the OTLP/gRPC trace and metrics services. Either way the spans in
each export are decoded and counted (so a run can show that every request's span arrived),
and ``GET /stats`` on the stats port answers the counts as JSON. Loopback only. Prints one JSON
line ``{"port": ..., "stats_port": ...}`` once listening, then serves until SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2 as metrics_pb
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2 as trace_pb


class Counts:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.trace_exports = 0
        self.spans = 0
        self.metric_exports = 0
        self.bytes = 0

    def traces(self, req: trace_pb.ExportTraceServiceRequest, size: int) -> None:
        spans = sum(len(ss.spans) for rs in req.resource_spans for ss in rs.scope_spans)
        with self.lock:
            self.trace_exports += 1
            self.spans += spans
            self.bytes += size

    def metrics(self, size: int) -> None:
        with self.lock:
            self.metric_exports += 1
            self.bytes += size

    def as_dict(self) -> dict[str, int]:
        with self.lock:
            return {"trace_exports": self.trace_exports, "spans": self.spans,
                    "metric_exports": self.metric_exports, "bytes": self.bytes}


COUNTS = Counts()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    def _answer(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        if self.path == "/stats":
            self._answer(200, json.dumps(COUNTS.as_dict()).encode(), "application/json")
        else:
            self._answer(404, b"", "text/plain")

    def do_POST(self) -> None:  # noqa: N802 - stdlib name
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path == "/v1/traces":
            COUNTS.traces(trace_pb.ExportTraceServiceRequest.FromString(body), len(body))
            self._answer(200, b"", "application/x-protobuf")
        elif self.path == "/v1/metrics":
            metrics_pb.ExportMetricsServiceRequest.FromString(body)
            COUNTS.metrics(len(body))
            self._answer(200, b"", "application/x-protobuf")
        else:
            self._answer(404, b"", "text/plain")


def serve_grpc(host: str) -> tuple[Any, int]:
    import grpc
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2_grpc as mgrpc
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2_grpc as tgrpc

    class Traces(tgrpc.TraceServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
            COUNTS.traces(request, request.ByteSize())
            return trace_pb.ExportTraceServiceResponse()

    class Metrics(mgrpc.MetricsServiceServicer):
        def Export(self, request: Any, context: Any) -> Any:  # noqa: N802 - gRPC's name
            COUNTS.metrics(request.ByteSize())
            return metrics_pb.ExportMetricsServiceResponse()

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    tgrpc.add_TraceServiceServicer_to_server(Traces(), server)
    mgrpc.add_MetricsServiceServicer_to_server(Metrics(), server)
    port = server.add_insecure_port(f"{host}:0")
    server.start()
    return server, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--protocol", choices=["http/protobuf", "grpc"], default="http/protobuf")
    args = ap.parse_args(argv)
    http = ThreadingHTTPServer((args.host, 0), Handler)
    http.daemon_threads = True
    stats_port = int(http.server_address[1])
    port = stats_port
    grpc_server = None
    if args.protocol == "grpc":
        grpc_server, port = serve_grpc(args.host)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    threading.Thread(target=http.serve_forever, kwargs={"poll_interval": 0.2},
                     daemon=True).start()
    print(json.dumps({"port": port, "stats_port": stats_port}), flush=True)
    stop.wait()
    http.shutdown()
    if grpc_server is not None:
        grpc_server.stop(grace=None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
