"""The app factory: every part of the proxy wired into one Flask app, in request order.

Request path: ``inbound.prepare`` (identify the call) -> the rate limiter's check ->
metrics' in-flight count -> ``relay.proxy_view`` (send, relay, stream) -> the one terminal
event, heard by the listeners in the order registered here: pricing first (every other
listener reads ``ex.cost_usd``), then the access log, the usage-record file, metrics, the
limiter's reconciliation and provider health.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, current_app, g, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from . import inbound, relay
from .config import Settings, build_settings, load_raw
from .errors import error_response
from .exchange import Exchange
from .inflight import InFlight
from .observe import health, logs, metrics, records, telemetry
from .pricing import PricingTable
from .providers import DIALECTS, Provider
from .ratelimit import RateLimit
from .state import EXTENSION_KEY, ProxyState, get_state
from .upstream import Upstream

if TYPE_CHECKING:
    from .budgets.policy import BudgetPolicy

#: Response headers browsers may read: ours, the rate-limit ones and the providers' ids.
EXPOSE_HEADERS = [
    "X-Proxy-Request-ID", "X-Request-ID", "Request-Id", "Retry-After", "Retry-After-Ms",
    "RateLimit", "RateLimit-Policy", "X-RateLimit-Scope", "X-RateLimit-Metric",
    "X-RateLimit-Window", "X-RateLimit-Limit", "X-RateLimit-Remaining", "X-RateLimit-Reason",
    "x-ratelimit-limit-requests", "x-ratelimit-remaining-requests", "x-ratelimit-reset-requests",
    "x-ratelimit-limit-tokens", "x-ratelimit-remaining-tokens", "x-ratelimit-reset-tokens",
    "anthropic-ratelimit-requests-limit", "anthropic-ratelimit-requests-remaining",
    "anthropic-ratelimit-requests-reset", "anthropic-ratelimit-tokens-limit",
    "anthropic-ratelimit-tokens-remaining", "anthropic-ratelimit-tokens-reset",
    "openai-processing-ms", "openai-version", "x-should-retry", "X-Budget-Scope",
    "X-Budget-Window", "X-Budget-Limit-USD", "X-Budget-Remaining-USD",
]


def build_app(config: Mapping[str, Any] | Settings | None = None) -> Flask:
    """Build the WSGI app; ``config`` is deep-merged over the YAML files (or ready Settings)."""
    settings = config if isinstance(config, Settings) else build_settings(load_raw(config))
    app = Flask("llmproxy", static_folder=None)
    app.url_map.merge_slashes = False  # "//host" must stay visible to the path check
    app.url_map.strict_slashes = False
    logs.configure(settings.logging.level, settings.logging.format)

    providers = {name: Provider(name, ps.base_url, DIALECTS[ps.dialect],
                                ps.api_key.reveal() if ps.api_key else None)
                 for name, ps in settings.providers.items()}
    up = settings.upstream
    state = ProxyState(settings=settings, providers=providers,
                       upstream=Upstream(up.connect_timeout, up.read_timeout, up.pool_maxsize),
                       inflight=InFlight(settings.server.body_timeout,
                                         settings.server.send_timeout))
    app.extensions[EXTENSION_KEY] = state
    pricing = PricingTable(settings.pricing)

    # before_request hooks run in registration order: CORS preflights are answered first,
    # then the call is identified, limited, counted as in flight.
    CORS(app, origins=settings.cors.origins, max_age=settings.cors.max_age,
         send_wildcard=settings.cors.origins == "*",
         expose_headers=EXPOSE_HEADERS, allow_headers="*",
         methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    app.before_request(inbound.prepare)
    app.after_request(relay.finish_on_close)

    state.on_finish(pricing.price_exchange)
    _init_keys(app, state)
    budgets = _init_budgets(state, pricing, counting=settings.metrics.enabled)
    state.on_finish(logs.log_exchange)
    state.other_listeners.append(logs.log_exchange)
    counting = settings.metrics.enabled
    if settings.usage_records.enabled:
        sink = records.open_sink(app, settings.usage_records,
                                 metrics.record_dropped_usage_record if counting else None)
        state.on_finish(sink.on_finish)
    limiter = None
    if settings.ratelimit.enabled or budgets is not None:
        limiter = RateLimit(
            settings.ratelimit,
            on_denied=metrics.record_ratelimit_denial if counting else None,
            on_backend_error=metrics.record_ratelimit_backend_error if counting else None,
            on_evicted=metrics.record_ratelimit_evictions if counting else None,
            budgets=budgets,
            on_budget=metrics.record_budget if counting else None,
            on_budget_denied=metrics.record_budget_denial if counting else None)
        limiter.install(app, state.on_finish)
    if budgets is not None:  # after the limiter: spend is settled, then written down
        _init_ledger(app, state, counting)
    if counting:
        state.on_finish(metrics.init_app(app, settings.metrics, pricing).on_finish)
    else:
        metrics.init_disabled(app)
    if settings.telemetry.enabled:  # off: nothing registered, OpenTelemetry never imported
        state.on_finish(telemetry.install(app, settings.telemetry,
                                          {n: p.base_url for n, p in providers.items()}))
    tracker = health.Health(providers, up.health_failure_threshold, up.health_window_seconds,
                            limiter)
    state.on_finish(tracker.observe)
    health.init_app(app, tracker)

    if state.key_store is not None and settings.auth.mode != "passthrough":
        from .keys.guard import open_guard  # proxy keys, checked by inbound.prepare

        state.keys = open_guard(state.key_store, settings,
                                metrics.record_key_refusal if counting else None)
    for name, provider in providers.items():
        bp = provider.blueprint(relay.proxy_view)
        app.register_blueprint(bp, url_prefix=f"/{name}")
        app.register_blueprint(bp, url_prefix=f"/meta/<user_id>/{name}", name=f"{name}_meta")
    _register_error_handlers(app)
    return app


def _init_keys(app: Flask, state: ProxyState) -> None:
    """Open the key database (only when keys or the admin API are in use) and mount /admin.

    The schema is migrated here, in each worker (the migration takes a lock, so workers and
    hosts starting together are safe); if the database is unreachable now, the store
    migrates on its first successful use instead, and the worker starts all the same.
    """
    auth = state.settings.auth
    if auth.mode == "passthrough" and not auth.admin_token \
            and not state.settings.budgets.enabled:
        return
    from .keys import admin
    from .keys.store import KeyStore, KeyStoreError

    store = KeyStore.from_url(auth.database_url)
    try:
        store.migrate()
    except KeyStoreError as exc:
        app.logger.error("key database not ready at start-up (%s): retried on first use", exc)
    state.key_store = store
    if auth.admin_token:
        app.register_blueprint(admin.blueprint(store, auth.admin_token, state.providers),
                               url_prefix="/admin")


def _init_budgets(state: ProxyState, pricing: PricingTable,
                  counting: bool) -> BudgetPolicy | None:
    """The budget policy over the key database (budgets.enabled), charging after pricing."""
    settings = state.settings.budgets
    store = state.key_store
    if not settings.enabled or store is None:
        return None
    from .budgets.policy import BudgetBook
    from .budgets.policy import BudgetPolicy as Policy

    book = BudgetBook(store.budgets, settings.refresh_seconds)
    policy = Policy(settings, pricing, book, store.spent)
    state.on_finish(policy.charge)
    return policy


def _init_ledger(app: Flask, state: ProxyState, counting: bool) -> None:
    """Every call's spend, written to the ledger in batches (budgets.enabled)."""
    from .budgets.ledger import open_ledger
    from .budgets.policy import spend_row

    settings = state.settings.budgets
    assert state.key_store is not None
    writer = open_ledger(app, state.key_store, settings.ledger_flush_seconds,
                         max_pending=settings.max_pending,
                         on_dropped=metrics.record_ledger_dropped if counting else None)

    def record(ex: Exchange) -> None:
        row = spend_row(ex)
        if row is not None:
            writer.add(row)

    state.on_finish(record)


def _dialect() -> str | None:
    """The error shape for this request: its provider's, also for unmatched provider paths."""
    ex = g.get("exchange_any")
    if ex is not None and ex.dialect:
        return str(ex.dialect)
    parts = request.path.split("/", 5)
    name = parts[3] if len(parts) > 3 and parts[1] == "meta" else parts[1] if len(parts) > 1 \
        else ""
    provider = get_state(current_app).providers.get(name)
    return provider.dialect.name if provider is not None else None


def _register_error_handlers(app: Flask) -> None:
    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException) -> Response:
        status = exc.code or 500
        message = {404: "Unknown route.", 405: "Method not allowed.",
                   413: "Request body too large."}.get(status, exc.description or exc.name)
        resp = error_response(_dialect(), status, message, request_id=g.get("request_id"))
        allow = exc.get_response().headers.get("Allow") if status == 405 else None
        if allow:
            resp.headers["Allow"] = allow
        return resp

    @app.errorhandler(Exception)
    def unexpected(exc: Exception) -> Response:
        app.logger.error("unhandled error", exc_info=exc)
        return error_response(_dialect(), 500, "Internal proxy error.",
                              request_id=g.get("request_id"))
