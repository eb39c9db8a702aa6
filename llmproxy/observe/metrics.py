"""Prometheus metrics: definitions, the terminal-event listener, in-flight hooks, ``/metrics``.

``init_app`` wires them to the request seam: a listener counts each finished exchange
(requests, durations, tokens, cost, upstream errors); request hooks track in-flight requests
and open streams; a blueprint serves ``/metrics``. The metric reference is in
docs/observability.md.

Under gunicorn the metrics live in ``PROMETHEUS_MULTIPROC_DIR`` (prepared by gunicorn.conf.py)
so a scrape of any worker sums every worker. That variable must be set before this module
is first imported: prometheus-client picks its storage at import time.
"""

from __future__ import annotations

import hmac
import os
import threading
import time
import warnings
from collections import OrderedDict
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

from ..config import MetricsSettings
from ..exchange import Exchange, Outcome
from ..pricing import PricingTable
from ..providers import DIALECTS
from .records import MAX_FIELD_CHARS

# The *_created series double the output and no dashboard uses them.
disable_created_metrics()  # type: ignore[no-untyped-call]

EXTENSION_KEY = "llmproxy.metrics"
OTHER = "other"
UNKNOWN = "unknown"

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
RATELIMIT_EVICTIONS = Counter(
    "llmproxy_ratelimit_evictions",
    "Rate-limit counters the memory backend forgot at its cap (memory.max_counters).")
RECORDS_DROPPED = Counter("llmproxy_usage_records_dropped",
                          "Usage records not written: queue_full, write_error, closed.",
                          ["reason"])
KEY_REQUESTS = Counter("llmproxy_key_requests",
                       "Finished requests made with a proxy key, by key id and team.",
                       ["key_id", "team", "provider", "status_class"])
KEY_TOKENS = Counter("llmproxy_key_tokens", "Tokens used through each proxy key, by kind.",
                     ["key_id", "team", "kind"])
KEY_REFUSALS = Counter("llmproxy_key_refusals",
                       "Calls refused by the proxy-key check: missing, unknown, revoked, "
                       "expired, forbidden, unavailable.", ["reason"])
# liveall: one series per live worker (label pid); sum() them for the whole server.
IN_FLIGHT = Gauge("llmproxy_in_flight_requests",
                  "Provider requests in progress in this worker.", multiprocess_mode="liveall")
OPEN_STREAMS = Gauge("llmproxy_open_streams",
                     "Streamed responses being sent by this worker.", multiprocess_mode="liveall")

# mostrecent: the value last set by any worker (each sets what the shared store told it).
BUDGET_SPEND = Gauge("llmproxy_budget_spend_usd",
                     "Settled spend of a proxy key's budget window, as last seen by a call.",
                     ["key_id", "window"], multiprocess_mode="mostrecent")
BUDGET_REMAINING = Gauge("llmproxy_budget_remaining_usd",
                         "Budget left in a proxy key's window after the calls in flight.",
                         ["key_id", "window"], multiprocess_mode="mostrecent")
BUDGET_DENIALS = Counter("llmproxy_budget_denials", "Calls refused for lack of budget.",
                         ["scope", "window"])
LEDGER_DROPPED = Counter("llmproxy_budget_ledger_dropped_rows",
                         "Spend rows not written to the ledger (its queue was full).")
#: Proxy keys with budget gauges per worker: beyond it, the key whose calls are the longest ago
#: loses its series, so the label stays bounded however many keys come and go.
MAX_BUDGET_KEYS = 1000
#: Seconds between two updates of one key's gauges by one worker: a scrape every 15 s or
#: more sees the same, and a busy key does not pay two shared-memory writes per call.
BUDGET_GAUGE_EVERY = 1.0
# key id -> {window: when this worker last set its gauges}, the least recently used key first
_budget_keys: OrderedDict[str, dict[str, float]] = OrderedDict()
_budget_lock = threading.Lock()
# prometheus-client cannot drop a series from its multi-process files (docs/observability.md),
# and warns so at every remove(); removing still frees the worker's own copy.
warnings.filterwarnings("ignore", "Removal of labels has not been implemented", UserWarning)


def record_budget(kind: str, name: str, window: str, spent: float, remaining: float) -> None:
    """The spend and remaining budget of a proxy key's window (other scopes: not labelled)."""
    if kind != "key":
        return
    now = time.monotonic()
    with _budget_lock:
        windows = _budget_keys.get(name)
        if windows is None:
            windows = _budget_keys[name] = {}
            while len(_budget_keys) > MAX_BUDGET_KEYS:
                _forget_budget_key(*_budget_keys.popitem(last=False))
        else:
            _budget_keys.move_to_end(name)
            last = windows.get(window)
            if last is not None and now - last < BUDGET_GAUGE_EVERY:
                return
        windows[window] = now
        _child(BUDGET_SPEND, name, window).set(spent)
        _child(BUDGET_REMAINING, name, window).set(remaining)


def _forget_budget_key(name: str, windows: dict[str, float]) -> None:
    """Drop an evicted key's series from both gauges (and the cached children)."""
    for window in windows:
        for gauge in (BUDGET_SPEND, BUDGET_REMAINING):
            gauge.remove(name, window)
            _children.pop((id(gauge), (name, window)), None)


def record_budget_denial(kind: str, window: str) -> None:
    _child(BUDGET_DENIALS, kind, window).inc()


def record_ledger_dropped(count: int) -> None:
    LEDGER_DROPPED.inc(count)


def record_ratelimit_denial(scope_kind: str, metric: str, window: str) -> None:
    """Count one denial; ``scope_kind`` is the scope's kind (global, provider, model, key,
    user), never its value, so the label stays bounded."""
    RATELIMIT_DENIALS.labels(scope_kind, metric).inc()


def record_ratelimit_backend_error(operation: str, action: str) -> None:
    RATELIMIT_BACKEND_ERRORS.inc()


def record_ratelimit_evictions(count: int) -> None:
    RATELIMIT_EVICTIONS.inc(count)


def record_dropped_usage_record(reason: str) -> None:
    RECORDS_DROPPED.labels(reason).inc()


def record_key_refusal(reason: str) -> None:
    _child(KEY_REFUSALS, reason).inc()


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
    the first ``limit`` other names seen by this process too, if not longer than a record
    field (:data:`~llmproxy.observe.records.MAX_FIELD_CHARS`); any other is ``other``."""

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
            if len(self._seen) < self._limit and len(model) <= MAX_FIELD_CHARS:
                self._seen.add(model)
                return model
        return OTHER


class Metrics:
    """Per-app settings and the terminal-event listener."""

    def __init__(self, settings: MetricsSettings, pricing: PricingTable) -> None:
        self.enabled = settings.enabled
        self.bearer_token = settings.bearer_token
        self.models = ModelLabels(pricing, settings.max_models)

    def on_finish(self, ex: Exchange) -> None:
        """Terminal event: close the gauges, count the exchange."""
        if ex.counted_in_flight:
            IN_FLIGHT.dec()
        if ex.counted_stream:
            OPEN_STREAMS.dec()
        if self.enabled:
            self._count(ex, ex.cost_usd)

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
        # Proxy keys are issued by the operator, so their ids are a bounded label set.
        key_id, team = ex.key_id, ex.team or ""
        if key_id is not None:
            _child(KEY_REQUESTS, key_id, team, provider, status_class).inc()
        dialect = DIALECTS.get(ex.dialect or "")
        if dialect is not None and not dialect.is_token_count(
                ex.upstream_path.partition("?")[0].rstrip("/")):
            for kind, count in dialect.normalized_tokens(ex.meta.usage).items():
                if count:
                    _child(TOKENS, provider, model, kind).inc(count)
                    if key_id is not None and kind in ("input", "output"):
                        _child(KEY_TOKENS, key_id, team, kind).inc(count)
        if cost is not None:
            _child(COST, provider, model).inc(cost)
        elif ex.status is not None and ex.status < 400:
            _child(UNPRICED, provider, model).inc()
        if ex.outcome == Outcome.UPSTREAM_ERROR:
            _child(UPSTREAM_ERRORS, provider, ex.error_kind or UNKNOWN).inc()


# -- request hooks -------------------------------------------------------------------------

def _count_in_flight() -> None:
    """``before_request`` (after identification and rate limiting): a provider call starts."""
    ex: Exchange | None = g.get("exchange")
    if ex is not None and not ex.finished and not ex.counted_in_flight:
        ex.counted_in_flight = True
        IN_FLIGHT.inc()


def _count_open_stream(response: Response) -> Response:
    """``after_request``: a streamed body is about to be sent; it closes at the terminal event."""
    ex: Exchange | None = g.get("exchange")
    if (ex is not None and not ex.finished and response.is_streamed
            and (ex.streaming or response.mimetype == "text/event-stream")
            and not ex.counted_stream):
        ex.counted_stream = True
        OPEN_STREAMS.inc()
    return response


# -- routes ----------------------------------------------------------------------------------

bp = Blueprint("metrics", __name__)


def render_metrics() -> bytes:
    """Prometheus text for this process, or for every worker in multiprocess mode."""
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@bp.route("/metrics", methods=["GET"])
def metrics() -> Response:
    obs = current_app.extensions.get(EXTENSION_KEY)
    if obs is None or not obs.enabled:
        return _json({"error": "metrics are disabled"}, 404)
    if obs.bearer_token:
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), obs.bearer_token.encode()):
            resp = _json({"error": "a valid bearer token is required"}, 401)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="metrics"'
            return resp
    return Response(render_metrics(), status=200, content_type=CONTENT_TYPE_LATEST)


def _json(body: dict[str, Any], status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


def init_app(app: Flask, settings: MetricsSettings, pricing: PricingTable) -> Metrics:
    """The in-flight hooks and the route; the caller registers :meth:`Metrics.on_finish`."""
    metrics = Metrics(settings, pricing)
    app.extensions[EXTENSION_KEY] = metrics
    app.before_request(_count_in_flight)
    app.after_request(_count_open_stream)
    app.register_blueprint(bp)
    return metrics


def init_disabled(app: Flask) -> None:
    """``metrics.enabled: false``: nothing is counted and ``/metrics`` answers 404."""
    app.register_blueprint(bp)
