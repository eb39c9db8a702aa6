"""Budgets, their windows and the ledger's rows: plain values shared by every part.

Money is counted in integer nano-dollars (10^-9 USD) everywhere it is summed — counters,
the ledger — so that sums are exact and equal wherever they are made; USD floats appear only
at the edges (configuration, JSON, headers).
"""

from __future__ import annotations

import calendar
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from typing import Any

log = logging.getLogger(__name__)

NANOS_PER_USD = 1_000_000_000
#: The budget windows: a UTC calendar day, a UTC calendar month, and ever (prepaid).
WINDOWS = ("day", "month", "total")
# How each window reads in help texts.
WINDOW_PHRASES = {"day": "per UTC day", "month": "per UTC calendar month",
                  "total": "in total (prepaid, never resets)"}
#: Who a budget belongs to.
SCOPE_KINDS = ("key", "user", "team")
#: Largest budget accepted, in USD: counters stay exact integers in Lua's doubles (2^53 ns).
MAX_BUDGET_USD = 1_000_000.0


class BudgetValidationError(ValueError):
    """A budget a caller gave is invalid; the message names the field."""

    def __init__(self, field_name: str, problem: str) -> None:
        super().__init__(f"{field_name}: {problem}")
        self.field = field_name
        self.problem = problem


def to_nanos(usd: float) -> int:
    """USD as integer nano-dollars (rounded to the nearest)."""
    return int(round(usd * NANOS_PER_USD))


def to_usd(nanos: int) -> float:
    return nanos / NANOS_PER_USD


@dataclass(frozen=True, slots=True)
class Budget:
    """USD limits of one scope; ``None`` means no limit in that window."""

    day: float | None = None
    month: float | None = None
    total: float | None = None

    def limit(self, window: str) -> float | None:
        value: float | None = getattr(self, window)
        return value

    def is_empty(self) -> bool:
        return self.day is None and self.month is None and self.total is None

    def public(self) -> dict[str, float | None]:
        return {"day": self.day, "month": self.month, "total": self.total}


def parse_budget(value: Any, field_name: str = "budgets") -> Budget | None:
    """``{"day", "month", "total"}`` (each a number >= 0 or null) as a Budget.

    ``None`` (or an object with every window null) means no budget. Unknown fields, booleans,
    negative or non-finite numbers are refused.
    """
    if value is None:
        return None
    if not isinstance(value, Mapping):
        raise BudgetValidationError(field_name, "must be an object with day, month and/or "
                                                "total in USD, or null")
    for key in value:
        if key not in WINDOWS:
            raise BudgetValidationError(f"{field_name}.{key}",
                                        f"unknown window (allowed: {', '.join(WINDOWS)})")
    limits: dict[str, float | None] = {}
    for window in WINDOWS:
        raw = value.get(window)
        if raw is None:
            limits[window] = None
            continue
        # Compared, never converted first: a JSON integer of any size compares exactly (and
        # float() or isfinite() of a 400-digit one raises); NaN fails both comparisons.
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) \
                or not 0 <= raw <= MAX_BUDGET_USD:
            raise BudgetValidationError(f"{field_name}.{window}",
                                        f"must be a number of USD from 0 to {MAX_BUDGET_USD:g}, "
                                        "or null")
        limits[window] = float(raw)
    budget = Budget(**limits)
    return None if budget.is_empty() else budget


def budget_from_json(value: Any) -> Budget | None:
    """A Budget as stored (JSON column); tolerant of a missing or empty value."""
    if not value:
        return None
    try:
        return parse_budget(value)
    except BudgetValidationError as exc:  # written around the admin API: said, not hidden
        log.warning("a stored budget is not valid and applies no limit: %s", exc)
        return None


_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")


def parse_day(text: str) -> date:
    """A UTC day written YYYY-MM-DD, and no other of the forms ISO 8601 allows (such as
    ``20261201`` or ``2026-W49-2``); ValueError otherwise."""
    if not _DAY.fullmatch(text):
        raise ValueError(text)
    return date.fromisoformat(text)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def period_start(window: str, today: date) -> date | None:
    """First UTC day counted in ``window`` on ``today``; None for ``total`` (every day)."""
    if window == "day":
        return today
    if window == "month":
        return today.replace(day=1)
    return None


def period_id(window: str, today: date) -> str:
    """A name for the current period of ``window``: ``20261201``, ``202612`` or ``all``."""
    if window == "day":
        return today.strftime("%Y%m%d")
    if window == "month":
        return today.strftime("%Y%m")
    return "all"


def period_end(window: str, now: datetime) -> datetime | None:
    """When the current period of ``window`` ends (aware UTC); None for ``total``."""
    today = now.astimezone(timezone.utc).date()
    midnight = datetime(today.year, today.month, today.day, tzinfo=timezone.utc)
    if window == "day":
        return midnight + timedelta(days=1)
    if window == "month":
        days = calendar.monthrange(today.year, today.month)[1]
        return midnight.replace(day=1) + timedelta(days=days)
    return None


@dataclass(frozen=True, slots=True)
class SpendRow:
    """One call's spend for the ledger; rows with the same identity are summed.

    Missing identities are empty strings, not NULL: they are part of the ledger's key.
    """

    day: date  # UTC day the call ended
    key_id: str
    user: str
    team: str
    model: str
    provider: str
    cost_nanos: int
    requests: int
    input_tokens: int
    output_tokens: int

    @property
    def identity(self) -> tuple[date, str, str, str, str, str]:
        return (self.day, self.key_id, self.user, self.team, self.model, self.provider)


# ----------------------------------------------------------- counters in the rate-limit store


@dataclass(slots=True)
class BudgetSpec:
    """One spend budget to check and hold in a reservation (amounts in nano-dollars).

    A budget counter keeps the settled spend of one scope in one period and the holds of
    the calls in flight. A hold that is never settled (its worker was killed) is released
    when ``hold_ttl`` passes, so no reservation is left behind for good.
    """

    key: str  # unique per scope and period, e.g. "budget:user:alice:day:20261201"
    limit: int
    cost: int  # held until the call settles; admitted only if spent + held + cost <= limit
    expires_at: int  # epoch seconds after which the counter may be forgotten; 0: never
    seed: int | None = None  # spend per the ledger, stored only when the counter is missing


@dataclass(slots=True)
class BudgetState:
    """A budget counter as seen by a reservation (after holding, when it was allowed)."""

    spent: int  # settled spend in the period
    held: int  # holds of the calls in flight


@dataclass(slots=True)
class Settlement:
    """Replace a hold with what the call really cost."""

    key: str
    hold: str  # the reservation's hold id
    amount: int  # nano-dollars spent (>= 0)
    expires_at: int
