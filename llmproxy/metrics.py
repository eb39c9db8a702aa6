"""Prometheus metrics, per-request cost and usage records, and the readiness check.

``init_app`` wires everything to the request seam: a terminal-event listener counts each
finished exchange (requests, durations, tokens, cost, upstream errors) and writes its usage
record; request hooks track in-flight requests and open streams; a blueprint serves
``/metrics`` and ``/health/ready``.

Under gunicorn the metrics live in ``PROMETHEUS_MULTIPROC_DIR`` (prepared by gunicorn.conf.py)
so a scrape of any worker sums every worker. That variable must be set before this module
is first imported: prometheus-client picks its storage at import time.
"""

from __future__ import annotations

import atexit
import hmac
import logging
import os
import threading
import time
from collections.abc import Mapping
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, json, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from .config import ConfigError
from .exchange import UPSTREAM_ERROR, Exchange
from .pricing import PricingTable, exchange_cost, is_token_count, normalized_tokens
from .records import UsageRecordSink, usage_record

log = logging.getLogger(__name__)

# The *_created series double the output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

EXTENSION_KEY = "llmproxy.metrics"
OTHER = "other"
UNKNOWN = "unknown"
MAX_LABEL_LENGTH = 128
READY_TIMEOUT = 0.5  # seconds: a readiness probe must answer well within its own timeout

# 5 ms (a cached small answer) up to 10 min (a long reasoning stream).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                   120.0, 300.0, 600.0)

REQUESTS = Counter("llmproxy_requests", "Finished proxied requests.",
                   ["provider", "model", "status_class", "outcome"])
DURATION = Histogram("llmproxy_request_duration_seconds",
                     "Time from request arrival to the last byte sent (or the failure).",
                     ["provider", "model", "streaming"], buckets=LATENCY_BUCKETS)
TTFB = Histogram("llmproxy_time_to_first_byte_seconds",
                 "Time from request arrival to the first response byte sent to the client.",
                 ["provider", "model", "streaming"], buckets=LATENCY_BUCKETS)
TOKENS = Counter("llmproxy_tokens", "Tokens reported by the provider, by kind.",
                 ["provider", "model", "kind"])
COST = Counter("llmproxy_cost_usd", "Estimated cost in USD from the pricing table.",
               ["provider", "model"])
UNPRICED = Counter("llmproxy_unpriced_requests",
                   "Requests whose cost is unknown (model not in the pricing table, or no usage).",
                   ["provider", "model"])
UPSTREAM_ERRORS = Counter("llmproxy_upstream_errors",
                          "Failures talking to the provider: connect, timeout, midstream.",
                          ["provider", "kind"])
RATELIMIT_DENIALS = Counter("llmproxy_ratelimit_denials", "Requests denied by a rate limit.",
                            ["scope", "metric"])
RATELIMIT_BACKEND_ERRORS = Counter("llmproxy_ratelimit_backend_errors",
                                   "Rate-limit store failures (the request went on per on_error).")
RECORDS_DROPPED = Counter("llmproxy_usage_records_dropped",
                          "Usage records not written: queue_full, write_error, closed.",
                          ["reason"])
# liveall: one series per live worker (label pid); sum() them for the whole server.
IN_FLIGHT = Gauge("llmproxy_in_flight_requests",
                  "Provider requests in progress in this worker.", multiprocess_mode="liveall")
OPEN_STREAMS = Gauge("llmproxy_open_streams",
                     "Streamed responses being sent by this worker.", multiprocess_mode="liveall")

_IN_FLIGHT_FLAG = "_metrics_in_flight"
_STREAM_FLAG = "_metrics_stream"


def record_ratelimit_denial(scope_kind: str, metric: str) -> None:
    """Count one denial; ``scope_kind`` is the scope's kind (global, provider, model, key,
    user), never its value, so the label stays bounded."""
    RATELIMIT_DENIALS.labels(scope_kind, metric).inc()


def record_ratelimit_backend_error() -> None:
    RATELIMIT_BACKEND_ERRORS.inc()


_children: dict[tuple[int, tuple[str, ...]], Any] = {}


def _child(metric: Any, *labels: str) -> Any:
    """``metric.labels(*labels)``, cached: label values are bounded, and ``labels()`` costs
    a lock and a dict rebuild on every call."""
    key = (id(metric), labels)
    child = _children.get(key)
    if child is None:
        child = _children[key] = metric.labels(*labels)
    return child


class ModelLabels:
    """Bounds the ``model`` label: names in the pricing table always count as themselves;
    the first ``limit`` other names seen by this process too; every later one is ``other``."""

    def __init__(self, pricing: PricingTable, limit: int) -> None:
        self._pricing = pricing
        self._limit = limit
        self._seen: set[str] = set()
        self._lock = threading.Lock()

    def __call__(self, provider: str | None, model: str | None) -> str:
        if not model:
            return UNKNOWN
        if model in self._pricing.known_names(provider or ""):
            return model
        with self._lock:
            if model in self._seen:
                return model
            if len(self._seen) < self._limit and len(model) <= MAX_LABEL_LENGTH:
                self._seen.add(model)
                return model
        return OTHER


class Observability:
    """Per-app settings and the finish listener."""

    def __init__(self, raw: Mapping[str, Any]) -> None:
        metrics = _section(raw, "metrics")
        self.enabled = bool(metrics.get("enabled", True))
        self.bearer_token = str(metrics.get("bearer_token") or "") or os.environ.get(
            "LLMPROXY_METRICS_TOKEN", "")
        self.pricing = PricingTable(_section(raw, "pricing"))
        self.models = ModelLabels(self.pricing, _count(metrics, "metrics.max_models", 100))
        self.rate_limiting = dict(_section(_section(raw, "features"), "rate_limiting"))
        self.records: UsageRecordSink | None = None
        records = _section(raw, "usage_records")
        if records.get("enabled"):
            self.records = _open_sink(records)

    def on_finish(self, ex: Exchange) -> None:
        """Terminal event: count the exchange, price it, write its record."""
        if ex.extras.pop(_IN_FLIGHT_FLAG, False):
            IN_FLIGHT.dec()
        if ex.extras.pop(_STREAM_FLAG, False):
            OPEN_STREAMS.dec()
        cost = exchange_cost(self.pricing, ex)
        if self.enabled:
            self._count(ex, cost)
        if self.records is not None:
            self.records.write(usage_record(ex, cost))

    def _count(self, ex: Exchange, cost: float | None) -> None:
        provider = ex.provider or UNKNOWN
        model = self.models(ex.provider, ex.model or ex.meta.model)
        status_class = f"{ex.status // 100}xx" if ex.status else "none"
        _child(REQUESTS, provider, model, status_class, ex.outcome or UNKNOWN).inc()
        streaming = "true" if ex.streaming else "false"
        if ex.duration is not None:
            _child(DURATION, provider, model, streaming).observe(ex.duration)
        if ex.ttfb is not None:
            _child(TTFB, provider, model, streaming).observe(ex.ttfb)
        if not is_token_count(ex):
            tokens = normalized_tokens(ex.meta.usage, ex.dialect or provider)
            for kind, count in tokens.items():
                if count:
                    _child(TOKENS, provider, model, kind).inc(count)
        if cost is not None:
            _child(COST, provider, model).inc(cost)
        elif ex.status is not None and ex.status < 400:
            _child(UNPRICED, provider, model).inc()
        if ex.outcome == UPSTREAM_ERROR:
            _child(UPSTREAM_ERRORS, provider, ex.error_kind or UNKNOWN).inc()


def _section(raw: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = raw.get(key) or {}
    if not isinstance(value, Mapping):
        raise ConfigError(key, "must be a mapping")
    return value


def _count(section: Mapping[str, Any], key: str, default: int) -> int:
    value = section.get(key.rsplit(".", 1)[-1], default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(key, f"must be an integer >= 0, got {value!r}")
    return value


def _open_sink(records: Mapping[str, Any]) -> UsageRecordSink:
    path = str(records.get("path") or "logs/usage.jsonl")
    try:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    except OSError as exc:  # the sink logs each failed write; start anyway
        log.error("usage records: cannot create the directory of %s: %s", path, exc)
    sink = UsageRecordSink(path, _count(records, "usage_records.max_bytes", 100 * 1024 * 1024),
                           _count(records, "usage_records.backups", 5),
                           on_drop=lambda reason: RECORDS_DROPPED.labels(reason).inc())
    # Worker exit (SIGTERM, after in-flight streams finished): write what is still queued.
    atexit.register(sink.close)
    return sink


def get_observability(app: Flask) -> Observability:
    obs: Observability = app.extensions[EXTENSION_KEY]
    return obs


def get_pricing(app: Flask) -> PricingTable:
    return get_observability(app).pricing


# -- request hooks -------------------------------------------------------------------------

def _count_in_flight() -> None:
    """``before_request`` (after identification and rate limiting): a provider call starts."""
    ex: Exchange | None = g.get("exchange")
    if ex is not None and not ex.finished and _IN_FLIGHT_FLAG not in ex.extras:
        ex.extras[_IN_FLIGHT_FLAG] = True
        IN_FLIGHT.inc()


def _count_open_stream(response: Response) -> Response:
    """``after_request``: a streamed body is about to be sent; it closes at the terminal event."""
    ex: Exchange | None = g.get("exchange")
    if (ex is not None and not ex.finished and response.is_streamed
            and (ex.streaming or response.mimetype == "text/event-stream")
            and _STREAM_FLAG not in ex.extras):
        ex.extras[_STREAM_FLAG] = True
        OPEN_STREAMS.inc()
    return response


# -- routes ----------------------------------------------------------------------------------

bp = Blueprint("observability", __name__)


def render_metrics() -> bytes:
    """Prometheus text for this process, or for every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@bp.route("/metrics", methods=["GET"])
def metrics() -> Response:
    obs = get_observability(current_app)
    if not obs.enabled:
        return _json({"error": "metrics are disabled"}, 404)
    if obs.bearer_token:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), obs.bearer_token.encode()):
            resp = _json({"error": "a valid bearer token is required"}, 401)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return resp
    return Response(render_metrics(), status=200, content_type=CONTENT_TYPE_LATEST)


@bp.route("/health/ready", methods=["GET", "HEAD"])
def ready() -> Response:
    return readiness_response(current_app)


def readiness_response(app: Flask) -> Response:
    """200 when this worker can serve: config loaded, rate-limit store reachable; else 503."""
    checks = {"config": _check_config(app), "ratelimit_backend": _check_ratelimit(app)}
    ok = all(c["ok"] for c in checks.values())
    body = {"status": "ready" if ok else "not_ready", "timestamp": int(time.time()),
            "checks": checks}
    return _json(body, 200 if ok else 503)


def _check_config(app: Flask) -> dict[str, Any]:
    from .state import EXTENSION_KEY as STATE_KEY

    state = app.extensions.get(STATE_KEY)
    if state is None or not state.providers:
        return {"ok": False, "error": "no providers configured"}
    return {"ok": True, "providers": sorted(state.providers)}


def _check_ratelimit(app: Flask) -> dict[str, Any]:
    rl = get_observability(app).rate_limiting
    if not rl.get("enabled"):
        return {"ok": True, "backend": "disabled"}
    backend = str(rl.get("backend", "memory"))
    if backend != "redis":
        return {"ok": True, "backend": backend}
    started = time.monotonic()
    try:
        _redis_client(app, rl).ping()
    except Exception as exc:  # any failure means not ready; the URL (maybe a password) stays out
        return {"ok": False, "backend": "redis", "error": type(exc).__name__}
    return {"ok": True, "backend": "redis",
            "latency_ms": round((time.monotonic() - started) * 1000, 1)}


def _redis_client(app: Flask, rl: Mapping[str, Any]) -> Any:
    client = app.extensions.get(EXTENSION_KEY + ".redis")
    if client is None:
        import redis

        from .ratelimit.config import parse as parse_ratelimit

        # The same URL the limiter uses, LLMPROXY_REDIS_URL included.
        url = parse_ratelimit({"features": {"rate_limiting": rl}}).redis.url
        client = redis.Redis.from_url(url, socket_timeout=READY_TIMEOUT,
                                      socket_connect_timeout=READY_TIMEOUT,
                                      retry_on_timeout=False)
        app.extensions[EXTENSION_KEY + ".redis"] = client
    return client


def _json(body: Mapping[str, Any], status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def init_app(app: Flask, raw_config: Mapping[str, Any]) -> Observability:
    """Register the finish listener, the in-flight hooks and the routes."""
    from .state import get_state

    obs = Observability(raw_config)
    app.extensions[EXTENSION_KEY] = obs
    get_state(app).on_finish(obs.on_finish)
    app.before_request(_count_in_flight)
    app.after_request(_count_open_stream)
    app.register_blueprint(bp)
    _listen_to_ratelimit_events()
    return obs


_ratelimit_listening = False


def _listen_to_ratelimit_events() -> None:
    """Count denials and store errors; the event hooks are per process, so register once."""
    global _ratelimit_listening
    if _ratelimit_listening:
        return
    from .ratelimit import events

    events.on_denied(lambda kind, metric, window: record_ratelimit_denial(kind, metric))
    events.on_backend_error(lambda operation, action: record_ratelimit_backend_error())
    _ratelimit_listening = True
