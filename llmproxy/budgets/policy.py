"""Which budgets a call answers to, what to hold for it, and what it finally costs.

Independent of Flask and of the store: the rate limiter's :class:`~llmproxy.ratelimit.policy.
Limiter` asks :meth:`BudgetPolicy.funds` for the budget counters of a call and sends them to
the store in the same round trip as its rate-limit counters. A call holds its maximum cost
(input estimate priced at the dearest input rate, plus its output cap or
``default_output_tokens``); at its end the hold is replaced by :meth:`BudgetPolicy.charge`,
the real cost.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone

from ..config import BudgetSettings
from ..exchange import Exchange
from ..pricing import PricingTable
from ..providers import DIALECTS
from .model import (
    WINDOWS,
    Budget,
    BudgetSpec,
    BudgetState,
    SpendRow,
    period_end,
    period_id,
    period_start,
)

log = logging.getLogger("llmproxy.budgets")

#: Counters of a period are kept this long after it ended (late settlements still land).
KEEP_AFTER_PERIOD = 86400
# USD per million tokens -> nano-dollars per token: * 1e9 / 1e6.
_NANOS_PER_PRICE_UNIT = 1000

#: Loads every user and team budget: ``{(kind, name): Budget}``.
BudgetLoader = Callable[[], dict[tuple[str, str], Budget]]
#: Spend in the ledger, in nano-dollars, of a scope since a day (None: ever).
LedgerReader = Callable[[str, str, "date | None"], int]


class BudgetsUnavailable(Exception):
    """Budgets cannot be checked now (the database is down and nothing is cached)."""


class Unpriced(Exception):
    """A budget applies to the call, and its model has no price (``unpriced: deny``)."""


class BudgetBook:
    """The user and team budgets, loaded whole and reloaded every ``refresh`` seconds.

    The table is small (one row per user or team with a budget), so a worker keeps all of
    it: the request path reads a dict. A reload runs in the background; while the database
    is down the last table stays in use.
    """

    def __init__(self, load: BudgetLoader, refresh: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._load = load
        self._refresh = refresh
        self._clock = clock
        self._table: dict[tuple[str, str], Budget] | None = None
        self._next = 0.0
        self._loading = False
        self._lock = threading.Lock()
        # Until a first load succeeds: one load at a time, and the callers that waited for
        # one take its outcome (under gevent the threading locks are the patched ones).
        self._first_lock = threading.Lock()
        self._first_loads = 0  # first loads finished (failed: the table is still None)
        self._failure = ""

    def get(self, kind: str, name: str) -> Budget | None:
        table = self._table
        if table is None:
            table = self._first_load()  # the first calls wait: nothing to answer with yet
        elif self._clock() >= self._next:
            self._reload_in_background()
        return table.get((kind, name))

    def _first_load(self) -> dict[tuple[str, str], Budget]:
        """The table, loaded by one caller while the others wait. A caller that waited for a
        load that failed fails with it: during a database outage at start-up the requests
        that arrive together share one database timeout instead of each running its own."""
        seen = self._first_loads
        with self._first_lock:
            if self._table is not None:
                return self._table
            if self._first_loads != seen:  # a load ended (and failed) while this one waited
                raise BudgetsUnavailable(self._failure)
            try:
                return self._reload()
            except BudgetsUnavailable as exc:
                self._failure = str(exc)
                raise
            finally:
                self._first_loads += 1

    def _reload(self) -> dict[tuple[str, str], Budget]:
        try:
            table = self._load()
        except Exception as exc:
            self._next = self._clock() + 1.0
            if self._table is not None:
                log.warning("reloading budgets failed (%s): the last ones stay in use", exc)
                return self._table
            raise BudgetsUnavailable(str(exc)) from exc
        self._table, self._next = table, self._clock() + self._refresh
        return table

    def _reload_in_background(self) -> None:
        with self._lock:
            if self._loading:
                return
            self._loading = True
            self._next = self._clock() + self._refresh

        def run() -> None:
            try:
                self._reload()
            except BudgetsUnavailable:
                pass  # logged by _reload; the old table stays
            finally:
                self._loading = False

        try:
            threading.Thread(target=run, name="budget-reload", daemon=True).start()
        except Exception as exc:  # RuntimeError: can't start new thread
            log.warning("reloading budgets could not start (%s): the last ones stay in use", exc)
            with self._lock:
                self._loading = False  # or no reload would ever start again
                self._next = self._clock() + 1.0

    def invalidate(self) -> None:
        """Reload at the next lookup (tests, admin changes made in this process)."""
        self._next = 0.0


@dataclass(slots=True)
class Fund:
    """One budget counter a call answers to."""

    kind: str  # key | user | team
    name: str
    window: str  # day | month | total
    period_start: date | None  # first day of the period, for the ledger; None: ever
    period_end: float  # epoch seconds when the period ends; 0: never
    spec: BudgetSpec
    day: date  # the UTC day the periods were worked out for (the ledger's day for the call)

    @property
    def scope(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(slots=True)
class BudgetHold:
    """What a call holds: kept on the rate limiter's Reservation until it settles."""

    hold_id: str
    funds: list[Fund]
    states: list[BudgetState]  # after holding
    input_tokens: int  # the input estimate the hold was priced from
    input_rate: float  # USD per million input tokens used for the hold

    @property
    def day(self) -> date | None:
        """The UTC day of the periods held: the ledger's day for the call, also when it
        ends after midnight."""
        return self.funds[0].day if self.funds else None

    @property
    def cost(self) -> int:
        """The nano-dollars held (the same on every fund)."""
        return self.funds[0].spec.cost if self.funds else 0

    def tightest(self) -> tuple[Fund, int] | None:
        """The fund with the least room left after this hold, and that room (nanos)."""
        best: tuple[Fund, int] | None = None
        for fund, state in zip(self.funds, self.states, strict=True):
            room = max(fund.spec.limit - state.spent - state.held, 0)
            if best is None or room < best[1]:
                best = (fund, room)
        return best


@dataclass(frozen=True, slots=True)
class BudgetDenial:
    """The budget that has no room for the call."""

    fund: Fund
    spent: int
    held: int
    wait: float | None  # seconds until the period resets; None: never (total)

    @property
    def remaining(self) -> int:
        return max(self.fund.spec.limit - self.spent - self.held, 0)


_SeedKey = tuple[str, str, "date | None"]  # (kind, name, first day of the period)
_SEED_WAIT = 30.0  # seconds a call waits for another's ledger read of the same counter


@dataclass(slots=True)
class _Seeding:
    """One ledger read under way, and its result for every call waiting on it."""

    done: threading.Event = field(default_factory=threading.Event)
    value: int = 0
    error: BudgetsUnavailable | None = None


class BudgetPolicy:
    """Budgets of a call, its hold, and its final charge."""

    def __init__(self, settings: BudgetSettings, pricing: PricingTable, book: BudgetBook,
                 ledger_spent: LedgerReader,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.pricing = pricing
        self.book = book
        self._ledger_spent = ledger_spent
        self.clock = clock
        # (valid until, {window: (period id, first day, end)}): see _periods_now
        self._periods: tuple[float, dict[str, tuple[str, date | None, int]]] | None = None
        self._seeding: dict[_SeedKey, _Seeding] = {}
        self._seed_lock = threading.Lock()

    def budgets_of(self, ex: Exchange) -> list[tuple[str, str, Budget]]:
        """(kind, name, budget) of every scope of the call that has a budget."""
        out: list[tuple[str, str, Budget]] = []
        if ex.key_id and isinstance(ex.key_budget, Budget):
            out.append(("key", ex.key_id, ex.key_budget))
        for kind, name in (("user", ex.user), ("team", ex.team)):
            if name:
                budget = self.book.get(kind, name)
                if budget is not None:
                    out.append((kind, name, budget))
        return out

    def funds(self, ex: Exchange, input_tokens: int) -> tuple[list[Fund], float]:
        """The call's budget counters, each to hold its maximum cost; and the input rate.

        Raises :class:`Unpriced` (the model has no price and ``unpriced`` is deny) and
        :class:`BudgetsUnavailable`. A call whose model is unknown holds nothing: it is
        charged what it is seen to cost at its end.
        """
        if ex.method in ("GET", "HEAD"):
            return [], 0.0  # reading calls cost nothing: no budget refuses them, even spent
        dialect = DIALECTS.get(ex.dialect or "")
        if dialect is not None and dialect.is_token_count(
                ex.upstream_path.partition("?")[0].rstrip("/")):
            return [], 0.0  # the providers' token counts are free too
        scopes = self.budgets_of(ex)
        if not scopes:
            return [], 0.0
        cost, input_rate = 0, 0.0
        if ex.model is None:
            # A call the proxy cannot price before it runs (a multipart upload, a run of a
            # stored assistant or prompt): letting it hold nothing would let any number of
            # them through at once.
            if self.settings.unpriced == "deny":
                raise Unpriced(None)
        else:
            price = self.pricing.lookup(ex.provider, ex.model)
            if price is None:
                if self.settings.unpriced == "deny":
                    raise Unpriced(ex.model)
            else:
                rates = price.rates_for(input_tokens)
                input_rate = max(rates.input, rates.cache_write)
                info = ex.request_info
                cap = getattr(info, "max_output_tokens", None)
                output = cap if isinstance(cap, int) and cap > 0 \
                    else self.settings.default_output_tokens * getattr(info, "choices", 1)
                cost = math.ceil((input_tokens * input_rate + output * rates.output)
                                 * _NANOS_PER_PRICE_UNIT)
        periods = self._periods_now()
        today = periods["day"][1]
        assert today is not None
        funds: list[Fund] = []
        for kind, name, budget in scopes:
            for window in WINDOWS:
                limit = budget.limit(window)
                if limit is None:
                    continue
                pid, start, end_s = periods[window]
                spec = BudgetSpec(key=f"budget:{kind}:{name}:{window}:{pid}",
                                  limit=round(limit * 1_000_000_000), cost=cost,
                                  expires_at=end_s + KEEP_AFTER_PERIOD if end_s else 0)
                funds.append(Fund(kind, name, window, start, float(end_s), spec, today))
        return funds, input_rate

    def _periods_now(self) -> dict[str, tuple[str, date | None, int]]:
        """Each window's (period id, first day, end in epoch seconds; 0: never), worked
        out once a day: calendar arithmetic per call would cost more than the rest."""
        now = self.clock()
        cached = self._periods
        if cached is not None and now < cached[0]:
            return cached[1]
        moment = datetime.fromtimestamp(now, timezone.utc)
        today = moment.date()
        table: dict[str, tuple[str, date | None, int]] = {}
        for window in WINDOWS:
            end = period_end(window, moment)
            table[window] = (period_id(window, today), period_start(window, today),
                             int(end.timestamp()) if end is not None else 0)
        self._periods = (float(table["day"][2]), table)
        return table

    def seed(self, funds: list[Fund]) -> None:
        """Rebuild missing counters from the ledger (after a restart of Redis or the proxy).

        The calls of a worker that find the same counter missing at once (at midnight, after
        a Redis restart) share one query: one per counter, not one per call.
        Raises :class:`BudgetsUnavailable` when the ledger cannot be read.
        """
        for fund in funds:
            fund.spec.seed = self._spent_once((fund.kind, fund.name, fund.period_start))

    def _spent_once(self, scope: _SeedKey) -> int:
        with self._seed_lock:
            flight = self._seeding.get(scope)
            leader = flight is None
            if flight is None:
                flight = self._seeding[scope] = _Seeding()
        if not leader:
            if not flight.done.wait(_SEED_WAIT):
                raise BudgetsUnavailable("ledger unreadable: another call's read timed out")
        else:
            try:
                flight.value = self._ledger_spent(*scope)
            except Exception as exc:
                flight.error = BudgetsUnavailable(f"ledger unreadable: {exc}")
            finally:
                with self._seed_lock:
                    del self._seeding[scope]
                flight.done.set()
        if flight.error is not None:
            raise flight.error
        return flight.value

    def denial(self, funds: list[Fund], states: list[BudgetState]) -> BudgetDenial | None:
        """The fund that refused the call (the one that frees up last), if any did."""
        now = self.clock()
        worst: BudgetDenial | None = None
        for fund, state in zip(funds, states, strict=True):
            if state.spent + state.held + fund.spec.cost <= fund.spec.limit:
                continue
            wait = max(fund.period_end - now, 1.0) if fund.period_end else None
            if worst is None or worst.wait is not None and (wait is None or wait > worst.wait):
                worst = BudgetDenial(fund, state.spent, state.held, wait)
        return worst

    def charge(self, ex: Exchange) -> None:
        """Terminal-event listener (after pricing): ``ex.charged_nanos``, the real cost.

        A call the provider answered is charged its priced usage; a stream cut short (or one
        whose final usage never came) pays at least its input estimate and the output it
        relayed; a call sent whose answer never came pays its whole hold (the provider may
        have run it, and bills it); a call that failed before the provider consumed anything
        pays nothing.
        """
        if ex.dialect is None:
            return
        hold = getattr(ex.reservation, "budget", None)
        input_tokens = hold.input_tokens if isinstance(hold, BudgetHold) else 0
        input_rate = hold.input_rate if isinstance(hold, BudgetHold) else 0.0
        usage = ex.meta.usage
        unreported_input = usage.input_tokens is None and usage.total_tokens is None
        nanos = 0
        if ex.cost_usd is not None:
            nanos = round(ex.cost_usd * 1_000_000_000)
            if unreported_input and ex.cost_usd > 0:
                nanos += math.ceil(input_tokens * input_rate * _NANOS_PER_PRICE_UNIT)
        elif ex.unanswered:
            nanos = hold.cost if isinstance(hold, BudgetHold) else 0
        elif ex.cut_short:
            nanos = math.ceil(input_tokens * input_rate * _NANOS_PER_PRICE_UNIT)
        ex.charged_nanos = nanos


def spend_row(ex: Exchange) -> SpendRow | None:
    """The ledger's row for a finished call (after :meth:`BudgetPolicy.charge`), or None.

    Every provider call that was sent upstream is counted, priced or not; calls the proxy
    refused before forwarding are not spend.
    """
    if ex.dialect is None or ex.upstream_status is None and not ex.charged_nanos:
        return None
    usage = ex.meta.usage
    hold = getattr(ex.reservation, "budget", None)
    if isinstance(hold, BudgetHold) and hold.day is not None:
        day = hold.day  # the period its counters were charged in, also across midnight
    else:
        day = datetime.fromtimestamp(ex.started_wall, timezone.utc).date()
    output = usage.output_tokens or 0
    if usage.input_tokens is not None:
        input_tokens = usage.input_tokens
    elif usage.total_tokens is not None:
        input_tokens = max(usage.total_tokens - output, 0)
    else:
        input_tokens = 0
    return SpendRow(day=day, key_id=ex.key_id or "", user=_printable(ex.user),
                    team=_printable(ex.team), model=_printable(ex.meta.model or ex.model),
                    provider=ex.provider or "", cost_nanos=ex.charged_nanos or 0, requests=1,
                    input_tokens=input_tokens, output_tokens=output)


def _printable(value: str | None, limit: int = 200) -> str:
    """A client-chosen name as the ledger can store it on every database: no NUL or other
    control characters, no lone surrogates (one bad row would fail its whole batch)."""
    if not value:
        return ""
    value = value[:limit]
    if value.isprintable():
        return value
    return "".join(c for c in value if c.isprintable() and not 0xD800 <= ord(c) <= 0xDFFF)
