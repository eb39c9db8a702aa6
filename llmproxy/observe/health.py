"""``/health`` (liveness, per-provider status from real traffic) and ``/health/ready``.

Nothing here calls a provider: a provider's status comes from the answers this worker saw
(connection failures and timeouts make it ``degraded``). Readiness is decided here: at
least one provider is configured, and the rate-limit store (when limits are on) answers a
ping or, with ``on_error: open``, need not; 503 when a check fails, so a load balancer stops
sending this worker traffic it cannot serve.
"""

from __future__ import annotations

import platform
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from flask import Blueprint, Flask, Response, current_app, json, request

from .. import buildinfo
from ..exchange import ErrorKind, Exchange
from ..providers import Provider
from ..ratelimit import RateLimit
from ..ratelimit.store import StoreError

EXTENSION_KEY = "llmproxy.health"
_FAILURE_KINDS = (ErrorKind.CONNECT, ErrorKind.TIMEOUT, ErrorKind.MIDSTREAM)
_STARTED = time.time()

#: A readiness check: returns at least ``{"ok": bool}``; must answer well within a probe's timeout.
ReadyCheck = Callable[[], dict[str, Any]]


def ratelimit_check(limiter: RateLimit | None) -> ReadyCheck:
    """Readiness of the rate-limit store: a ping with the store's own short timeout.

    A store that does not answer makes the worker unready only with ``on_error: closed``,
    where every limited request is refused; with ``open`` the worker still serves (without
    limits), so it stays ready and the answer says the store is down.
    """

    def check() -> dict[str, Any]:
        if limiter is None:
            return {"ok": True, "backend": "disabled"}
        backend = limiter.settings.backend
        started = time.monotonic()
        try:
            limiter.store.ping()
        except StoreError as exc:  # only the error's class: a message may name the URL
            on_error = limiter.settings.redis.on_error
            return {"ok": on_error == "open", "backend": backend, "available": False,
                    "on_error": on_error, "error": str(exc)}
        return {"ok": True, "backend": backend, "available": True,
                "latency_ms": round((time.monotonic() - started) * 1000, 1)}

    return check


@dataclass(slots=True)
class _ProviderHealth:
    consecutive_failures: int = 0
    last_failure: float = 0.0
    last_success: float = 0.0
    last_failure_kind: str | None = None


class Health:
    """Counts connection failures and timeouts per provider; never calls a provider itself."""

    def __init__(self, providers: Mapping[str, Provider], threshold: int, window: float,
                 limiter: RateLimit | None = None) -> None:
        self.providers = dict(providers)
        self._state = {name: _ProviderHealth() for name in providers}
        self._threshold = threshold
        self._window = window
        self._checks = {"ratelimit_backend": ratelimit_check(limiter)}
        self._lock = threading.Lock()

    def observe(self, ex: Exchange) -> None:
        """Terminal-event listener: a response from the provider counts as success."""
        state = self._state.get(ex.provider or "")
        if state is None:
            return
        # Only what the provider itself did counts: the proxy's own 404/413/429 do not.
        upstream_status = ex.upstream_status
        failed = ex.error_kind in _FAILURE_KINDS or upstream_status in (502, 503, 504)
        if not failed and upstream_status is None:
            return
        now = time.monotonic()
        with self._lock:
            if failed:
                state.consecutive_failures += 1
                state.last_failure = now
                state.last_failure_kind = str(ex.error_kind or f"http_{upstream_status}")
            else:
                state.consecutive_failures = 0
                state.last_success = now

    def status(self, name: str) -> dict[str, object]:
        state = self._state[name]
        now = time.monotonic()
        if (state.consecutive_failures >= self._threshold
                and now - state.last_failure <= self._window):
            status = "degraded"
        elif state.last_success or state.last_failure:
            status = "healthy"
        else:
            status = "unknown"  # no traffic yet in this worker
        return {
            "status": status,
            "consecutive_failures": state.consecutive_failures,
            "last_failure_kind": state.last_failure_kind,
            "seconds_since_success": round(now - state.last_success, 1)
            if state.last_success else None,
        }

    def liveness(self) -> dict[str, Any]:
        providers = {}
        for name, provider in self.providers.items():
            providers[name] = {
                "provider": name,
                "base_url": provider.base_url,
                "dialect": provider.dialect.name,
                "streaming_support": True,
                **self.status(name),
            }
        degraded = any(p["status"] == "degraded" for p in providers.values())
        info = buildinfo.get()
        return {
            "status": "degraded" if degraded else "healthy",
            "timestamp": int(time.time()),
            "version": info["version"],
            "git_commit": info["git_commit"],
            "build_time": info["build_time"],
            "python_version": platform.python_version(),
            "uptime_seconds": round(time.time() - _STARTED, 3),
            "providers": providers,
        }

    def readiness(self) -> tuple[dict[str, Any], bool]:
        """Every check's answer, and whether this worker can serve."""
        checks = {"config": {"ok": bool(self.providers), "providers": sorted(self.providers)}}
        for name, check in self._checks.items():
            try:
                checks[name] = check()
            except Exception as exc:  # a failing check means not ready, never a 500
                checks[name] = {"ok": False, "error": type(exc).__name__}
        ok = all(c.get("ok") for c in checks.values())
        body = {"status": "ready" if ok else "not_ready", "timestamp": int(time.time()),
                "checks": checks}
        return body, ok


bp = Blueprint("health", __name__)


def get_health(app: Flask) -> Health:
    health: Health = app.extensions[EXTENSION_KEY]
    return health


def _json(body: Mapping[str, Any], status: int) -> Response:
    return Response(json.dumps(body), status=status, content_type="application/json")


@bp.route("/health", methods=["GET", "HEAD"])
def health() -> Response:
    if request.args.get("ready"):
        return ready()
    return _json(get_health(current_app).liveness(), 200)


@bp.route("/health/ready", methods=["GET", "HEAD"])
def ready() -> Response:
    body, ok = get_health(current_app).readiness()
    return _json(body, 200 if ok else 503)


def init_app(app: Flask, health: Health) -> None:
    app.extensions[EXTENSION_KEY] = health
    app.register_blueprint(bp)
