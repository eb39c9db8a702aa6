"""What to limit for one request: its scopes, its estimated cost, the counters to charge.

Independent of Flask and of the backend: :class:`Limiter` turns an
:class:`~llmproxy.exchange.Exchange` into counter specs, asks the store to reserve them, and
at the terminal event turns real usage into corrections.
"""

from __future__ import annotations

import hashlib
import logging
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from ..budgets.policy import BudgetDenial, BudgetHold, BudgetPolicy, BudgetsUnavailable, Fund
from ..config import RateLimitSettings
from ..exchange import Exchange, Usage
from .store import (
    Adjustment,
    CounterSpec,
    CounterState,
    Decision,
    Settlement,
    Store,
    StoreError,
)

log = logging.getLogger("llmproxy.ratelimit")

# (name, seconds, bucket granularity in seconds). One-second buckets make Retry-After exact to
# the second for the minute window; one-minute buckets keep a day counter to <= 1441 fields.
WINDOWS = (("minute", 60, 1), ("day", 86400, 60))
_TEMPLATE_CACHE_SIZE = 1024  # ~1 KB each; user and key scopes are unbounded sets
# Calls that ended before their last byte, by the client or by the worker stopping: what
# they consumed is charged, as far as it is known.
_SAFE_ID = re.compile(r"^[\w.@:+\-/]{1,128}$")
# Scope and Check are built per request and never changed: plain slotted dataclasses, like
# the store's records (see store.py for why not frozen).


@dataclass(slots=True)
class Scope:
    kind: str  # global | provider | model | key | user
    id: str  # safe to log and to send back: API keys appear as fingerprints only

    @property
    def name(self) -> str:
        return self.kind if self.kind == "global" else f"{self.kind}:{self.id}"


@dataclass(slots=True)
class Check:
    """One counter of one scope, with the limit that applies to it."""

    scope: Scope
    metric: str  # requests | tokens
    window: str  # minute | day
    spec: CounterSpec

    @property
    def policy_name(self) -> str:
        return f"{self.scope.kind}-{self.metric}-per-{self.window}"


@dataclass(slots=True)
class Reservation:
    """What one admitted request charged, kept in ``Exchange.reservation``."""

    checks: list[Check]
    buckets: dict[str, int]
    tokens: int  # tokens charged to every token counter
    input_estimate: int
    output_estimate: int
    # the tightest counter after charging: (check, remaining, seconds until usage frees up)
    tightest: tuple[Check, int, float] | None = None
    reconciled: bool = field(default=False)
    budget: BudgetHold | None = None  # the budgets it holds, when any apply


@dataclass(frozen=True, slots=True)
class Denial:
    """Why a request is refused and when it could succeed."""

    check: Check
    used: int
    retry_after: float  # seconds, exact for this algorithm

    @property
    def remaining(self) -> int:
        return max(self.check.spec.limit - self.used, 0)

    @property
    def retry_after_seconds(self) -> int:
        return max(1, math.ceil(self.retry_after))

    @property
    def reason(self) -> str:
        c = self.check
        return f"{c.metric}_per_{c.window} limit of {c.spec.limit} reached for {c.scope.name}"


def safe_id(value: str) -> str:
    """A scope id usable in headers and storage keys; odd or long values become a hash."""
    if _SAFE_ID.match(value):
        return value
    return "h_" + hashlib.sha256(value.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def scopes_for(ex: Exchange) -> list[Scope]:
    """global, provider, model (if known), key (if any), user (if known)."""
    scopes = [Scope("global", "*")]
    if ex.provider:
        scopes.append(Scope("provider", safe_id(ex.provider)))
    if ex.model:
        scopes.append(Scope("model", safe_id(ex.model)))
    if ex.key_id:  # a proxy key: its id is the scope, never the secret
        scopes.append(Scope("key", ex.key_id))
    elif ex.key_fingerprint:
        scopes.append(Scope("key", ex.key_fingerprint))
    if ex.user:
        scopes.append(Scope("user", safe_id(ex.user)))
    return scopes


def estimate(settings: RateLimitSettings, ex: Exchange) -> tuple[int, int]:
    """(input tokens, output tokens) expected before the call; see docs/rate-limiting.md."""
    est = settings.estimation
    info = ex.request_info
    text_chars = getattr(info, "text_chars", None)
    if text_chars is not None and ex.request_bytes <= est.max_sample_bytes:
        input_tokens = math.ceil(text_chars / est.divisor(ex.provider, ex.dialect))
    else:
        input_tokens = math.ceil(ex.request_bytes / est.bytes_per_token)
    output_cap = getattr(info, "max_output_tokens", None)
    output_tokens = output_cap if isinstance(output_cap, int) and output_cap > 0 else 0
    return input_tokens, output_tokens


def counted(mode: str, input_tokens: int, output_tokens: int) -> int:
    if mode == "input":
        return input_tokens
    if mode == "output":
        return output_tokens
    return input_tokens + output_tokens


def actual_tokens(mode: str, usage: Usage, input_estimate: int = 0) -> int | None:
    """Real tokens of the counted kind, or None when the response reported no usage.

    A stream whose usage never came has only its output, estimated from the text relayed
    (``ResponseMeta.estimate_output``): its prompt then counts as ``input_estimate``.
    """
    inp, out, tot = usage.input_tokens, usage.output_tokens, usage.total_tokens
    if inp is None and out is None and tot is None:
        return None
    if tot is not None and out is not None:
        # total - output includes Anthropic's cache reads/writes, which input_tokens omits
        inp = tot - out
    elif inp is None and tot is None:
        inp = input_estimate
    if mode == "input":
        return max(inp or 0, 0)
    if mode == "output":
        return max(out if out is not None else (tot or 0) - (inp or 0), 0)
    return max(tot if tot is not None else (inp or 0) + (out or 0), 0)


class Limiter:
    """Reserve before forwarding, reconcile at the terminal event."""

    def __init__(self, settings: RateLimitSettings, store: Store,
                 on_lost: Callable[[StoreError], None] | None = None, *,
                 budgets: BudgetPolicy | None = None) -> None:
        self.settings = settings
        self.store = store
        self._on_lost = on_lost  # told of corrections the store could not take
        self.budgets = budgets  # spend budgets, held in the same round trip as the limits
        self.hold_ttl = budgets.settings.hold_seconds if budgets is not None else 0.0
        self._cache: dict[tuple[str, str, tuple[tuple[str, int], ...]], list[Check]] = {}

    def checks_for(self, ex: Exchange, tokens: int) -> list[Check]:
        checks: list[Check] = []
        for scope in scopes_for(ex):
            own = ex.key_limits if scope.kind == "key" else ()
            for check in self._templates(scope, own):
                if check.metric == "tokens":  # the template has no cost yet
                    spec = check.spec
                    check = Check(scope, "tokens", check.window, CounterSpec(
                        spec.key, spec.limit, tokens, max(tokens, 1), spec.window,
                        spec.granularity, True))
                checks.append(check)
        return checks

    def _templates(self, scope: Scope, own: tuple[tuple[str, int], ...] = ()) -> list[Check]:
        """A scope's checks, resolved once: request checks complete, token checks costless.

        ``own`` is a proxy key's own limits, applied over the configured ones like a
        ``per_key`` override. Configured limits do not change while the proxy runs and a
        key's own limits are part of the cache key, so limits are looked up once per scope
        rather than per request; the cache is cleared when it grows past a bound (user
        and key scopes are unbounded sets).
        """
        cached = self._cache.get((scope.kind, scope.id, own))
        if cached is not None:
            return cached
        limits = self.settings.limits_for(scope.kind, scope.id)
        if own:
            limits = limits.merged(dict(own))
        templates: list[Check] = []
        for window, seconds, granularity in WINDOWS:
            for metric in ("requests", "tokens"):
                limit = getattr(limits, f"{metric}_per_{window}")
                if limit <= 0:
                    continue
                is_tokens = metric == "tokens"
                spec = CounterSpec(key=f"{scope.name}:{metric}:{window}", limit=limit,
                                   cost=0 if is_tokens else 1, need=1, window=seconds,
                                   granularity=granularity, optimistic=is_tokens)
                templates.append(Check(scope, metric, window, spec))
        if len(self._cache) >= _TEMPLATE_CACHE_SIZE:
            self._cache.clear()
        self._cache[(scope.kind, scope.id, own)] = templates
        return templates

    def reserve(self, ex: Exchange) -> Reservation | Denial | BudgetDenial | None:
        """Charge the request, or say why not; None when no limit or budget applies to it.

        Raises :class:`~llmproxy.ratelimit.store.StoreError` when the backend fails (or the
        ledger, when a budget counter has to be rebuilt), and the budget policy's
        ``Unpriced``.
        """
        input_est, output_est = estimate(self.settings, ex)
        tokens = counted(self.settings.count_tokens, input_est, output_est)
        checks = self.checks_for(ex, tokens) if self.settings.enabled else []
        funds: list[Fund] = []
        rate = 0.0
        if self.budgets is not None:
            try:
                funds, rate = self.budgets.funds(ex, input_est)
            except BudgetsUnavailable as exc:
                raise StoreError(str(exc)) from exc
        if not checks and not funds:
            return None
        hold_id = secrets.token_hex(8) if funds else ""
        specs = [c.spec for c in checks]
        budget_specs = [f.spec for f in funds]
        for _ in range(3):
            try:
                decision = self.store.reserve(specs, budget_specs, hold_id, self.hold_ttl)
            except StoreError as exc:
                if exc.late is not None:
                    exc.late.then(partial(self._settle_late, ex, checks, tokens, input_est,
                                          output_est, funds, hold_id, rate))
                raise
            if not decision.missing:
                break
            assert self.budgets is not None
            try:  # counters lost with a restart: rebuilt from the ledger, then asked again
                self.budgets.seed([funds[i] for i in decision.missing])
            except BudgetsUnavailable as exc:
                raise StoreError(str(exc)) from exc
        else:
            raise StoreError("budget counters could not be rebuilt")
        if not decision.allowed:
            if funds and self.budgets is not None:
                refused = self.budgets.denial(funds, decision.budgets)
                if refused is not None:
                    return refused
            return _binding(checks, decision.states)
        res = Reservation(checks, decision.bucket, tokens, input_est, output_est)
        if funds:
            res.budget = BudgetHold(hold_id, funds, decision.budgets, input_est, rate)
        if checks:
            res.tightest = _tightest(checks, decision.states)
        return res

    @staticmethod
    def settlements(ex: Exchange, res: Reservation) -> list[Settlement]:
        """The holds of ``res`` replaced by what the call was charged (nothing: released)."""
        hold = res.budget
        if hold is None:
            return []
        amount = ex.charged_nanos or 0
        return [Settlement(f.spec.key, hold.hold_id, amount, f.spec.expires_at)
                for f in hold.funds]

    def adjustments(self, ex: Exchange, res: Reservation) -> list[Adjustment]:
        """Corrections that replace the reservation with what the request really used.

        An aborted stream (or one without a final usage) is charged at least the output it
        relayed: its output count is then the estimate from the relayed text, never less.
        """
        actual = actual_tokens(self.settings.count_tokens, ex.meta.usage, res.input_estimate)
        status = ex.status
        request_delta = 0
        token_delta = 0
        if actual is not None:
            token_delta = actual - res.tokens
        elif ex.cut_short or ex.unanswered:
            # no usage seen before the client left or the worker stopped, or no answer at all
            # to a request the provider got (it may have run it): the estimate stands
            pass
        elif status is None or status >= 500:
            # the provider was not reached, or failed (5xx): refund all
            request_delta, token_delta = -1, -res.tokens
        elif status >= 400:
            token_delta = -res.tokens  # an error answer consumed no tokens
        out: list[Adjustment] = []
        for check in res.checks:
            delta = token_delta if check.metric == "tokens" else request_delta
            bucket = res.buckets.get(check.spec.key)
            if delta and bucket is not None:
                out.append(Adjustment(check.spec.key, bucket, delta, check.spec.window,
                                      check.spec.granularity))
        return out

    def _settle_late(self, ex: Exchange, checks: list[Check], tokens: int, input_est: int,
                     output_est: int, funds: list[Fund], hold_id: str, rate: float,
                     decision: Decision | None) -> None:
        """A reservation that timed out was run after all, and charged its counters: a
        request refused for it (``on_error: closed``) gets it all back; one let through
        (``open``) is reconciled like any admitted request, at its end or now."""
        if decision is None or not decision.allowed:
            return  # never ran, or refused: nothing was charged
        res = Reservation(checks, decision.bucket, tokens, input_est, output_est)
        if funds:
            res.budget = BudgetHold(hold_id, funds, decision.budgets, input_est, rate)
        on_error = self.settings.redis.on_error
        if funds and self.budgets is not None:
            on_error = self.budgets.settings.on_error
        try:
            if on_error == "closed":
                res.reconciled = True
                self.store.adjust([
                    Adjustment(c.spec.key, decision.bucket[c.spec.key], -c.spec.cost,
                               c.spec.window, c.spec.granularity)
                    for c in checks if c.spec.cost and c.spec.key in decision.bucket],
                    [Settlement(f.spec.key, hold_id, 0, f.spec.expires_at) for f in funds])
                return
            ex.reservation = res
            if ex.finished:  # its terminal event found no reservation to reconcile
                self.reconcile(ex, res)
        except StoreError as exc:
            if self._on_lost is not None:
                self._on_lost(exc)
        except Exception:  # runs on the late reply's greenlet: nobody else would see it
            log.exception("settling a late rate-limit reservation failed")

    def reconcile(self, ex: Exchange, res: Reservation) -> None:
        """Apply :meth:`adjustments` once (raises StoreError when the backend fails)."""
        if res.reconciled:
            return
        res.reconciled = True
        adjustments = self.adjustments(ex, res) if res.checks else []
        settlements = self.settlements(ex, res)
        if adjustments or settlements:
            self.store.adjust(adjustments, settlements)


def _binding(checks: list[Check], states: list[CounterState]) -> Denial:
    """The refused counter that frees up last: its wait is when the request can pass."""
    worst: Denial | None = None
    for check, state in zip(checks, states, strict=True):
        if state.retry_after is None:
            continue
        # ties go to the later, more specific scope (user over key over model ... global)
        if worst is None or state.retry_after >= worst.retry_after:
            worst = Denial(check, state.used, state.retry_after)
    if worst is None:  # the store refused without naming a counter: should not happen
        return Denial(checks[0], states[0].used, 1.0)
    return worst


def _tightest(checks: list[Check], states: list[CounterState]) -> tuple[Check, int, float]:
    """The counter with the smallest share of its limit left (ties: the longer window)."""
    best: tuple[float, int, Check, int, float] | None = None
    for check, state in zip(checks, states, strict=True):
        remaining = max(check.spec.limit - state.used, 0)
        key = (remaining / check.spec.limit, -check.spec.window, check, remaining,
               state.reset_after)
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None
    return best[2], best[3], best[4]
