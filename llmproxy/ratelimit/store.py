"""The counter store interface shared by the memory and Redis backends.

A *counter* is one (scope, metric, window) triple, e.g. requests per minute of one API key.
Each counter keeps its usage in time buckets of ``granularity`` seconds; bucket ``b`` covers
``[b*g, (b+1)*g)`` and counts toward the window until ``(b + span) * g`` where
``span = window / g + 1``. Counting one bucket more than ``window / g`` is what makes the
limit hold for every ``window``-long span whatever the time of day (see docs/rate-limiting.md
for the proof); the cost is that usage can be remembered up to ``g`` seconds
longer than strictly necessary.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..budgets.model import BudgetSpec, BudgetState, Settlement

__all__ = ["Adjustment", "BudgetSpec", "BudgetState", "CounterSpec", "CounterState", "Decision",
           "LateDecision", "Settlement", "Store", "StoreError", "fits", "retry_after"]

# The records below are built several times per request and never changed afterwards. They
# are plain slotted dataclasses rather than frozen ones because a frozen dataclass's
# __init__ costs about five times as much (object.__setattr__ per field).


class LateDecision(Protocol):
    """The decision of a reservation that timed out after it was sent, should it come."""

    def then(self, callback: Callable[[Decision | None], None]) -> None:
        """Call ``callback`` once with the decision, or None if none came in time."""


class StoreError(Exception):
    """The backend could not answer (connection refused, timeout, script error...)."""

    #: Set when a reservation timed out after it was sent: the backend may still have run
    #: it, and charged its counters. Whoever handles the error settles it when it comes.
    late: LateDecision | None = None


@dataclass(slots=True)
class CounterSpec:
    """One counter to check and charge in a reservation."""

    key: str  # unique name of the counter, e.g. "key:fp_ab12:tokens:minute"
    limit: int  # > 0
    cost: int  # amount charged on success (>= 0)
    need: int  # room required for admission: 1 for requests, max(cost, 1) for tokens
    window: int  # seconds (60 or 86400)
    granularity: int  # seconds per bucket; divides window
    optimistic: bool  # skip the check while the window is empty (token counters)

    @property
    def span(self) -> int:
        return self.window // self.granularity + 1


@dataclass(slots=True)
class CounterState:
    """A counter as seen by a reservation: usage and when it changes."""

    used: int  # usage in the window (after charging, when the reservation succeeded)
    retry_after: float | None  # seconds until the request fits; None when it fits now
    reset_after: float  # seconds until the oldest usage leaves the window (0 if none)


@dataclass(slots=True)
class Decision:
    """Outcome of :meth:`Store.reserve`: all counters charged, or none."""

    allowed: bool
    bucket: dict[str, int]  # counter key -> bucket index charged (only when allowed)
    states: list[CounterState]  # same order as the specs
    budgets: list[BudgetState] = field(default_factory=list)  # same order as the budgets
    # Indexes of budgets whose counter is missing and came without a seed: nothing was
    # charged; the caller reads their spend from the ledger and asks again with seeds.
    missing: list[int] = field(default_factory=list)


@dataclass(slots=True)
class Adjustment:
    """Change a past charge: ``delta`` is added to the bucket the reservation charged."""

    key: str
    bucket: int
    delta: int
    window: int
    granularity: int

    @property
    def span(self) -> int:
        return self.window // self.granularity + 1


class Store(Protocol):
    """Atomic check-and-charge over many counters, and later corrections."""

    def reserve(self, specs: Sequence[CounterSpec], budgets: Sequence[BudgetSpec] = (),
                hold: str = "", hold_ttl: float = 0.0) -> Decision:
        """Charge every counter and hold every budget if all have room; otherwise none.

        ``hold`` names the budget holds (unique per reservation); each is released after
        ``hold_ttl`` seconds unless settled before.
        """

    def adjust(self, adjustments: Sequence[Adjustment],
               settlements: Sequence[Settlement] = ()) -> None:
        """Apply reconciliation deltas (negative = refund) and settle budget holds.

        A settlement for a counter that is missing (the store restarted since) is dropped:
        the ledger has the spend, and the counter is rebuilt from it.
        """

    def ping(self) -> None:
        """Raise :class:`StoreError` unless the store answers now (readiness)."""

    def close(self) -> None:
        """Release connections."""


def fits(spec: CounterSpec, used: int) -> bool:
    """The admission rule for one counter (the optimistic first request included)."""
    if spec.optimistic and used <= 0:
        return True
    return used + spec.need <= spec.limit


def retry_after(spec: CounterSpec, used: int, buckets: Iterable[tuple[int, int]],
                now: float) -> float:
    """Seconds until ``spec`` fits, as the oldest buckets leave the window.

    ``buckets`` are (index, amount) pairs in ascending index order. Usage only decreases with
    time when nothing else is admitted, so the first moment the rule holds is the answer.
    """
    g = spec.granularity
    leave = now
    for index, amount in buckets:
        used -= amount
        leave = (index + spec.span) * g
        if fits(spec, used):
            return max(leave - now, 0.0)
    return max(leave - now, 0.0)
