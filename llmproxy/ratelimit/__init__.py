"""Rate limiting per key, user, model, provider and globally, in memory or in Redis.

:class:`RateLimit` hooks three things into the app: a ``before_request`` check that reserves
the request's estimated cost (or answers 429), an ``after_request`` hook adding
``RateLimit-Policy``/``RateLimit`` headers, and a terminal-event listener replacing the
reservation with real usage. The algorithm is described in docs/rate-limiting.md.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from flask import Flask, Response, g

from ..budgets.model import to_usd
from ..budgets.policy import BudgetDenial, BudgetPolicy, Unpriced
from ..config import RateLimitSettings
from ..errors import error_response
from ..exchange import ErrorKind, Exchange, FinishListener
from ..providers import DEFAULT_DIALECT, DIALECTS
from .memory import MemoryStore
from .policy import Denial, Limiter, Reservation
from .store import Store, StoreError

__all__ = ["RateLimit", "build_store", "get_ratelimit", "memory_worker_warning"]

#: ``on_denied(scope_kind, metric, window)``: scope_kind is global|provider|model|key|user.
DeniedListener = Callable[[str, str, str], None]
#: ``on_backend_error(operation, action)``: reserve|reconcile; open|closed|none.
BackendErrorListener = Callable[[str, str], None]
#: ``on_evicted(count)``: counters the memory backend forgot to stay under its cap.
EvictionListener = Callable[[int], None]
#: ``on_budget(kind, name, window, spent_usd, remaining_usd)``: a budget as last seen.
BudgetListener = Callable[[str, str, str, float, float], None]
#: ``on_budget_denied(kind, window)``: a call refused for lack of budget.
BudgetDeniedListener = Callable[[str, str], None]

log = logging.getLogger("llmproxy.ratelimit")
EXTENSION_KEY = "llmproxy.ratelimit"
WARN_EVERY = 10.0  # seconds between two warnings about the same backend failure


def memory_worker_warning(settings: RateLimitSettings,
                          environ: Mapping[str, str] | None = None, *,
                          budgets: bool = False) -> str | None:
    """The start-up warning for a memory backend shared by nobody, or None."""
    env = os.environ if environ is None else environ
    try:
        workers = int(env.get("WEB_CONCURRENCY", "1"))
    except ValueError:
        workers = 1
    if settings.backend != "memory" or workers <= 1:
        return None
    if settings.enabled:
        return (f"rate limiting uses the memory backend with {workers} workers: each worker "
                f"counts alone, so limits are multiplied by {workers}; use backend: redis")
    if budgets:
        return (f"budgets use the memory backend with {workers} workers: each worker counts "
                f"alone, so each may spend a whole budget; use backend: redis")
    return None


def _usd(nanos: int) -> str:
    """A header value in USD: six decimals, the precision a person reads."""
    return f"{to_usd(nanos):.6f}"


# Printable ASCII but "%": what a scope name keeps as is in a header value.
_HEADER_SAFE = "".join(chr(c) for c in range(0x20, 0x7F) if chr(c) != "%")


def _header_text(name: str) -> str:
    """A user's, team's or model's name as a header value: printable ASCII as is, anything
    else (and "%") percent-encoded UTF-8. A server refuses a whole answer whose header holds
    other characters, after the call was forwarded and before it could be settled."""
    if name.isascii() and name.isprintable() and "%" not in name:
        return name
    return quote(name.encode("utf-8", "surrogateescape"), safe=_HEADER_SAFE)


def build_store(settings: RateLimitSettings,
                on_lost: Callable[[StoreError], None] | None = None,
                on_evicted: EvictionListener | None = None) -> Store:
    """The configured backend; ``on_lost`` hears of deferred corrections Redis refused,
    ``on_evicted`` of counters the memory backend forgot at its cap."""
    if settings.backend == "redis":
        from .redis import RedisStore, connect

        client = connect(settings.redis.url, settings.redis.timeout_ms,
                         settings.redis.max_connections)
        return RedisStore(client, settings.redis.key_prefix,
                          reconcile_delay=settings.redis.reconcile_delay_ms / 1000,
                          on_lost=on_lost)
    return MemoryStore(max_counters=settings.memory.max_counters, on_evict=on_evicted)


class _Throttled:
    """Log a repeated warning at most once per ``every`` seconds, with the count in between."""

    def __init__(self, every: float = WARN_EVERY) -> None:
        self.every = every
        self._last = -math.inf
        self._skipped = 0
        self._lock = threading.Lock()

    def warn(self, message: str, *args: object) -> None:
        with self._lock:
            now = time.monotonic()
            if now - self._last < self.every:
                self._skipped += 1
                return
            skipped, self._skipped, self._last = self._skipped, 0, now
        suffix = f" ({skipped} more since the last warning)" if skipped else ""
        log.warning(message + suffix, *args)


class RateLimit:
    """The Flask side: check before the request, headers after it, reconcile at the end."""

    def __init__(self, settings: RateLimitSettings, store: Store | None = None, *,
                 on_denied: DeniedListener | None = None,
                 on_backend_error: BackendErrorListener | None = None,
                 on_evicted: EvictionListener | None = None,
                 budgets: BudgetPolicy | None = None,
                 on_budget: BudgetListener | None = None,
                 on_budget_denied: BudgetDeniedListener | None = None) -> None:
        self.settings = settings
        self.budgets = budgets
        self._on_budget = on_budget
        self._on_budget_denied = on_budget_denied
        self._on_denied = on_denied
        self._on_backend_error = on_backend_error
        self._on_evicted = on_evicted
        self._warn_reserve = _Throttled()
        self._warn_reconcile = _Throttled()
        self._warn_evicted = _Throttled()
        self.store = store if store is not None else build_store(
            settings, self.reconcile_lost, self.counters_evicted)
        self.limiter = Limiter(settings, self.store, self.reconcile_lost, budgets=budgets)

    def install(self, app: Flask, on_finish: Callable[[FinishListener], Any]) -> None:
        """Hook the check, the headers and the terminal-event listener into ``app``."""
        warning = memory_worker_warning(self.settings, budgets=self.budgets is not None)
        if warning:
            log.warning(warning)
        if self.settings.enabled:
            log.info("rate limiting enabled: backend=%s count_tokens=%s",
                     self.settings.backend, self.settings.count_tokens)
        if self.budgets is not None:
            log.info("budgets enabled: backend=%s", self.settings.backend)
        app.extensions[EXTENSION_KEY] = self
        app.before_request(self.check)
        app.after_request(self.add_headers)
        on_finish(self.finished)

    # -- before_request -------------------------------------------------------------------
    def check(self) -> Response | None:
        """Reserve the request's cost in every scope, or answer 429 (503 when closed)."""
        ex: Exchange | None = g.get("exchange")
        if ex is None:  # /health, /metrics, preflights, unknown routes: never limited
            return None
        if ex.body_uninspected and ex.model is None and (
                (self.settings.enabled and self.settings.overrides.get("model"))
                or self._budgeted(ex)):
            return self._uninspectable(ex)
        try:
            result = self.limiter.reserve(ex)
        except StoreError as exc:
            return self._backend_failed(ex, exc)
        except Unpriced:
            return self._unpriced(ex)
        if result is None:
            return None
        if isinstance(result, Denial):
            return self._deny(ex, result)
        if isinstance(result, BudgetDenial):
            return self._deny_budget(ex, result)
        ex.reservation = result
        if result.budget is not None and self._on_budget is not None:
            for fund, state in zip(result.budget.funds, result.budget.states, strict=True):
                room = fund.spec.limit - state.spent - state.held
                self._on_budget(fund.kind, fund.name, fund.window, to_usd(state.spent),
                                to_usd(max(room, 0)))
        return None

    def _budgeted(self, ex: Exchange) -> bool:
        if self.budgets is None:
            return False
        try:
            return bool(self.budgets.budgets_of(ex))
        except Exception:  # the budgets cannot be read: treated as budgeted (checked later)
            return True

    def _deny_budget(self, ex: Exchange, denial: BudgetDenial) -> Response:
        fund = denial.fund
        if self._on_budget_denied is not None:
            self._on_budget_denied(fund.kind, fund.window)
        ex.error_kind = ErrorKind.BUDGET_EXCEEDED
        ex.denial = denial
        headers = {
            # The OpenAI and Anthropic SDKs retry a 429 unless told not to: waiting a few
            # seconds does not bring a spent budget back.
            "x-should-retry": "false",
            "X-Budget-Scope": _header_text(fund.scope),
            "X-Budget-Window": fund.window,
            "X-Budget-Limit-USD": _usd(fund.spec.limit),
            "X-Budget-Remaining-USD": _usd(denial.remaining),
        }
        if denial.wait is not None:
            headers["Retry-After"] = str(math.ceil(denial.wait))
        resets = {"day": " It resets at 00:00 UTC.", "month": " It resets on the 1st (UTC).",
                  "total": ""}[fund.window]
        message = (f"Budget exceeded: the {fund.window} budget of {fund.scope} "
                   f"(USD {to_usd(fund.spec.limit):.2f}) has USD {to_usd(denial.remaining):.6f} "
                   f"left, and this call may cost up to USD {to_usd(fund.spec.cost):.6f}."
                   + resets)
        dialect = DIALECTS.get(ex.dialect or "", DEFAULT_DIALECT)
        body = dialect.quota_error_body(message + f" (request id {ex.request_id})")
        resp = Response(body, status=429, content_type="application/json")
        for name, value in headers.items():
            resp.headers[name] = value
        return resp

    def _unpriced(self, ex: Exchange) -> Response:
        ex.error_kind = ErrorKind.UNPRICED
        if ex.model is None:
            what = "This call names no model the proxy can read, so its cost cannot be held"
        else:
            what = f"The model {ex.model[:100]} has no price in this proxy's pricing table"
        return error_response(ex.dialect, 403, f"{what}, and a spend budget applies to it "
                              "(budgets.unpriced: deny).", request_id=ex.request_id,
                              code="model_not_priced")

    def _deny(self, ex: Exchange, denial: Denial) -> Response:
        check = denial.check
        if self._on_denied is not None:
            self._on_denied(check.scope.kind, check.metric, check.window)
        ex.error_kind = ErrorKind.RATE_LIMITED
        ex.denial = denial
        wait = denial.retry_after_seconds
        headers = {
            "Retry-After": str(wait),
            # Honoured by the OpenAI and Anthropic SDKs in preference to Retry-After.
            "Retry-After-Ms": str(max(1000, math.ceil(denial.retry_after * 1000))),
            "X-RateLimit-Scope": _header_text(check.scope.name),
            "X-RateLimit-Metric": check.metric,
            "X-RateLimit-Window": check.window,
            "X-RateLimit-Limit": str(check.spec.limit),
            "X-RateLimit-Remaining": str(denial.remaining),
            "X-RateLimit-Reason": _header_text(denial.reason),
        }
        message = f"Rate limit exceeded: {denial.reason}. Retry after {wait} s."
        return error_response(ex.dialect, 429, message, request_id=ex.request_id,
                              headers=headers)

    def _uninspectable(self, ex: Exchange) -> Response:
        """A body too large to read its model from, while per-model limits exist: refused,
        since letting it through would let any client dodge them with a padded body."""
        ex.error_kind = ErrorKind.TOO_LARGE
        return error_response(ex.dialect, 413, "Request body too large for its model to be "
                              "checked against the per-model rate limits or the budgets.",
                              request_id=ex.request_id)

    def _backend_failed(self, ex: Exchange, exc: StoreError) -> Response | None:
        action = self.settings.redis.on_error
        if self.budgets is not None and self._budgeted(ex):
            action = self.budgets.settings.on_error
        self._backend_error("reserve", action)
        self._warn_reserve.warn("rate-limit backend unavailable (%s): requests are %s",
                                exc, "let through" if action == "open" else "refused (503)")
        if action == "open":
            return None
        ex.error_kind = ErrorKind.RATELIMIT_UNAVAILABLE
        return error_response(ex.dialect, 503, "Rate limiter unavailable; try again shortly.",
                              request_id=ex.request_id, headers={"Retry-After": "1"})

    # -- after_request --------------------------------------------------------------------
    def add_headers(self, response: Response) -> Response:
        """IETF draft ``RateLimit-Policy``/``RateLimit`` for the tightest scope."""
        ex: Exchange | None = g.get("exchange")
        res = ex.reservation if ex is not None else None
        if not isinstance(res, Reservation):
            return response
        tightest_fund = res.budget.tightest() if res.budget is not None else None
        if tightest_fund is not None:
            fund, room = tightest_fund
            response.headers["X-Budget-Scope"] = _header_text(fund.scope)
            response.headers["X-Budget-Window"] = fund.window
            response.headers["X-Budget-Limit-USD"] = _usd(fund.spec.limit)
            response.headers["X-Budget-Remaining-USD"] = _usd(room)
        if res.tightest is None:
            return response
        # An upstream that sends these itself keeps its own values.
        if "RateLimit" in response.headers or "RateLimit-Policy" in response.headers:
            return response
        check, remaining, reset = res.tightest
        name = check.policy_name
        seconds = check.spec.window
        response.headers["RateLimit-Policy"] = f'"{name}";q={check.spec.limit};w={seconds}'
        response.headers["RateLimit"] = f'"{name}";r={remaining};t={math.ceil(reset)}'
        return response

    # -- terminal event -------------------------------------------------------------------
    def finished(self, ex: Exchange) -> None:
        """Replace the reservation with the real usage (or refund it)."""
        res = ex.reservation
        if not isinstance(res, Reservation):
            return
        try:
            self.limiter.reconcile(ex, res)
        except StoreError as exc:
            self.reconcile_lost(exc)

    def reconcile_lost(self, exc: StoreError) -> None:
        """A correction could not reach the backend: count it, warn (throttled), go on."""
        self._backend_error("reconcile", "none")
        self._warn_reconcile.warn("rate-limit reconciliation skipped, backend "
                                  "unavailable (%s)", exc)


    def counters_evicted(self, count: int) -> None:
        """The memory backend hit its cap: count the forgotten counters, warn (throttled)."""
        if self._on_evicted is not None:
            self._on_evicted(count)
        self._warn_evicted.warn(
            "rate-limit memory backend full (memory.max_counters=%d): the least recently "
            "charged counters are forgotten and their scopes start again from zero",
            self.settings.memory.max_counters)

    def _backend_error(self, operation: str, action: str) -> None:
        if self._on_backend_error is not None:
            self._on_backend_error(operation, action)


def get_ratelimit(app: Flask) -> RateLimit | None:
    """The app's rate limiter, if enabled."""
    ext = app.extensions.get(EXTENSION_KEY)
    return ext if isinstance(ext, RateLimit) else None
