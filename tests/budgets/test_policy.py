"""The budget policy without a server: which budgets apply, holds, denials and charges."""

from __future__ import annotations

import contextlib
import threading
from datetime import date, datetime, timezone
from typing import Any

import pytest

from llmproxy.budgets import policy as policy_module
from llmproxy.budgets.model import Budget, BudgetState
from llmproxy.budgets.policy import (
    BudgetBook,
    BudgetPolicy,
    BudgetsUnavailable,
    Unpriced,
    spend_row,
)
from llmproxy.budgets.policy import BudgetHold as Hold
from llmproxy.config import parse_budgets, parse_pricing
from llmproxy.exchange import Exchange, Outcome, RequestInfo
from llmproxy.pricing import PricingTable

# 2026-12-31 23:59:00 UTC: a day and a month end a minute later
NOW = datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp()
PRICES = {"openai": {"models": {"m1": {"input": 2.0, "output": 10.0}}}}


def policy(budgets: dict[tuple[str, str], Budget] | None = None, **settings: Any
           ) -> BudgetPolicy:
    table = budgets or {}
    return BudgetPolicy(parse_budgets({"budgets": {"enabled": True, **settings}}),
                        PricingTable(parse_pricing({"pricing": PRICES})),
                        BudgetBook(lambda: dict(table), 60), lambda *_: 0, clock=lambda: NOW)


def exchange(model: str | None = "m1", max_output: int | None = None) -> Exchange:
    ex = Exchange("rid", "POST", "/x", provider="openai", dialect="openai", model=model,
                  user="alice", key_id="key_0123456789abcdef", team="red")
    ex.key_budget = Budget(day=1.0)
    ex.request_info = RequestInfo(model=model, max_output_tokens=max_output)
    return ex


def test_every_scope_with_a_budget_holds_the_maximum_cost_in_each_window() -> None:
    p = policy({("user", "alice"): Budget(month=5.0, total=50.0),
                ("team", "red"): Budget(day=2.0), ("team", "blue"): Budget(day=1.0)})
    funds, rate = p.funds(exchange(max_output=100), input_tokens=1000)
    assert [(f.scope, f.window) for f in funds] == [
        ("key:key_0123456789abcdef", "day"), ("user:alice", "month"),
        ("user:alice", "total"), ("team:red", "day")]
    # 1000 input tokens at $2/M + 100 output tokens at $10/M = $0.003
    assert {f.spec.cost for f in funds} == {3_000_000}
    assert rate == 2.0
    assert funds[0].spec.limit == 1_000_000_000
    assert funds[0].spec.key.endswith(":day:20261231")
    assert funds[1].spec.key.endswith(":month:202612") and funds[2].spec.key.endswith(":all")
    assert funds[0].period_start == date(2026, 12, 31)
    assert funds[1].period_start == date(2026, 12, 1) and funds[2].period_start is None
    assert funds[2].spec.expires_at == 0  # a total never expires


def test_without_an_output_cap_the_default_output_is_held() -> None:
    funds, _ = policy(default_output_tokens=1000).funds(exchange(), input_tokens=0)
    assert funds[0].spec.cost == 10_000_000  # 1000 tokens at $10/M


def test_no_budget_no_funds() -> None:
    ex = exchange()
    ex.key_budget = None
    assert policy().funds(ex, 10) == ([], 0.0)


def test_an_unpriced_model_is_refused_or_let_through() -> None:
    with pytest.raises(Unpriced):
        policy().funds(exchange(model="mystery"), 10)
    funds, _ = policy(unpriced="allow").funds(exchange(model="mystery"), 10)
    assert funds and funds[0].spec.cost == 0


def test_a_call_without_a_model_is_refused_unless_it_only_reads() -> None:
    """A multipart upload or a stored-prompt run cannot be priced before it runs: under a
    budget it is refused (unpriced: deny), or holds nothing and pays its cost at the end."""
    with pytest.raises(Unpriced):
        policy().funds(exchange(model=None), 10)
    funds, _ = policy(unpriced="allow").funds(exchange(model=None), 10)
    assert funds and all(f.spec.cost == 0 for f in funds)
    listing = exchange(model=None)
    listing.method = "GET"
    assert policy().funds(listing, 10) == ([], 0.0)  # reading costs nothing: no budget


def test_token_counting_is_free_and_under_no_budget() -> None:
    ex = exchange()
    ex.dialect, ex.provider = "anthropic", "anthropic"
    ex.upstream_path = "/v1/messages/count_tokens"
    p = BudgetPolicy(parse_budgets({"budgets": {"enabled": True}}),
                     PricingTable(parse_pricing({"pricing": {"anthropic": PRICES["openai"]}})),
                     BudgetBook(dict, 60), lambda *_: 0, clock=lambda: NOW)
    assert p.funds(ex, 1000) == ([], 0.0)


def test_several_choices_hold_their_output_each() -> None:
    from llmproxy.providers import DIALECTS

    info = DIALECTS["openai"].inspect("POST", "/v1/chat/completions", "", {},
                                      b'{"model": "m1", "n": 3, "max_tokens": 100}')
    assert info.choices == 3 and info.max_output_tokens == 300
    ex = exchange()
    ex.request_info = info
    funds, _ = policy().funds(ex, input_tokens=0)
    assert funds[0].spec.cost == 300 * 10_000  # 300 tokens at $10/M
    no_cap = DIALECTS["openai"].inspect("POST", "/v1/chat/completions", "", {},
                                        b'{"model": "m1", "n": 2}')
    ex.request_info = no_cap
    funds, _ = policy(default_output_tokens=1000).funds(ex, input_tokens=0)
    assert funds[0].spec.cost == 2 * 1000 * 10_000
    gem = DIALECTS["gemini"].inspect(
        "POST", "/v1beta/models/g:generateContent", "", {},
        b'{"generationConfig": {"candidateCount": 4, "maxOutputTokens": 50}}')
    assert gem.choices == 4 and gem.max_output_tokens == 200


def test_the_refusing_fund_that_resets_last_is_named() -> None:
    p = policy({("user", "alice"): Budget(total=0.001)})
    funds, _ = p.funds(exchange(max_output=1), input_tokens=10)
    states = [BudgetState(spent=999_999_000, held=0), BudgetState(spent=0, held=0)]
    denial = p.denial(funds, states)
    assert denial is not None and denial.fund.scope == "key:key_0123456789abcdef"
    assert denial.wait == 60.0  # a minute to midnight
    assert denial.remaining == 1_000
    states[1] = BudgetState(spent=0, held=990_000)  # both refuse now: the total never resets
    total = p.denial(funds, states)
    assert total is not None and total.fund.window == "total" and total.wait is None


def test_charge_is_the_priced_usage_and_an_aborted_stream_pays_its_input() -> None:
    p = policy()
    ex = exchange()
    funds, rate = p.funds(ex, input_tokens=500)
    ex.reservation = type("R", (), {"budget": Hold("h", funds, [], 500, rate)})()
    ex.cost_usd = 0.0012
    ex.meta.usage.input_tokens, ex.meta.usage.output_tokens = 100, 100
    p.charge(ex)
    assert ex.charged_nanos == 1_200_000
    # a stream whose usage never came: output estimated, input from the estimate
    ex.meta.usage.input_tokens = None
    ex.cost_usd = 0.001  # the estimated output alone
    p.charge(ex)
    assert ex.charged_nanos == 1_000_000 + 1_000_000  # + 500 tokens at $2/M
    # cut short before anything came back: the input estimate
    ex.cost_usd, ex.outcome, ex.status = None, Outcome.CLIENT_ABORTED, 200
    ex.upstream_status, ex.forwarded = 200, True
    p.charge(ex)
    assert ex.charged_nanos == 1_000_000
    # an error answer consumed nothing
    ex.outcome, ex.status, ex.upstream_status = Outcome.COMPLETED, 400, 400
    p.charge(ex)
    assert ex.charged_nanos == 0
    # sent, and no answer came (a timeout, a client that left while waiting, a shutdown):
    # the provider may have run it whole, so the whole hold is paid
    hold = funds[0].spec.cost
    assert hold > 1_000_000 and all(f.spec.cost == hold for f in funds)
    for outcome, status in ((Outcome.UPSTREAM_ERROR, 504), (Outcome.CLIENT_ABORTED, 499),
                            (Outcome.SHUTDOWN, None)):
        ex.outcome, ex.status, ex.upstream_status = outcome, status, None
        p.charge(ex)
        assert ex.charged_nanos == hold
    # never sent (the provider unreachable, the upload cut short, a shutdown before sending)
    ex.forwarded = False
    for outcome, status in ((Outcome.UPSTREAM_ERROR, 502), (Outcome.CLIENT_ABORTED, 499),
                            (Outcome.SHUTDOWN, None)):
        ex.outcome, ex.status = outcome, status
        p.charge(ex)
        assert ex.charged_nanos == 0


def test_spend_row_names_every_identity() -> None:
    ex = exchange()
    ex.upstream_status, ex.charged_nanos = 200, 42
    ex.meta.usage.input_tokens, ex.meta.usage.output_tokens = 7, 3
    row = spend_row(ex)
    assert row is not None
    assert (row.key_id, row.user, row.team, row.model, row.provider) == (
        "key_0123456789abcdef", "alice", "red", "m1", "openai")
    assert (row.cost_nanos, row.requests, row.input_tokens, row.output_tokens) == (42, 1, 7, 3)
    refused = exchange()  # never forwarded, nothing charged: not spend
    assert spend_row(refused) is None


def test_spend_row_names_are_storable_and_dated_by_the_periods_held() -> None:
    ex = exchange(model="bad\x00model\ud800\n")
    ex.user = "ann\x07"
    ex.upstream_status, ex.charged_nanos = 404, 0
    funds, _ = policy().funds(exchange(), input_tokens=10)  # held at 23:59 on Dec 31
    ex.reservation = type("R", (), {"budget": Hold("h", funds, [], 0, 0.0)})()
    ex.started_wall = NOW + 3600  # ended after midnight: still the day it was charged to
    row = spend_row(ex)
    assert row is not None
    assert (row.model, row.user, row.day) == ("badmodel", "ann", date(2026, 12, 31))
    row.model.encode("utf-8")  # no lone surrogate left


def test_the_book_waits_for_its_first_load_and_keeps_the_last_one_on_failure() -> None:
    calls: list[int] = []
    now = [0.0]

    def load() -> dict[tuple[str, str], Budget]:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("database down")
        if len(calls) > 2:
            raise OSError("down again")
        return {("user", "alice"): Budget(day=1.0)}

    book = BudgetBook(load, 5.0, clock=lambda: now[0])
    with pytest.raises(BudgetsUnavailable):
        book.get("user", "alice")
    now[0] = 2.0
    assert book.get("user", "alice") == Budget(day=1.0)
    now[0] = 10.0
    book._reload()  # noqa: SLF001 - the background reload's body, run here to be awaited
    assert book.get("user", "alice") == Budget(day=1.0)


@pytest.mark.parametrize("fails", [False, True])
def test_calls_missing_the_same_counter_share_one_ledger_read(
        fails: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """At midnight or after a Redis restart every call finds its counters missing at once:
    a worker reads each from the ledger once, and every waiting call gets that answer."""
    from dataclasses import dataclass, field

    from llmproxy.budgets import policy as policy_module

    waiting = threading.Semaphore(0)

    class CountedEvent(threading.Event):
        def wait(self, timeout: float | None = None) -> bool:
            waiting.release()  # one more call waits on the read under way
            return super().wait(timeout)

    @dataclass(slots=True)
    class Seeding(policy_module._Seeding):
        done: threading.Event = field(default_factory=CountedEvent)

    monkeypatch.setattr(policy_module, "_Seeding", Seeding)
    reads: list[tuple[str, str, date | None]] = []
    reading, release = threading.Event(), threading.Event()

    def ledger(kind: str, name: str, since: date | None) -> int:
        reads.append((kind, name, since))
        reading.set()
        release.wait()
        if fails:
            raise OSError("database down")
        return 1234

    p = BudgetPolicy(parse_budgets({"budgets": {"enabled": True}}),
                     PricingTable(parse_pricing({"pricing": PRICES})),
                     BudgetBook(dict, 60), ledger, clock=lambda: NOW)
    calls = [p.funds(exchange(), 10)[0] for _ in range(8)]  # the key's day budget each
    seen: list[object] = []

    def seed(funds: list[Any]) -> None:
        try:
            p.seed(funds)
            seen.append(funds[0].spec.seed)
        except BudgetsUnavailable as exc:
            seen.append(exc)

    threads = [threading.Thread(target=seed, args=(funds,)) for funds in calls]
    threads[0].start()
    assert reading.wait(10)  # the first call is reading; the others arrive meanwhile
    for t in threads[1:]:
        t.start()
    for _ in threads[1:]:
        assert waiting.acquire(timeout=10)
    release.set()
    for t in threads:
        t.join()
    assert reads == [("key", "key_0123456789abcdef", date(2026, 12, 31))]
    if fails:
        assert len(seen) == 8 and all(isinstance(s, BudgetsUnavailable) for s in seen)
    else:
        assert seen == [1234] * 8
    with pytest.raises(BudgetsUnavailable) if fails else contextlib.nullcontext():
        p.seed(calls[0])  # a later miss reads again: the store keeps the seed, not the policy
    assert len(reads) == 2
class _WatchedLock:
    """A lock that counts the callers that asked for it (before they block on it)."""

    def __init__(self, changed: threading.Condition) -> None:
        self._lock = threading.Lock()
        self._changed = changed
        self.asked = 0

    def __enter__(self) -> bool:
        with self._changed:
            self.asked += 1
            self._changed.notify_all()
        return self._lock.__enter__()

    def __exit__(self, *exc: object) -> None:
        self._lock.__exit__(*exc)


@pytest.mark.parametrize("fails", [False, True])
def test_callers_before_the_first_load_share_one_load(monkeypatch: pytest.MonkeyPatch,
                                                      fails: bool) -> None:
    callers = 8
    changed = threading.Condition()
    release = threading.Event()
    loads: list[int] = []
    down = [fails]

    def slow_load() -> dict[tuple[str, str], Budget]:
        with changed:
            loads.append(1)
            changed.notify_all()
        assert release.wait(10)  # the database answers (or times out) only when told
        if down[0]:
            raise OSError("database down")
        return {("user", "alice"): Budget(day=1.0)}

    book = BudgetBook(slow_load, 60.0)
    lock = _WatchedLock(changed)
    monkeypatch.setattr(book, "_first_lock", lock, raising=False)
    results: list[object] = []

    def call() -> None:
        try:
            results.append(book.get("user", "alice"))
        except BudgetsUnavailable as exc:
            results.append(exc)

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for t in threads:
        t.start()
    with changed:  # every caller is at the lock (fixed) or in its own load (not fixed)
        assert changed.wait_for(lambda: lock.asked == callers or len(loads) == callers, 10)
    release.set()
    for t in threads:
        t.join(10)
    assert len(loads) == 1
    assert len(results) == callers
    if fails:
        assert all(isinstance(r, BudgetsUnavailable) and "database down" in str(r)
                   for r in results)
        down[0] = False  # a caller after the failed load tries again
        assert book.get("user", "alice") == Budget(day=1.0) and len(loads) == 2
    else:
        assert results == [Budget(day=1.0)] * callers


def test_a_reload_that_cannot_start_is_tried_again(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [0.0]
    reloaded = threading.Event()
    loads: list[int] = []

    def load() -> dict[tuple[str, str], Budget]:
        loads.append(1)
        if len(loads) > 1:
            reloaded.set()
        return {("user", "alice"): Budget(day=float(len(loads)))}

    book = BudgetBook(load, 5.0, clock=lambda: now[0])
    assert book.get("user", "alice") == Budget(day=1.0)

    class NoThreads(threading.Thread):
        def start(self) -> None:
            raise RuntimeError("can't start new thread")

    now[0] = 10.0
    with monkeypatch.context() as patch:
        patch.setattr(policy_module.threading, "Thread", NoThreads)
        assert book.get("user", "alice") == Budget(day=1.0)  # the last table, no error
    assert len(loads) == 1
    now[0] = 20.0  # past the retry
    assert book.get("user", "alice") == Budget(day=1.0)  # answered now, reloaded behind
    assert reloaded.wait(10)
    assert len(loads) == 2
