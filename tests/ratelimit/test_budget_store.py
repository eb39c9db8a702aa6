"""Budget counters in the store, on both backends: seed, hold, settle, expire, refuse."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from services import RedisServer

from llmproxy.ratelimit.redis import RedisStore, connect
from llmproxy.ratelimit.store import BudgetSpec, CounterSpec, Settlement, StoreError

from .conftest import FakeClock, StoreFactory

LIMIT = 1_000  # nano-dollars: small numbers keep the arithmetic readable


def spec(key: str = "budget:user:a:day:1", cost: int = 300, seed: int | None = 0,
         limit: int = LIMIT) -> BudgetSpec:
    return BudgetSpec(key=key, limit=limit, cost=cost, expires_at=0, seed=seed)


def test_a_missing_counter_is_reported_and_nothing_is_charged(make_store: StoreFactory) -> None:
    store = make_store()
    rate = CounterSpec("global:requests:minute", 10, 1, 1, 60, 1, False)
    missing = store.reserve([rate], [spec(seed=None), spec("budget:team:t:day:1")], "h1", 60)
    assert not missing.allowed
    assert missing.missing == [0]
    # nothing was charged: the request counter still has all ten
    assert [store.reserve([rate], [], "", 0).allowed for _ in range(11)] == [True] * 10 + [False]
    assert store.reserve([], [spec(seed=0)], "h2", 60).allowed
    seeded = store.reserve([], [spec(seed=None)], "h3", 60)
    assert seeded.missing == []  # the counter exists now: the seed is needed no more


def test_a_seed_is_stored_once_and_counts(make_store: StoreFactory) -> None:
    store = make_store()
    first = store.reserve([], [spec(seed=600)], "h1", 60)
    assert first.allowed and first.budgets[0].spent == 600 and first.budgets[0].held == 300
    # a second seed (another worker read the ledger a moment later) changes nothing
    second = store.reserve([], [spec(seed=0, cost=100)], "h2", 60)
    assert second.allowed and second.budgets[0].spent == 600
    assert second.budgets[0].held == 400


def test_holds_admit_until_the_limit_and_refuse_beyond(make_store: StoreFactory) -> None:
    store = make_store()
    results = [store.reserve([], [spec()], f"h{i}", 60) for i in range(4)]
    assert [r.allowed for r in results] == [True, True, True, False]
    refused = results[3]
    assert refused.budgets[0].held == 900 and refused.bucket == {}


def test_settling_replaces_the_hold_with_the_spend(make_store: StoreFactory) -> None:
    store = make_store()
    for i in range(3):
        assert store.reserve([], [spec()], f"h{i}", 60).allowed
    store.adjust([], [Settlement("budget:user:a:day:1", "h0", 50, 0),
                      Settlement("budget:user:a:day:1", "h1", 0, 0)])
    state = store.reserve([], [spec(cost=0)], "probe", 60).budgets[0]
    assert (state.spent, state.held) == (50, 300)
    # room is 1000 - 50 - 300 = 650: a 650 hold fits, one more nano does not
    assert store.reserve([], [spec(cost=650)], "h3", 60).allowed
    assert not store.reserve([], [spec(cost=1)], "h4", 60).allowed


def test_a_settlement_twice_counts_once_for_the_hold(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.reserve([], [spec()], "h0", 60).allowed
    store.adjust([], [Settlement("budget:user:a:day:1", "h0", 100, 0)])
    # sent again (its first reply was lost): the hold is gone, so nothing changes
    store.adjust([], [Settlement("budget:user:a:day:1", "h0", 100, 0)])
    state = store.reserve([], [spec(cost=0)], "probe", 60).budgets[0]
    assert (state.spent, state.held) == (100, 0)


def test_an_unsettled_hold_is_released_after_its_ttl(make_store: StoreFactory,
                                                     clock: FakeClock) -> None:
    store = make_store()
    assert store.reserve([], [spec(cost=900)], "killed", 30).allowed
    assert not store.reserve([], [spec(cost=200)], "h1", 30).allowed
    clock.advance(29)
    assert not store.reserve([], [spec(cost=200)], "h2", 30).allowed
    clock.advance(2)
    assert store.reserve([], [spec(cost=200)], "h3", 30).allowed


def test_a_settlement_for_a_lost_counter_is_dropped(make_store: StoreFactory) -> None:
    store = make_store()
    store.adjust([], [Settlement("budget:user:gone:day:1", "h0", 500, 0)])
    again = store.reserve([], [spec("budget:user:gone:day:1", seed=None)], "h1", 60)
    assert again.missing == [0]  # still missing: it will be rebuilt from the ledger


def test_every_budget_and_limit_must_have_room(make_store: StoreFactory) -> None:
    store = make_store()
    day = spec("budget:key:k:day:1", cost=300)
    total = spec("budget:team:t:total:all", cost=300, limit=500)
    assert store.reserve([], [day, total], "h0", 60).allowed
    refused = store.reserve([], [day, total], "h1", 60)
    assert not refused.allowed  # the team's total has 200 left
    # neither was charged by the refused call
    assert [(s.spent, s.held) for s in refused.budgets] == [(0, 300), (0, 300)]
    rate = CounterSpec("global:requests:minute", 1, 1, 1, 60, 1, False)
    assert store.reserve([rate], [], "", 0).allowed
    blocked = store.reserve([rate], [spec("budget:key:k:day:1", cost=1)], "h2", 60)
    assert not blocked.allowed  # the rate limit refuses: the budget is not held either
    assert blocked.budgets[0].held == 300


def test_large_amounts_stay_exact(make_store: StoreFactory) -> None:
    """USD 900,000 in nano-dollars is 9e14: beyond what Lua prints without an exponent."""
    store = make_store()
    big = 900_000 * 10**9
    first = store.reserve([], [spec("budget:user:big:total:all", cost=123_456_789, seed=big,
                                    limit=10**15)], "h0", 60)
    assert first.allowed and first.budgets[0].spent == big
    store.adjust([], [Settlement("budget:user:big:total:all", "h0", 123_456_789, 0)])
    state = store.reserve([], [spec("budget:user:big:total:all", cost=0, limit=10**15)],
                          "p", 60).budgets[0]
    assert state.spent == big + 123_456_789 and state.held == 0


def test_a_call_that_held_nothing_is_still_charged(make_store: StoreFactory) -> None:
    """A call whose model was unknown holds 0, and pays what it was seen to cost."""
    store = make_store()
    assert store.reserve([], [spec(cost=0)], "h0", 60).allowed
    store.adjust([], [Settlement("budget:user:a:day:1", "h0", 250, 0)])
    state = store.reserve([], [spec(cost=0)], "probe", 60).budgets[0]
    assert (state.spent, state.held) == (250, 0)


def test_a_settlement_that_timed_out_is_sent_again_and_counted_once(
        redis_server: RedisServer) -> None:
    """Redis runs the settlement later than the call's timeout: the store keeps it and the
    next call carries it again; the hold is the token, so the spend counts once."""
    store = RedisStore(connect(redis_server.url, 50), "t:")
    assert store.reserve([], [spec(cost=300)], "h0", 60).allowed
    pauser = redis_server.client()
    try:
        assert pauser.client_pause(300, all=False)  # scripts wait 300 ms: later than 50
        with pytest.raises(StoreError):
            store.adjust([], [Settlement("budget:user:a:day:1", "h0", 120, 0)])
        pauser.set("unpaused", 1)  # a write: answered once the pause is over
    finally:
        pauser.close()
    state = store.reserve([], [spec(cost=0)], "probe", 60).budgets[0]  # carries it again
    assert (state.spent, state.held) == (120, 0)
    store.close()


def test_settlements_wait_while_redis_is_down(redis_server: RedisServer) -> None:
    store = RedisStore(connect(redis_server.url, 200), "t:")
    assert store.reserve([], [spec(cost=300)], "h0", 60).allowed
    admin = redis_server.client()
    admin.config_set("requirepass", "closed-for-a-moment")
    admin.client_kill_filter(_type="normal", skipme=True)  # the store's pooled connection
    admin.close()
    try:
        with pytest.raises(StoreError):
            store.adjust([], [Settlement("budget:user:a:day:1", "h0", 90, 0)])
        with pytest.raises(StoreError):  # still refused: the settlement stays queued
            store.reserve([], [spec(cost=0)], "p1", 60)
    finally:
        admin = redis.Redis.from_url(redis_server.url, password="closed-for-a-moment")
        admin.config_set("requirepass", "")
        admin.close()
    state = store.reserve([], [spec(cost=0)], "p2", 60).budgets[0]
    assert (state.spent, state.held) == (90, 0)
    store.close()


def test_a_hold_whose_reply_was_lost_is_released_by_the_next_call(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Redis ran a reservation whose reply was lost (a timeout with no late wait to be had:
    all taken, or the connection dropped): its hold would stay for hold_seconds, refusing
    calls the budget could pay. The store releases it with a later call (a no-op if it was
    never taken)."""
    store = RedisStore(connect(redis_server.url, 2000), "t:")
    run = store._run

    def ran_but_no_reply(script: Any, keys: Any, args: Any) -> Any:
        run(script, keys, args)
        raise StoreError("TimeoutError")

    monkeypatch.setattr(store, "_run", ran_but_no_reply)
    with pytest.raises(StoreError) as err:
        store.reserve([], [spec(cost=300)], "h-lost", 60)
    assert err.value.late is None
    monkeypatch.setattr(store, "_run", run)
    probe = redis_server.client()
    assert probe.hget("t:{rl}:budget:user:a:day:1", "h") == b"300"  # it did run
    probe.close()
    state = store.reserve([], [spec(cost=0)], "probe", 60).budgets[0]  # carries the release
    assert (state.spent, state.held) == (0, 0)
    store.close()


def test_settlements_queued_are_carried_a_bounded_number_at_a_time(
        redis_server: RedisServer) -> None:
    from llmproxy.ratelimit.redis import MAX_CARRIED_SETTLEMENTS

    store = RedisStore(connect(redis_server.url, 2000), "t:", reconcile_delay=3600)
    many = 2 * MAX_CARRIED_SETTLEMENTS + 20
    for i in range(many):
        assert store.reserve([], [spec(cost=1, limit=10**6)], f"h{i}", 60).allowed
    store.adjust([], [Settlement("budget:user:a:day:1", f"h{i}", 2, 0) for i in range(many)])
    state = store.reserve([], [spec(cost=0)], "p0", 60).budgets[0]
    assert (state.spent, state.held) == (2 * MAX_CARRIED_SETTLEMENTS,
                                         many - MAX_CARRIED_SETTLEMENTS)
    state = store.reserve([], [spec(cost=0)], "p1", 60).budgets[0]
    assert state.held == many - 2 * MAX_CARRIED_SETTLEMENTS
    store.adjust([], [Settlement("budget:user:a:day:1", f"x{i}", 0, 0)
                      for i in range(20 * MAX_CARRIED_SETTLEMENTS)])  # unknown: no-ops
    store.flush()  # the rest, in scripts of a bounded size
    state = store.reserve([], [spec(cost=0)], "p2", 60).budgets[0]
    assert (state.spent, state.held) == (2 * many, 0)
    store.close()
