"""Liveness and a per-provider status derived from this worker's recent real traffic."""

from __future__ import annotations

import platform
import threading
import time
from dataclasses import dataclass

from flask import Blueprint, Response, current_app, json, request

from . import buildinfo
from .exchange import Exchange

bp = Blueprint("health", __name__)
#: ``Exchange.extras`` key holding the status the provider answered with.
UPSTREAM_STATUS = "upstream_status"


@dataclass(slots=True)
class _ProviderHealth:
    consecutive_failures: int = 0
    last_failure: float = 0.0
    last_success: float = 0.0
    last_failure_kind: str | None = None


class HealthTracker:
    """Counts connection failures and timeouts per provider; never calls a provider itself."""

    def __init__(self, providers: list[str], threshold: int, window: float) -> None:
        self._state = {name: _ProviderHealth() for name in providers}
        self._threshold = threshold
        self._window = window
        self._lock = threading.Lock()

    def observe(self, ex: Exchange) -> None:
        """Terminal-event listener: a response from the provider counts as success."""
        state = self._state.get(ex.provider or "")
        if state is None:
            return
        # Only what the provider itself did counts: the proxy's own 404/413/429 do not.
        upstream_status = ex.extras.get(UPSTREAM_STATUS)
        failed = ex.error_kind in ("connect", "timeout", "midstream") or upstream_status in (
            502, 503, 504)
        if not failed and upstream_status is None:
            return
        now = time.monotonic()
        with self._lock:
            if failed:
                state.consecutive_failures += 1
                state.last_failure = now
                state.last_failure_kind = ex.error_kind or f"http_{upstream_status}"
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


_STARTED = time.time()


@bp.route("/health", methods=["GET", "HEAD"])
def health() -> Response:
    from .state import get_state

    if request.args.get("ready"):
        from .metrics import readiness_response

        return readiness_response(current_app)
    state = get_state(current_app)
    providers = {}
    for name, provider in state.providers.items():
        providers[name] = {
            "provider": name,
            "base_url": provider.base_url,
            "dialect": provider.dialect,
            "streaming_support": True,
            **state.health.status(name),
        }
    degraded = any(p["status"] == "degraded" for p in providers.values())
    info = buildinfo.get()
    body = {
        "status": "degraded" if degraded else "healthy",
        "timestamp": int(time.time()),
        "version": info["version"],
        "git_commit": info["git_commit"],
        "build_time": info["build_time"],
        "python_version": platform.python_version(),
        "uptime_seconds": round(time.time() - _STARTED, 3),
        "providers": providers,
    }
    return Response(json.dumps(body), status=200, content_type="application/json")
