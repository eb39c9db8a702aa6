"""The app factory: settings, providers, hooks and listeners wired into one Flask app."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from flask import Flask, Response, current_app, g, request
from flask_cors import CORS
from werkzeug.exceptions import HTTPException

from . import logs, relay
from .config import Settings, build_settings, load_raw
from .errors import error_response
from .health import HealthTracker
from .health import bp as health_bp
from .pricing import PricingTable
from .providers import build as build_provider
from .state import EXTENSION_KEY, ProxyState, get_state
from .telemetry import parse_telemetry
from .upstream import Upstream

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
    "openai-processing-ms", "openai-version",
]


def build_app(config: Mapping[str, Any] | Settings | None = None) -> Flask:
    """Build the WSGI app; ``config`` is deep-merged over the YAML files (or ready Settings)."""
    settings = config if isinstance(config, Settings) else build_settings(load_raw(config))
    app = Flask(__name__, static_folder=None)
    app.url_map.merge_slashes = False  # "//host" must stay visible to the path check
    app.url_map.strict_slashes = False
    logs.configure(settings.log_level, settings.log_format)

    providers = {name: build_provider(ps) for name, ps in settings.providers.items()}
    health = HealthTracker(list(providers), settings.health_failure_threshold,
                           settings.health_window_seconds)
    state = ProxyState(
        settings=settings,
        providers=providers,
        upstream=Upstream(settings.connect_timeout, settings.read_timeout, settings.pool_maxsize),
        health=health,
    )
    # Listener order matters only for reading: the access log comes first so that it is
    # also the one listener kept for requests that reach no provider (404s, /health).
    state.on_finish(logs.exchange_logger(PricingTable(settings.raw.get("pricing"))))
    state.on_finish(health.observe)
    # -- telemetry hook: OpenTelemetry spans and metrics; nothing registered when off --
    telemetry_settings = parse_telemetry(settings.raw.get("telemetry"), os.environ)
    if telemetry_settings.enabled:
        from .telemetry import install as install_telemetry

        state.on_finish(install_telemetry(app, telemetry_settings,
                                          {n: p.base_url for n, p in providers.items()}))
    app.extensions[EXTENSION_KEY] = state

    CORS(app, origins=settings.cors_origins, max_age=settings.cors_max_age,
         send_wildcard=settings.cors_origins == "*",
         expose_headers=EXPOSE_HEADERS, allow_headers="*",
         methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"])
    app.before_request(relay.prepare)
    app.after_request(relay.finish_on_close)

    app.register_blueprint(health_bp)
    for name, provider in providers.items():
        bp = provider.blueprint(relay.proxy_view)
        app.register_blueprint(bp, url_prefix=f"/{name}")
        app.register_blueprint(bp, url_prefix=f"/meta/<user_id>/{name}", name=f"{name}_meta")

    _register_error_handlers(app)
    _init_features(app, settings.raw)
    return app


def _init_features(app: Flask, raw: dict[str, Any]) -> None:
    """Optional parts that hook into the request seam (before/after hooks, terminal event)."""
    try:
        from .ratelimit import init_app as init_ratelimit
    except ImportError:  # pragma: no cover - while the package is absent
        pass
    else:
        init_ratelimit(app, raw)
    try:
        from .metrics import init_app as init_metrics
    except ImportError:  # pragma: no cover
        pass
    else:
        init_metrics(app, raw)


def _dialect() -> str | None:
    """The error shape for this request: its provider's, also for unmatched provider paths."""
    ex = g.get("exchange_any")
    if ex is not None and ex.dialect:
        return str(ex.dialect)
    parts = request.path.split("/", 5)
    name = parts[3] if len(parts) > 3 and parts[1] == "meta" else parts[1] if len(parts) > 1 \
        else ""
    provider = get_state(current_app).providers.get(name)
    return provider.dialect if provider is not None else None


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
