"""In-process counter store: exact within one process, bounded memory.

Memory is bounded twice: counters whose usage has left the window are dropped, and at most
``max_counters`` are kept, so that a flood of distinct users or keys cannot grow the worker.
Past the cap the least recently charged counters are forgotten (their scopes start again
from zero), and ``on_evict`` hears how many.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..config import DEFAULT_MAX_COUNTERS
from .store import (
    Adjustment,
    BudgetSpec,
    BudgetState,
    CounterSpec,
    CounterState,
    Decision,
    Settlement,
    fits,
    retry_after,
)


@dataclass(slots=True)
class _Counter:
    granularity: int
    span: int
    total: int = 0
    charged_at: float = 0.0  # clock time of the last charge to the current bucket
    # bucket index -> amount. Only the current bucket is ever inserted, so keys are in
    # ascending order and the first item is the oldest bucket.
    buckets: OrderedDict[int, int] = field(default_factory=OrderedDict)

    def evict(self, current: int) -> None:
        horizon = current - self.span
        while self.buckets:
            index = next(iter(self.buckets))
            if index > horizon:
                break
            self.total -= self.buckets.popitem(last=False)[1]

    def add(self, index: int, delta: int) -> None:
        value = self.buckets.get(index, 0) + delta
        if value <= 0:  # a refund can empty a bucket; it never goes negative
            self.total -= self.buckets.pop(index, 0)
        else:
            self.total += delta
            self.buckets[index] = value

    def expires_at(self) -> float:
        """The time at which every bucket has left the window."""
        if not self.buckets:
            return 0.0
        return float((next(reversed(self.buckets)) + self.span) * self.granularity)

    def reset_after(self, now: float) -> float:
        if not self.buckets:
            return 0.0
        return max((next(iter(self.buckets)) + self.span) * self.granularity - now, 0.0)


@dataclass(slots=True)
class _Budget:
    """Settled spend of one scope and period, and the holds of its calls in flight."""

    spent: int
    expires_at: float  # wall-clock epoch seconds; 0: never
    held: int = 0
    # hold id -> (amount, deadline on the store's clock). Every hold gets the same TTL, so
    # insertion order is deadline order: expired holds are found at the front.
    holds: OrderedDict[str, tuple[int, float]] = field(default_factory=OrderedDict)

    def release_expired(self, now: float) -> None:
        while self.holds:
            hold_id, (amount, deadline) = next(iter(self.holds.items()))
            if deadline > now:
                break
            del self.holds[hold_id]
            self.held -= amount


# Counters of one window length, least recently charged first. A counter's expiry time is
# fixed by its newest bucket, so this order is also the order of expiry: the sweep drops
# expired counters from the front and stops at the first live one.
_Table = OrderedDict[str, _Counter]


def _front_charged_at(table: _Table) -> float:
    """When the first (least recently charged) counter of ``table`` was last charged."""
    return next(iter(table.values())).charged_at


class MemoryStore:
    """Counters in dicts guarded by a lock; nothing inside the lock can yield to gevent."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, *,
                 max_counters: int = DEFAULT_MAX_COUNTERS,
                 on_evict: Callable[[int], None] | None = None) -> None:
        self.clock = clock
        self.max_counters = max_counters
        self._on_evict = on_evict
        self._lock = threading.Lock()
        self._tables: dict[tuple[int, int], _Table] = {}
        # Budget counters: one per scope with a budget and period, so few; forgotten once
        # their period has ended (by the wall clock, as periods are calendar days).
        self._budgets: dict[str, _Budget] = {}
        self._wall = time.time
        self._budget_sweep_at = 0.0

    def __len__(self) -> int:
        """Number of live counters (for tests and debugging)."""
        return sum(len(t) for t in self._tables.values())

    def _table(self, window: int, granularity: int) -> _Table:
        table = self._tables.get((window, granularity))
        if table is None:
            table = self._tables[(window, granularity)] = OrderedDict()
        return table

    def _sweep(self, now: float) -> None:
        for table in self._tables.values():
            while table:
                key, counter = next(iter(table.items()))
                if counter.expires_at() > now:
                    break
                del table[key]

    def _bound(self) -> int:
        """Forget the least recently charged counters beyond ``max_counters``; how many.

        Each table is in order of last charge, so the oldest counter of all is at the front
        of one of them.
        """
        excess = sum(len(t) for t in self._tables.values()) - self.max_counters
        evicted = 0
        while evicted < excess:
            oldest = min((t for t in self._tables.values() if t), key=_front_charged_at)
            oldest.popitem(last=False)
            evicted += 1
        return evicted

    def _evicted(self, count: int) -> None:
        if count and self._on_evict is not None:
            self._on_evict(count)

    def _lookup(self, table: _Table, key: str, granularity: int, span: int,
                now: float) -> _Counter:
        counter = table.get(key)
        if counter is None:
            return _Counter(granularity, span)  # stored only once something is charged
        counter.evict(math.floor(now / granularity))
        return counter

    @staticmethod
    def _store(table: _Table, key: str, counter: _Counter, newest: bool, now: float) -> None:
        if not counter.buckets:
            table.pop(key, None)
            return
        if newest:
            counter.charged_at = now
        if key not in table:
            table[key] = counter
        elif newest:
            table.move_to_end(key)

    def reserve(self, specs: Sequence[CounterSpec], budgets: Sequence[BudgetSpec] = (),
                hold: str = "", hold_ttl: float = 0.0) -> Decision:
        decision, evicted = self._reserve(specs, budgets, hold, hold_ttl)
        self._evicted(evicted)  # outside the lock: the listener may log
        return decision

    def _budget_counters(self, budgets: Sequence[BudgetSpec], now: float,
                         wall: float) -> tuple[list[_Budget | None], list[int]]:
        """The budgets' counters (seeded where a seed came), and the missing ones."""
        if wall >= self._budget_sweep_at:  # drop the counters of ended periods
            self._budget_sweep_at = wall + 60
            for key in [k for k, b in self._budgets.items() if 0 < b.expires_at <= wall]:
                del self._budgets[key]
        found: list[_Budget | None] = []
        missing: list[int] = []
        for i, spec in enumerate(budgets):
            counter = self._budgets.get(spec.key)
            if counter is None and spec.seed is not None:
                counter = self._budgets[spec.key] = _Budget(spec.seed, spec.expires_at)
            if counter is None:
                missing.append(i)
            else:
                counter.release_expired(now)
            found.append(counter)
        return found, missing

    def _reserve(self, specs: Sequence[CounterSpec], budgets: Sequence[BudgetSpec],
                 hold: str, hold_ttl: float) -> tuple[Decision, int]:
        with self._lock:
            now = self.clock()
            wall = self._wall()
            self._sweep(now)
            funds, missing = self._budget_counters(budgets, now, wall)
            if missing:
                return Decision(False, {}, [], [], missing), 0
            tables = [self._table(s.window, s.granularity) for s in specs]
            counters = [self._lookup(t, s.key, s.granularity, s.span, now)
                        for t, s in zip(tables, specs, strict=True)]
            ok = all(fits(s, c.total) for s, c in zip(specs, counters, strict=True))
            for bspec, fund in zip(budgets, funds, strict=True):
                assert fund is not None
                if fund.spent + fund.held + bspec.cost > bspec.limit:
                    ok = False
            budget_states: list[BudgetState] = []
            for bspec, fund in zip(budgets, funds, strict=True):
                assert fund is not None
                if ok:  # a hold of 0 too: it is what the settlement is matched against
                    fund.held += bspec.cost
                    fund.holds[hold] = (bspec.cost, now + hold_ttl)
                budget_states.append(BudgetState(fund.spent, fund.held))
            states: list[CounterState] = []
            charged: dict[str, int] = {}
            for spec, table, counter in zip(specs, tables, counters, strict=True):
                wait: float | None = None
                if ok:
                    index = math.floor(now / spec.granularity)
                    if spec.cost > 0:
                        counter.add(index, spec.cost)
                    charged[spec.key] = index
                    self._store(table, spec.key, counter, True, now)
                elif not fits(spec, counter.total):
                    wait = retry_after(spec, counter.total, counter.buckets.items(), now)
                states.append(CounterState(counter.total, wait, counter.reset_after(now)))
            return Decision(ok, charged, states, budget_states), self._bound() if ok else 0

    def adjust(self, adjustments: Sequence[Adjustment],
               settlements: Sequence[Settlement] = ()) -> None:
        self._evicted(self._adjust(adjustments, settlements))

    def _adjust(self, adjustments: Sequence[Adjustment],
                settlements: Sequence[Settlement] = ()) -> int:
        with self._lock:
            now = self.clock()
            self._sweep(now)
            for settlement in settlements:
                fund = self._budgets.get(settlement.key)
                if fund is None:
                    continue  # forgotten (period over): the ledger has the spend
                held = fund.holds.pop(settlement.hold, None)
                if held is None:
                    continue  # settled before, or released by its TTL (as in budget.lua)
                fund.held -= held[0]
                fund.spent += max(settlement.amount, 0)
            for adj in adjustments:
                if adj.delta == 0:
                    continue
                table = self._table(adj.window, adj.granularity)
                counter = self._lookup(table, adj.key, adj.granularity, adj.span, now)
                current = math.floor(now / adj.granularity)
                if adj.bucket in counter.buckets and adj.bucket > current - adj.span:
                    counter.add(adj.bucket, adj.delta)
                    self._store(table, adj.key, counter, adj.bucket == current, now)
                elif adj.delta > 0:
                    # The reserved bucket left the window (or never held anything): charge
                    # the excess now, which counts it a little longer, never shorter.
                    counter.add(current, adj.delta)
                    self._store(table, adj.key, counter, True, now)
            return self._bound()

    def ping(self) -> None:
        """Always answers: it is this process's memory."""

    def close(self) -> None:
        with self._lock:
            self._tables.clear()
            self._budgets.clear()
