"""OpenTelemetry: a GenAI span for every proxied call and the GenAI client metrics, over OTLP.

Off unless configured (``telemetry:`` in the config, or the standard ``OTEL_*`` variables).
When off, nothing of OpenTelemetry is imported and nothing is registered. When on, every
identified call gets one span of kind CLIENT, started at the end of ``inbound.prepare`` and
ended by a terminal-event listener, and the relay names that span to the provider in a
``traceparent`` header. The SDK (providers, batch processor, periodic metric reader, OTLP
exporters) is set up lazily in the process that serves requests, never in the gunicorn
master, and shut down (open spans ended, queues flushed) when that process exits. Prompt and
completion content is never recorded. See docs/telemetry.md.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from ..config import TelemetrySettings
from ..exchange import Exchange, Outcome
from ..providers import DIALECTS

if TYPE_CHECKING:
    from flask import Flask
    from opentelemetry.metrics import Histogram, MeterProvider
    from opentelemetry.trace import TracerProvider

# =============================================================================================
# Runtime: spans, metrics, propagation, SDK set-up per process.
# =============================================================================================

EXTENSION_KEY = "llmproxy.telemetry"
log = logging.getLogger("llmproxy.telemetry")

# The proxy's own span attributes (the GenAI ones come from the semantic-conventions package).
REQUEST_ID = "llmproxy.request.id"
OUTCOME = "llmproxy.outcome"
KEY_FINGERPRINT = "llmproxy.key.fingerprint"
USER = "llmproxy.user"
COST_USD = "llmproxy.cost.usd"
RATELIMIT_DECISION = "llmproxy.ratelimit.decision"
RATELIMIT_POLICY = "llmproxy.ratelimit.policy"
INTERRUPTED = "interrupted"  # outcome of a span still open when the process exits

# The conventions' advised bucket boundaries: tokens 4^0 .. 4^13; seconds 0.01 * 2^0 .. 2^13
# (also used for the two stream timings, which the conventions leave to the duration's).
TOKEN_BUCKETS = (1, 4, 16, 64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304,
                 16777216, 67108864)
SECONDS_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                   40.96, 81.92)

# Well-known provider hosts; any other route is named by its configured name.
_PROVIDER_HOSTS = {
    "api.openai.com": "OPENAI", "api.anthropic.com": "ANTHROPIC",
    "generativelanguage.googleapis.com": "GCP_GEMINI", "api.groq.com": "GROQ",
    "api.mistral.ai": "MISTRAL_AI", "api.deepseek.com": "DEEPSEEK", "api.x.ai": "X_AI",
    "api.perplexity.ai": "PERPLEXITY", "api.cohere.com": "COHERE",
}
_PROVIDER_ROUTES = {"openai": "OPENAI", "anthropic": "ANTHROPIC", "gemini": "GCP_GEMINI",
                    "groq": "GROQ"}
MAX_VALUE_CHARS = 256  # request-supplied strings (the model) are clipped to this
OTHER = "other"  # a route its dialect names no operation for (model lists, files, ...)


def operation_name(dialect: str | None, upstream_path: str) -> str:
    """``gen_ai.operation.name`` of a call: its dialect names its routes' operations."""
    found = DIALECTS.get(dialect or "")
    path = upstream_path.partition("?")[0].rstrip("/")
    return found.operation(path) if found is not None else OTHER


def exchange_cost(ex: Exchange) -> float | None:
    """The call's cost in USD as priced by the first terminal-event listener (or None)."""
    return ex.cost_usd


def ratelimit_decision(ex: Exchange) -> tuple[str, str | None] | None:
    """(``allowed`` | ``denied`` | ``unavailable``, the deciding policy), or None when no
    limit applied: the one place that knows where the rate limiter keeps its decision."""
    denial = ex.denial
    if denial is not None or ex.error_kind == "rate_limited":
        check = getattr(denial, "check", None)
        return "denied", getattr(check, "policy_name", None)
    if ex.error_kind == "ratelimit_unavailable":
        return "unavailable", None
    reservation = ex.reservation
    if reservation is not None:
        tightest = getattr(reservation, "tightest", None)
        return "allowed", tightest[0].policy_name if tightest else None
    return None


def _value(v: Any) -> Any:
    """Enum members as their value (outcomes and error kinds may be str enums)."""
    return getattr(v, "value", v)


def error_type(ex: Exchange) -> str | None:
    """``error.type`` of a failed call: the proxy's error kind, else the HTTP status, else
    how the stream ended; None for a success."""
    if ex.error_kind:
        return str(_value(ex.error_kind))
    if ex.status is not None and ex.status >= 400:
        return str(ex.status)
    outcome = _value(ex.outcome)
    if outcome in (Outcome.CLIENT_ABORTED, Outcome.UPSTREAM_ERROR, Outcome.SHUTDOWN):
        return str(outcome)
    if ex.meta.error:  # an error event inside a 200 stream: its message stays out
        return "stream_error"
    return None


@dataclass(frozen=True, slots=True)
class _Keys:
    """Attribute names from the semantic-conventions package, imported only when on."""

    operation: str
    provider: str
    request_model: str
    request_stream: str
    max_tokens: str
    response_model: str
    response_id: str
    finish_reasons: str
    time_to_first_chunk: str
    input_tokens: str
    output_tokens: str
    cache_read: str
    cache_creation: str
    reasoning: str
    token_type: str
    input_type: str  # values of gen_ai.token.type
    output_type: str
    server_address: str
    server_port: str
    error_type: str
    status_code: str


def _keys() -> tuple[_Keys, Any]:
    from opentelemetry.semconv._incubating.attributes import gen_ai_attributes as g
    from opentelemetry.semconv.attributes import (
        error_attributes,
        http_attributes,
        server_attributes,
    )

    keys = _Keys(
        operation=g.GEN_AI_OPERATION_NAME, provider=g.GEN_AI_PROVIDER_NAME,
        request_model=g.GEN_AI_REQUEST_MODEL, request_stream=g.GEN_AI_REQUEST_STREAM,
        max_tokens=g.GEN_AI_REQUEST_MAX_TOKENS, response_model=g.GEN_AI_RESPONSE_MODEL,
        response_id=g.GEN_AI_RESPONSE_ID, finish_reasons=g.GEN_AI_RESPONSE_FINISH_REASONS,
        time_to_first_chunk=g.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK,
        input_tokens=g.GEN_AI_USAGE_INPUT_TOKENS, output_tokens=g.GEN_AI_USAGE_OUTPUT_TOKENS,
        cache_read=g.GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS,
        cache_creation=g.GEN_AI_USAGE_CACHE_CREATION_INPUT_TOKENS,
        reasoning=g.GEN_AI_USAGE_REASONING_OUTPUT_TOKENS, token_type=g.GEN_AI_TOKEN_TYPE,
        input_type=g.GenAiTokenTypeValues.INPUT.value,
        output_type=g.GenAiTokenTypeValues.OUTPUT.value,
        server_address=server_attributes.SERVER_ADDRESS,
        server_port=server_attributes.SERVER_PORT, error_type=error_attributes.ERROR_TYPE,
        status_code=http_attributes.HTTP_RESPONSE_STATUS_CODE,
    )
    return keys, g.GenAiProviderNameValues


def _shown(url: str | None) -> str:
    """An endpoint for the log: scheme, host, port and path; never credentials or a query."""
    if url is None:
        return "off"
    parts = urlsplit(url)
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{parts.hostname}{port}{parts.path}"


def _clip(value: str | None) -> str | None:
    return value[:MAX_VALUE_CHARS] if value else None


class _Throttle(logging.Filter):
    """Let one record per message template through every ``every`` seconds: an unreachable
    collector fails every export, and that deserves a warning, not a flood."""

    def __init__(self, every: float = 60.0) -> None:
        super().__init__()
        self.every = every
        self._last: dict[tuple[str, object], float] = {}
        self._skipped: dict[tuple[str, object], int] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.msg)
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(key, -self.every) < self.every:
                self._skipped[key] = self._skipped.get(key, 0) + 1
                return False
            self._last[key] = now
            skipped = self._skipped.pop(key, 0)
        if skipped:
            record.msg = f"{record.msg} ({skipped} similar messages in the last period)"
        return True


def _route_sdk_logs() -> None:
    """The SDK's and exporters' own warnings go out like the proxy's logs, throttled."""
    ours = logging.getLogger("llmproxy").handlers
    handler = logging.StreamHandler(sys.stderr)
    if ours:
        handler.setFormatter(ours[0].formatter)
    handler.addFilter(_Throttle())
    sdk = logging.getLogger("opentelemetry")
    sdk.handlers[:] = [handler]
    sdk.setLevel(logging.WARNING)
    sdk.propagate = False


_grpc_gevent_ready = False


def _grpc_under_gevent() -> None:
    """gRPC's C core blocks the whole process while it waits, which under gevent means every
    request of the worker: switch it to gevent's loop once, before any gRPC object exists."""
    global _grpc_gevent_ready
    monkey = sys.modules.get("gevent.monkey")
    if _grpc_gevent_ready or monkey is None or not monkey.is_module_patched("socket"):
        return
    import grpc.experimental.gevent as grpc_gevent

    grpc_gevent.init_gevent()
    _grpc_gevent_ready = True


def _exporter_classes(signal: str, protocol: str) -> Any:
    """The OTLP exporter class of one signal, imported when the app is built (before the
    first request: an import in a request would hold up every other request of the worker)."""
    if protocol == "grpc":
        if signal == "traces":
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
                OTLPSpanExporter as GrpcSpanExporter,
            )

            return GrpcSpanExporter
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import (
            OTLPMetricExporter as GrpcMetricExporter,
        )

        return GrpcMetricExporter
    if signal == "traces":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter
    from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

    return OTLPMetricExporter


@dataclass(frozen=True, slots=True)
class _Route:
    """What never changes for a provider route: its span attributes and propagation."""

    attributes: dict[str, Any]  # gen_ai.provider.name, server.address, server.port
    propagate: bool


class Telemetry:
    """Spans and metrics of one app; the SDK objects exist once per serving process."""

    def __init__(self, settings: TelemetrySettings, routes: Mapping[str, str]) -> None:
        from opentelemetry import trace
        from opentelemetry.context import Context
        from opentelemetry.trace import SpanKind, Status, StatusCode
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.settings = settings
        self.keys, provider_names = _keys()
        self._routes: dict[str, _Route] = {}
        k = self.keys
        for name, base_url in routes.items():
            parts = urlsplit(base_url)
            known = _PROVIDER_HOSTS.get(parts.hostname or "") or _PROVIDER_ROUTES.get(name)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            self._routes[name] = _Route(
                {k.provider: getattr(provider_names, known).value if known else name,
                 k.server_address: parts.hostname or "", k.server_port: port},
                settings.propagate and name not in settings.propagate_except)
        # Everything the per-process set-up needs is imported now, at app build.
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
        from opentelemetry.sdk.resources import OTELResourceDetector, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self._sdk = (MeterProvider, PeriodicExportingMetricReader, OTELResourceDetector,
                     Resource, TracerProvider, BatchSpanProcessor)
        self._span_exporter: Any = _exporter_classes("traces", settings.traces_protocol) \
            if settings.traces_endpoint is not None else None
        self._metric_exporter: Any = _exporter_classes("metrics", settings.metrics_protocol) \
            if settings.metrics_endpoint is not None else None
        self._trace = trace
        self._kind = SpanKind.CLIENT
        self._error = Status(StatusCode.ERROR)
        self._root = Context()  # no incoming traceparent: the span starts a trace
        self._propagator = TraceContextTextMapPropagator()
        self._untraced = trace.INVALID_SPAN  # marks a call when only metrics are exported
        self._tracer: Any = None
        self._meter_provider: Any = None
        self._tracer_provider: Any = None
        self._duration: Histogram | None = None
        self._tokens: Histogram | None = None
        self._ttfc: Histogram | None = None
        self._tpoc: Histogram | None = None
        self._open: set[Exchange] = set()  # calls whose recording span has not ended
        self._lock = threading.Lock()
        self._ready = False
        self._closed = False
        forked = weakref.WeakMethod(self._forked)  # the hook must not keep old apps alive

        def after_fork() -> None:
            method = forked()
            if method is not None:
                method()

        os.register_at_fork(after_in_child=after_fork)

    # -- per-process SDK ----------------------------------------------------------------------
    def _forked(self) -> None:
        """A forked child sets up its own SDK: threads and sockets do not survive a fork."""
        self._ready = False
        self._closed = False
        self._open = set()
        self._lock = threading.Lock()

    def use(self, tracer_provider: TracerProvider | None,
            meter_provider: MeterProvider | None) -> None:
        """Use these providers instead of OTLP exporters (tests: in-memory exporters)."""
        with self._lock:
            self._install(tracer_provider, meter_provider)
            self._ready = True

    def _setup(self) -> None:
        with self._lock:
            if self._ready:
                return
            from opentelemetry.semconv._incubating.attributes.process_attributes import (
                PROCESS_PID,
            )
            from opentelemetry.semconv.attributes import service_attributes as service

            from ..buildinfo import __version__

            (MeterProvider, PeriodicExportingMetricReader, OTELResourceDetector, Resource,
             TracerProvider, BatchSpanProcessor) = self._sdk
            _route_sdk_logs()
            s = self.settings
            # Every worker is an instance of its own: its cumulative metrics must not merge
            # with another worker's. OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES still win.
            resource = Resource.create({
                service.SERVICE_NAME: s.service_name, service.SERVICE_VERSION: __version__,
                service.SERVICE_INSTANCE_ID: str(uuid.uuid4()), PROCESS_PID: os.getpid(),
            }).merge(OTELResourceDetector().detect())
            tracer_provider = meter_provider = None
            if s.traces_endpoint is not None:
                if s.traces_protocol == "grpc":
                    _grpc_under_gevent()
                tracer_provider = TracerProvider(resource=resource, shutdown_on_exit=False)
                tracer_provider.add_span_processor(BatchSpanProcessor(
                    self._span_exporter(endpoint=s.traces_endpoint),
                    max_queue_size=s.max_queue_size,
                    max_export_batch_size=s.export_batch_size))
            if s.metrics_endpoint is not None:
                if s.metrics_protocol == "grpc":
                    _grpc_under_gevent()
                reader = PeriodicExportingMetricReader(
                    self._metric_exporter(endpoint=s.metrics_endpoint),
                    export_interval_millis=s.metric_export_interval_ms)
                meter_provider = MeterProvider([reader], resource=resource,
                                               shutdown_on_exit=False)
            self._install(tracer_provider, meter_provider)
            self._ready = True
            atexit.register(self.shutdown)
            log.info("telemetry on: traces %s, metrics %s (pid %d)", _shown(s.traces_endpoint),
                     _shown(s.metrics_endpoint), os.getpid())

    def _install(self, tracer_provider: Any, meter_provider: Any) -> None:
        from opentelemetry.semconv._incubating.metrics import gen_ai_metrics as m

        from ..buildinfo import __version__

        self._tracer_provider = tracer_provider
        self._tracer = tracer_provider.get_tracer("llmproxy", __version__) \
            if tracer_provider is not None else None
        self._meter_provider = meter_provider
        if meter_provider is None:
            self._duration = self._tokens = self._ttfc = self._tpoc = None
            return
        meter = meter_provider.get_meter("llmproxy", __version__)
        self._duration = meter.create_histogram(
            m.GEN_AI_CLIENT_OPERATION_DURATION, unit="s",
            description="GenAI operation duration.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self._tokens = meter.create_histogram(
            m.GEN_AI_CLIENT_TOKEN_USAGE, unit="{token}",
            description="Number of input and output tokens used.",
            explicit_bucket_boundaries_advisory=TOKEN_BUCKETS)
        self._ttfc = meter.create_histogram(
            m.GEN_AI_CLIENT_OPERATION_TIME_TO_FIRST_CHUNK, unit="s",
            description="Time to receive the first chunk of a streamed response.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)
        self._tpoc = meter.create_histogram(
            m.GEN_AI_CLIENT_OPERATION_TIME_PER_OUTPUT_CHUNK, unit="s",
            description="Mean time per output chunk after the first, once per stream.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS)

    def shutdown(self) -> None:
        """End the spans still open, then flush and stop the exporters (process exit)."""
        with self._lock:
            if self._closed or not self._ready:
                return
            self._closed = True
            open_calls, self._open = list(self._open), set()
        for ex in open_calls:
            span = ex.span
            if span is not None and span.is_recording():
                span.set_attributes({OUTCOME: INTERRUPTED, self.keys.error_type: INTERRUPTED})
                span.set_status(self._error)
                span.end()
        for provider in (self._tracer_provider, self._meter_provider):
            if provider is not None:
                _flush_and_stop(provider)

    # -- the hooks ----------------------------------------------------------------------------
    def start(self, ex: Exchange, headers: Any) -> Any:
        """The identified call's span (started now), or a marker when traces are off."""
        if not self._ready:
            self._setup()
        if self._tracer is None:
            return self._untraced if self._meter_provider is not None else None
        k = self.keys
        route = self._routes.get(ex.provider or "")
        operation = operation_name(ex.dialect, ex.upstream_path)
        model = _clip(ex.model)
        attributes: dict[str, Any] = {k.operation: operation, k.request_stream: ex.streaming,
                                      REQUEST_ID: ex.request_id}
        if route is not None:
            attributes.update(route.attributes)
        if model:
            attributes[k.request_model] = model
        max_tokens = getattr(ex.request_info, "max_output_tokens", None)
        if max_tokens is not None:
            attributes[k.max_tokens] = max_tokens
        if ex.user:
            attributes[USER] = ex.user
        if ex.key_fingerprint:
            attributes[KEY_FINGERPRINT] = ex.key_fingerprint
        parent = self._root
        traceparent = headers.get("traceparent")
        if traceparent:
            carrier = {"traceparent": traceparent}
            tracestate = headers.get("tracestate")
            if tracestate:
                carrier["tracestate"] = tracestate
            parent = self._propagator.extract(carrier, context=self._root)
        span = self._tracer.start_span(f"{operation} {model}" if model else operation,
                                       context=parent, kind=self._kind, attributes=attributes)
        if span.is_recording():
            self._open.add(ex)
        return span

    def inject(self, ex: Exchange, headers: dict[str, str]) -> None:
        """Replace any traceparent/tracestate in the outgoing headers with ones naming the
        call's span (unless propagation is off for its provider)."""
        route = self._routes.get(ex.provider or "")
        if route is None or not route.propagate or ex.span is None \
                or not ex.span.get_span_context().is_valid:
            return
        for name in [n for n in headers if n.lower() in ("traceparent", "tracestate")]:
            del headers[name]
        self._propagator.inject(headers, context=self._trace.set_span_in_context(ex.span))

    def finish(self, ex: Exchange) -> None:
        """Terminal-event listener: complete and end the span, record the metrics."""
        span = ex.span
        if span is None:
            return
        failure = error_type(ex)
        tokens = self._tokens_of(ex)
        if span.is_recording():
            self._open.discard(ex)
            span.set_attributes(self._end_attributes(ex, failure, tokens))
            if failure is not None:
                span.set_status(self._error)
            span.end()
        if self._duration is not None:
            self._record(ex, failure, tokens)

    # -- helpers ------------------------------------------------------------------------------
    def _end_attributes(self, ex: Exchange, failure: str | None,
                        tokens: dict[str, int] | None) -> dict[str, Any]:
        k = self.keys
        meta = ex.meta
        # Every attribute costs CPU twice (set, then encoded for export): what a success
        # implies (status 200, zero cached or reasoning tokens) is left out.
        out: dict[str, Any] = {OUTCOME: str(_value(ex.outcome))}
        if failure is not None:
            out[k.error_type] = failure
            if ex.status is not None:
                out[k.status_code] = ex.status
        if meta.model:
            out[k.response_model] = _clip(meta.model)
        if meta.response_id:
            out[k.response_id] = _clip(meta.response_id)
        if meta.finish_reason:
            out[k.finish_reasons] = (_clip(meta.finish_reason),)
        if ex.streaming and ex.ttfb is not None:
            out[k.time_to_first_chunk] = ex.ttfb
        if tokens is not None:
            usage = meta.usage
            if usage.input_tokens is not None or usage.cached_tokens is not None:
                out[k.input_tokens] = tokens["input"]
            if usage.output_tokens is not None:
                out[k.output_tokens] = tokens["output"]
            if tokens["cached"]:
                out[k.cache_read] = tokens["cached"]
            if tokens["cache_creation"]:
                out[k.cache_creation] = tokens["cache_creation"]
            if tokens["reasoning"]:
                out[k.reasoning] = tokens["reasoning"]
        cost = exchange_cost(ex)
        if cost is not None:
            out[COST_USD] = cost
        decision = ratelimit_decision(ex)
        if decision is not None:
            out[RATELIMIT_DECISION] = decision[0]
            if decision[1]:
                out[RATELIMIT_POLICY] = decision[1]
        return out

    @staticmethod
    def _tokens_of(ex: Exchange) -> dict[str, int] | None:
        """Normalized token counts, or None when nothing was reported (or the route only
        counts tokens: its figure is a measurement, not usage)."""
        usage = ex.meta.usage
        dialect = DIALECTS.get(ex.dialect or "")
        if dialect is None or usage.input_tokens is None and usage.output_tokens is None \
                or dialect.is_token_count(ex.upstream_path.partition("?")[0].rstrip("/")):
            return None
        return dialect.normalized_tokens(usage)

    def _record(self, ex: Exchange, failure: str | None,
                tokens: dict[str, int] | None) -> None:
        k = self.keys
        route = self._routes.get(ex.provider or "")
        attributes: dict[str, Any] = {
            k.operation: operation_name(ex.dialect, ex.upstream_path)}
        if route is not None:
            attributes.update(route.attributes)
        requested = _clip(getattr(ex.request_info, "model", None))
        if requested:
            attributes[k.request_model] = requested
        if ex.meta.model:
            attributes[k.response_model] = _clip(ex.meta.model)
        timed = {**attributes, k.error_type: failure} if failure is not None else attributes
        assert self._duration is not None and self._tokens is not None
        if ex.duration is not None:
            self._duration.record(ex.duration, timed)
        if tokens is not None:
            if ex.meta.usage.input_tokens is not None:
                self._tokens.record(tokens["input"], {**attributes, k.token_type: k.input_type})
            if ex.meta.usage.output_tokens is not None:
                self._tokens.record(tokens["output"], {**attributes, k.token_type: k.output_type})
        if ex.streaming and ex.ttfb is not None and self._ttfc is not None \
                and self._tpoc is not None:
            self._ttfc.record(ex.ttfb, timed)
            if ex.chunks > 1 and ex.last_chunk_at is not None:
                first = ex.started + ex.ttfb
                self._tpoc.record(max(ex.last_chunk_at - first, 0.0) / (ex.chunks - 1), timed)


def _flush_and_stop(provider: Any, attempts: int = 3) -> None:
    """Export what is queued, then stop. On gunicorn's quick exit (SIGINT, SIGQUIT) the worker
    leaves through a greenlet that raises SystemExit again while this waits for the export:
    the process is exiting anyway, so the flush is taken up again instead of abandoned."""
    for _ in range(attempts):
        try:
            provider.force_flush()
            break
        except SystemExit:
            continue
        except Exception:  # exit goes on whatever the exporter does
            log.exception("telemetry flush failed")
            break
    try:
        provider.shutdown()
    except (Exception, SystemExit):
        log.exception("telemetry shutdown failed")


def install(app: Flask, settings: TelemetrySettings,
            routes: Mapping[str, str]) -> Callable[[Exchange], None]:
    """Attach telemetry to ``app`` (``routes``: provider name -> base URL); returns the
    terminal-event listener to register."""
    telemetry = Telemetry(settings, routes)
    app.extensions[EXTENSION_KEY] = telemetry
    return telemetry.finish


def get_telemetry(app: Flask) -> Telemetry | None:
    found = app.extensions.get(EXTENSION_KEY)
    return found if isinstance(found, Telemetry) else None
