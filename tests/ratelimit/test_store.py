"""The counter stores, one suite run against both backends (memory and a real Redis)."""

from __future__ import annotations

import math
import random
import socket
import threading
import time

import pytest
from services import RedisServer, closed_port

from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.redis import RedisStore, connect
from llmproxy.ratelimit.store import Adjustment, CounterSpec, StoreError

from .conftest import FakeClock, StoreFactory


def requests_spec(limit: int, key: str = "k:requests:minute") -> CounterSpec:
    return CounterSpec(key, limit, cost=1, need=1, window=60, granularity=1, optimistic=False)


def tokens_spec(limit: int, cost: int, key: str = "k:tokens:minute", window: int = 60,
                granularity: int = 1) -> CounterSpec:
    return CounterSpec(key, limit, cost=cost, need=max(cost, 1), window=window,
                       granularity=granularity, optimistic=True)


def test_admits_exactly_the_limit_then_retry_after_is_exact(make_store: StoreFactory,
                                                            clock: FakeClock) -> None:
    store = make_store()
    first_bucket = math.floor(clock.now)
    results = [store.reserve([requests_spec(5)]) for _ in range(5)]
    assert all(d.allowed for d in results)
    assert [d.states[0].used for d in results] == [1, 2, 3, 4, 5]
    clock.advance(10.5)
    denied = store.reserve([requests_spec(5)])
    assert not denied.allowed
    free_at = first_bucket + 61  # the first bucket counts until its index + window + 1
    retry = denied.states[0].retry_after
    assert retry == pytest.approx(free_at - clock.now, abs=0.002)
    clock.advance(retry - 0.01)
    assert not store.reserve([requests_spec(5)]).allowed
    clock.advance(0.02)
    again = store.reserve([requests_spec(5)])
    assert again.allowed and again.states[0].used == 1  # all five shared one bucket


def in_window(times: list[tuple[float, int]], now: float) -> int:
    """Usage the algorithm counts at ``now``: buckets floor(now) - 60 .. floor(now)."""
    return sum(c for a, c in times if math.floor(a) >= math.floor(now) - 60)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_never_more_than_the_limit_in_any_60s_span(make_store: StoreFactory, clock: FakeClock,
                                                   seed: int) -> None:
    store = make_store()
    rng = random.Random(seed)
    limit = 7
    admitted: list[tuple[float, int]] = []
    denials = 0
    start = clock.now
    while clock.now < start + 400:
        # bursts and gaps, landing anywhere inside a second (window edges included)
        clock.advance(rng.choice([0.0, 0.001, 0.3, 0.999, 1.0, 5.0, 17.7, 29.99]))
        if store.reserve([requests_spec(limit)]).allowed:
            admitted.append((clock.now, 1))
        else:
            denials += 1
            # and never stricter than documented: a refusal means the counted window is full
            assert in_window(admitted, clock.now) == limit
    assert denials > 0
    for t, _ in admitted:
        in_span = [a for a, _ in admitted if t <= a <= t + 60]
        assert len(in_span) <= limit, f"{len(in_span)} admissions within 60 s of {t}"


def test_tokens_in_any_span_stay_within_the_limit_or_one_optimistic_request(
        make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store()
    rng = random.Random(7)
    limit = 1000
    admitted: list[tuple[float, int]] = []
    start = clock.now
    while clock.now < start + 1000:
        clock.advance(rng.choice([0.0, 0.5, 1.0, 3.3, 12.0, 70.0]))
        cost = rng.choice([1, 50, 200, 400, 1500])
        if store.reserve([tokens_spec(limit, cost)]).allowed:
            admitted.append((clock.now, cost))
        else:
            used = in_window(admitted, clock.now)
            assert used > 0 and used + cost > limit  # refused only when it cannot fit
    assert any(cost > limit for _, cost in admitted), "the optimistic case was not exercised"
    for t, _ in admitted:
        span = [c for a, c in admitted if t <= a <= t + 60]
        assert sum(span) <= limit or len(span) == 1, span


def test_reservation_is_all_or_nothing(make_store: StoreFactory) -> None:
    store = make_store()
    key_spec = requests_spec(1, "key:a:requests:minute")
    user_spec = requests_spec(10, "user:u:requests:minute")
    assert store.reserve([key_spec, user_spec]).allowed
    denied = store.reserve([key_spec, user_spec])
    assert not denied.allowed
    assert denied.states[0].retry_after is not None  # the key counter refused
    assert denied.states[1].retry_after is None  # the user counter had room...
    assert denied.states[1].used == 1  # ...and was not charged by the refused request
    assert store.reserve([user_spec]).states[0].used == 2


def test_optimistic_first_request_and_its_retry_after(make_store: StoreFactory,
                                                       clock: FakeClock) -> None:
    store = make_store()
    bucket = math.floor(clock.now)
    big = store.reserve([tokens_spec(100, 500)])
    assert big.allowed and big.states[0].used == 500  # window empty: admitted whatever its size
    clock.advance(2)
    small = store.reserve([tokens_spec(100, 1)])
    assert not small.allowed
    assert small.states[0].retry_after == pytest.approx(bucket + 61 - clock.now, abs=0.002)
    clock.advance(small.states[0].retry_after or 0)
    assert store.reserve([tokens_spec(100, 500)]).allowed  # empty again: optimistic again


def test_token_budget_used_up_refuses_even_a_zero_estimate(make_store: StoreFactory) -> None:
    store = make_store()
    assert store.reserve([tokens_spec(100, 60)]).allowed
    assert store.reserve([tokens_spec(100, 40)]).allowed
    assert not store.reserve([tokens_spec(100, 0)]).allowed  # needs one token of room


def test_retry_after_waits_for_enough_room_not_just_the_oldest_bucket(
        make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store()
    t0 = math.floor(clock.now)
    assert store.reserve([tokens_spec(100, 30)]).allowed  # bucket t0
    clock.advance(5)
    assert store.reserve([tokens_spec(100, 60)]).allowed  # bucket t0 + 5
    clock.advance(5)
    denied = store.reserve([tokens_spec(100, 50)])  # needs 40 more: both buckets must leave
    assert not denied.allowed
    assert denied.states[0].retry_after == pytest.approx(t0 + 5 + 61 - clock.now, abs=0.002)


def test_refund_frees_room_in_the_same_window(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store()
    first = store.reserve([tokens_spec(100, 80)])
    assert first.allowed
    assert not store.reserve([tokens_spec(100, 50)]).allowed
    bucket = first.bucket["k:tokens:minute"]
    store.adjust([Adjustment("k:tokens:minute", bucket, -70, 60, 1)])  # it really used 10
    after = store.reserve([tokens_spec(100, 50)])
    assert after.allowed and after.states[0].used == 60


def test_excess_after_the_window_is_charged_now(make_store: StoreFactory,
                                                clock: FakeClock) -> None:
    store = make_store()
    first = store.reserve([tokens_spec(100, 10)])
    bucket = first.bucket["k:tokens:minute"]
    clock.advance(90)  # a long stream: its reservation left the window
    store.adjust([Adjustment("k:tokens:minute", bucket, -5, 60, 1)])  # dropped: nothing to fix
    store.adjust([Adjustment("k:tokens:minute", bucket, 100, 60, 1)])  # really used 110
    denied = store.reserve([tokens_spec(100, 1)])
    assert not denied.allowed and denied.states[0].used == 100
    assert denied.states[0].retry_after == pytest.approx(
        math.floor(clock.now) + 61 - clock.now, abs=0.002)


def test_day_window_counts_for_a_day(make_store: StoreFactory, clock: FakeClock) -> None:
    store = make_store()
    spec = CounterSpec("k:requests:day", 2, 1, 1, window=86400, granularity=60,
                       optimistic=False)
    bucket = math.floor(clock.now / 60)
    assert store.reserve([spec]).allowed
    clock.advance(3600)
    assert store.reserve([spec]).allowed
    clock.advance(3600)
    denied = store.reserve([spec])
    assert not denied.allowed
    assert denied.states[0].retry_after == pytest.approx((bucket + 1441) * 60 - clock.now,
                                                         abs=0.002)


def test_concurrent_reservations_admit_exactly_the_limit(make_store: StoreFactory) -> None:
    store = make_store()
    results: list[bool] = []
    lock = threading.Lock()
    go = threading.Event()

    def worker() -> None:
        go.wait()
        for _ in range(5):
            allowed = store.reserve([requests_spec(37), tokens_spec(10_000, 3)]).allowed
            with lock:
                results.append(allowed)

    threads = [threading.Thread(target=worker) for _ in range(20)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join()
    assert len(results) == 100 and results.count(True) == 37


def test_memory_store_forgets_expired_counters(clock: FakeClock) -> None:
    store = MemoryStore(clock)
    for i in range(5000):
        assert store.reserve([requests_spec(3, f"user:u{i}:requests:minute"),
                              tokens_spec(10, 0, f"user:u{i}:tokens:minute")]).allowed
    assert len(store) == 5000  # zero-cost token counters hold nothing
    clock.advance(30)
    store.reserve([requests_spec(3, "user:late:requests:minute")])
    assert len(store) == 5001
    clock.advance(31.5)
    store.reserve([requests_spec(3, "user:last:requests:minute")])
    assert len(store) == 2  # only the two still inside their window remain


def test_redis_keys_expire_and_carry_one_hash_tag(redis_server: RedisServer,
                                                  clock: FakeClock) -> None:
    store = RedisStore(connect(redis_server.url, 1000), "pfx:", clock=clock)
    store.reserve([requests_spec(3, "key:fp_0123:requests:minute"),
                   tokens_spec(10, 4, "key:fp_0123:tokens:day", 86400, 60)])
    client = redis_server.client()
    keys = sorted(k.decode() for k in client.keys("*"))
    assert keys == ["pfx:{rl}:key:fp_0123:requests:minute", "pfx:{rl}:key:fp_0123:tokens:day"]
    assert 0 < client.pttl(keys[0]) <= 62_000
    assert 86_400_000 < client.pttl(keys[1]) <= 86_520_000
    client.close()
    store.close()


def test_redis_store_fails_fast_when_redis_is_down() -> None:
    with closed_port() as port:
        store = RedisStore(connect(f"redis://127.0.0.1:{port}/0", 50))
        started = time.monotonic()
        with pytest.raises(StoreError):
            store.reserve([requests_spec(1)])
        with pytest.raises(StoreError):
            store.adjust([Adjustment("k:requests:minute", 1, -1, 60, 1)])
        assert time.monotonic() - started < 1.0
        store.close()


# -- deferred corrections (Redis) ----------------------------------------------------------------

def _total(redis_server: RedisServer, key: str) -> int:
    client = redis_server.client()
    try:
        return int(client.hget(f"test:{{rl}}:{key}", "t") or 0)
    finally:
        client.close()


def test_redis_deferred_corrections_ride_with_the_next_reservation(
        redis_server: RedisServer, clock: FakeClock) -> None:
    store = RedisStore(connect(redis_server.url, 1000), "test:", clock=clock,
                       reconcile_delay=3600)
    bucket = store.reserve([tokens_spec(1000, 300)]).bucket["k:tokens:minute"]
    store.adjust([Adjustment("k:tokens:minute", bucket, -100, 60, 1)])
    store.adjust([Adjustment("k:tokens:minute", bucket, -50, 60, 1)])
    assert _total(redis_server, "k:tokens:minute") == 300  # queued, nothing sent yet
    after = store.reserve([requests_spec(5, "other:requests:minute")])
    assert after.allowed
    assert _total(redis_server, "k:tokens:minute") == 150  # both applied by that round trip
    store.close()


def test_redis_deferred_corrections_are_sent_by_a_timer_when_idle(
        redis_server: RedisServer) -> None:
    store = RedisStore(connect(redis_server.url, 1000), "test:", reconcile_delay=0.05)
    bucket = store.reserve([tokens_spec(1000, 300)]).bucket["k:tokens:minute"]
    queued = time.monotonic()
    store.adjust([Adjustment("k:tokens:minute", bucket, 200, 60, 1)])
    # No reservation follows: only the timer can send it. Polled, with a deadline, because
    # the timer thread offers nothing to wait on.
    while _total(redis_server, "k:tokens:minute") != 500:
        assert time.monotonic() - queued < 5.0, "the timer never sent the correction"
        time.sleep(0.005)
    assert time.monotonic() - queued >= 0.05
    store.close()


def test_redis_close_sends_what_is_queued(redis_server: RedisServer) -> None:
    store = RedisStore(connect(redis_server.url, 1000), "test:", reconcile_delay=3600)
    bucket = store.reserve([tokens_spec(1000, 300)]).bucket["k:tokens:minute"]
    store.adjust([Adjustment("k:tokens:minute", bucket, -300, 60, 1)])
    assert _total(redis_server, "k:tokens:minute") == 300
    store.close()  # what worker exit does (registered with atexit)
    assert _total(redis_server, "k:tokens:minute") == 0


def test_redis_deferred_corrections_lost_with_redis_are_reported() -> None:
    lost: list[StoreError] = []
    with closed_port() as port:
        store = RedisStore(connect(f"redis://127.0.0.1:{port}/0", 50), reconcile_delay=3600,
                           on_lost=lost.append)
        store.adjust([Adjustment("k:requests:minute", 1, -1, 60, 1)])  # queued: no error yet
        assert lost == []
        store.flush()
        assert len(lost) == 1 and isinstance(lost[0], StoreError)
        store.flush()  # nothing left to lose
        assert len(lost) == 1
        store.adjust([Adjustment("k:requests:minute", 1, -1, 60, 1)])
        with pytest.raises(StoreError):
            store.reserve([requests_spec(1)])  # carried the correction, lost it too
        assert len(lost) == 2
        store.close()  # also releases its exit hook


def test_lost_corrections_count_as_backend_errors() -> None:
    from llmproxy.config import parse_ratelimit
    from llmproxy.ratelimit import RateLimit

    with closed_port() as port:
        settings = parse_ratelimit({"features": {"rate_limiting": {
            "enabled": True, "backend": "redis",
            "redis": {"url": f"redis://127.0.0.1:{port}/0", "timeout_ms": 50,
                      "reconcile_delay_ms": 10_000}}}}, {})
        errors: list[tuple[str, str]] = []
        limiter = RateLimit(settings, on_backend_error=lambda *args: errors.append(args))
        assert isinstance(limiter.store, RedisStore)
        limiter.store.adjust([Adjustment("k:requests:minute", 1, -1, 60, 1)])
        limiter.store.flush()
        assert errors == [("reconcile", "none")]
        limiter.store.close()


# -- pooled Redis connections -------------------------------------------------------------------

def test_redis_pool_replaces_a_connection_the_server_closed(redis_server: RedisServer) -> None:
    store = RedisStore(connect(redis_server.url, 1000), "test:")
    assert store.reserve([requests_spec(10)]).allowed  # leaves one idle pooled connection
    admin = redis_server.client()
    killed = admin.client_kill_filter(_type="normal", skipme=True)
    admin.close()
    assert killed >= 1
    # No retries are configured: only the checkout check can notice the closed connection.
    decision = store.reserve([requests_spec(10)])
    assert decision.allowed and decision.states[0].used == 2
    store.close()


def test_redis_connection_with_an_unread_reply_is_not_reused(redis_server: RedisServer) -> None:
    client = connect(redis_server.url, 1000)
    conn = client.connection_pool.get_connection()
    assert conn.can_read() is False  # idle: the cheap check answers
    conn.send_command("PING")
    conn._sock.recv(1, socket.MSG_PEEK)  # the reply has arrived
    assert conn.can_read() is True  # unread reply: redis-py's pool must not hand it out
    conn.disconnect()
    client.close()


def test_memory_store_forgets_the_least_recently_charged_past_its_cap(
        clock: FakeClock) -> None:
    evicted: list[int] = []
    store = MemoryStore(clock, max_counters=100, on_evict=evicted.append)
    for i in range(100):  # one request each: a minute and a day counter per user
        assert store.reserve([requests_spec(1, f"user:u{i}:requests:minute"),
                              tokens_spec(1000, 5, f"user:u{i}:tokens:day", 86400, 60)]).allowed
        clock.advance(0.1)
    assert len(store) == 100 and sum(evicted) == 100
    # the 50 users charged last are still counted; the first 50 are forgotten
    assert not store.reserve([requests_spec(1, "user:u99:requests:minute")]).allowed
    assert not store.reserve([requests_spec(1, "user:u50:requests:minute")]).allowed
    assert store.reserve([requests_spec(1, "user:u49:requests:minute")]).allowed
    assert sum(evicted) == 101 and len(store) == 100


def test_memory_store_keeps_a_counter_in_use(clock: FakeClock) -> None:
    """A counter charged again moves to the back: a flood of new ones pushes out others."""
    store = MemoryStore(clock, max_counters=100)
    busy = requests_spec(1000, "key:busy:requests:minute")
    charges = 0
    for i in range(500):
        clock.advance(0.05)
        if i % 50 == 0:  # fewer than max_counters other counters in between
            charges += 1
            assert store.reserve([busy]).states[0].used == charges
        assert store.reserve([requests_spec(1, f"user:u{i}:requests:minute")]).allowed
        assert len(store) <= 100
    assert store.reserve([busy]).states[0].used == charges + 1


def test_memory_store_evictions_reach_the_limiter(clock: FakeClock) -> None:
    from llmproxy.config import parse_ratelimit
    from llmproxy.ratelimit import RateLimit

    settings = parse_ratelimit({"features": {"rate_limiting": {
        "enabled": True, "memory": {"max_counters": 100}}}}, {})
    counted: list[int] = []
    limiter = RateLimit(settings, on_evicted=counted.append)
    assert isinstance(limiter.store, MemoryStore) and limiter.store.max_counters == 100
    for i in range(150):
        limiter.store.reserve([requests_spec(1, f"user:u{i}:requests:minute")])
    assert sum(counted) == 50 and len(limiter.store) == 100


def test_redis_store_loads_its_scripts_again_after_a_flush(redis_server: RedisServer,
                                                           clock: FakeClock) -> None:
    """Redis forgets scripts on a restart or SCRIPT FLUSH: the next call loads them again."""
    store = RedisStore(connect(redis_server.url, 1000), "pfx:", clock=clock)
    assert store.reserve([requests_spec(3, "key:fp_1:requests:minute")]).allowed
    client = redis_server.client()
    client.script_flush()
    client.close()
    again = store.reserve([requests_spec(3, "key:fp_1:requests:minute")])
    assert again.allowed and again.states[0].used == 2
    store.close()
