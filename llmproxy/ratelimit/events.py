"""Process-wide hooks and counters for metrics: denials and backend failures.

Usage (e.g. from the metrics module)::

    from llmproxy.ratelimit import events
    events.on_denied(lambda scope_kind, metric, window: DENIED.labels(...).inc())
    events.on_backend_error(lambda operation, action: ERRORS.labels(operation, action).inc())

``scope_kind`` is global|provider|model|key|user, ``metric`` requests|tokens, ``window``
minute|day; ``operation`` is reserve|reconcile and ``action`` what the proxy did about it:
open (let through), closed (answered 503) or none (reconciliation skipped). A listener that
raises is logged and ignored. :func:`counts` gives running totals for this process.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

log = logging.getLogger(__name__)

DeniedListener = Callable[[str, str, str], None]
BackendErrorListener = Callable[[str, str], None]

_denied: list[DeniedListener] = []
_backend_errors: list[BackendErrorListener] = []
_counts: Counter[str] = Counter()
_lock = threading.Lock()


def on_denied(listener: DeniedListener) -> DeniedListener:
    """Call ``listener(scope_kind, metric, window)`` for every 429 the limiter answers."""
    _denied.append(listener)
    return listener


def on_backend_error(listener: BackendErrorListener) -> BackendErrorListener:
    """Call ``listener(operation, action)`` whenever the store fails."""
    _backend_errors.append(listener)
    return listener


def remove(listener: object) -> None:
    """Unregister a listener (tests)."""
    for registry in (_denied, _backend_errors):
        while listener in registry:
            registry.remove(listener)  # type: ignore[arg-type]


def counts() -> dict[str, int]:
    """Totals so far: allowed, denied, backend_errors, failed_open, failed_closed."""
    with _lock:
        return dict(_counts)


def _bump(name: str) -> None:
    with _lock:
        _counts[name] += 1


def allowed() -> None:
    _bump("allowed")


def denied(scope_kind: str, metric: str, window: str) -> None:
    _bump("denied")
    for listener in list(_denied):
        try:
            listener(scope_kind, metric, window)
        except Exception:
            log.exception("rate-limit denied listener failed")


def backend_error(operation: str, action: str) -> None:
    _bump("backend_errors")
    if action in ("open", "closed"):
        _bump(f"failed_{action}")
    for listener in list(_backend_errors):
        try:
            listener(operation, action)
        except Exception:
            log.exception("rate-limit backend error listener failed")
