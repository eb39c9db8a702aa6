"""The worker's key cache: TTLs, negative entries, single-flight, the lookup budget, outages."""

from __future__ import annotations

import threading
from datetime import datetime

import pytest

from llmproxy.keys.cache import KeyCache, KeyLookupUnavailable
from llmproxy.keys.model import ProxyKey, generate_secret, hash_secret


class Down(Exception):
    """The fake store's outage."""


class FakeStore:
    """A key table by secret hash; counts lookups; can be taken down or made to block."""

    def __init__(self) -> None:
        self.keys: dict[str, ProxyKey] = {}
        self.lookups: list[str] = []
        self.down = False
        self.gate: threading.Event | None = None  # lookups wait for it when set
        self.entered = threading.Event()
        self.touched: list[dict[str, datetime]] = []

    def add(self, key_id: str = "key_0000000000000001", **fields: object) -> tuple[str, ProxyKey]:
        secret = generate_secret()
        key = ProxyKey(id=key_id, prefix=secret[:12], name="test", **fields)  # type: ignore[arg-type]
        self.keys[hash_secret(secret)] = key
        return secret, key

    def lookup(self, secret_hash: str) -> ProxyKey | None:
        self.lookups.append(secret_hash)
        self.entered.set()
        if self.gate is not None:
            assert self.gate.wait(5), "the test never opened the gate"
        if self.down:
            raise Down("connection refused")
        return self.keys.get(secret_hash)

    def touch(self, used: dict[str, datetime]) -> None:
        if self.down:
            raise Down("connection refused")
        self.touched.append(dict(used))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def store() -> FakeStore:
    return FakeStore()


@pytest.fixture
def clock() -> Clock:
    return Clock()


def make_cache(store: FakeStore, clock: Clock, ttl: float = 5.0, **kwargs: object) -> KeyCache:
    return KeyCache(store, ttl, store_errors=(Down,), clock=clock, **kwargs)  # type: ignore[arg-type]


def test_a_cached_key_is_not_looked_up_again_until_its_ttl_ends(store: FakeStore,
                                                                 clock: Clock) -> None:
    secret, key = store.add()
    cache = make_cache(store, clock, ttl=5.0)
    assert cache.get(secret) == key
    clock.now += 3.9  # before the refresh-ahead point (80 % of the TTL)
    assert cache.get(secret) == key
    assert len(store.lookups) == 1
    clock.now += 1.2  # past the TTL: the store is asked again and sees the revocation
    store.keys[hash_secret(secret)] = ProxyKey(id=key.id, prefix=key.prefix, name="test",
                                               revoked=True)
    assert cache.get(secret).revoked  # type: ignore[union-attr]
    assert len(store.lookups) == 2


def test_a_key_in_use_is_refreshed_in_the_background(store: FakeStore, clock: Clock) -> None:
    secret, key = store.add()
    cache = make_cache(store, clock, ttl=5.0)
    assert cache.get(secret) == key
    store.gate = threading.Event()  # the store now hangs until the test lets it answer
    store.entered.clear()
    clock.now += 4.2
    assert cache.get(secret) == key  # answered from the cache while the refresh waits
    assert store.entered.wait(5)
    revoked = ProxyKey(id=key.id, prefix=key.prefix, name="test", revoked=True)
    store.keys[hash_secret(secret)] = revoked
    clock.now += 1.0  # stale now, its refresh still hanging: the cached key stands
    assert cache.get(secret) == key
    refresh = cache._flights[hash_secret(secret)]  # noqa: SLF001 - to await its end
    store.gate.set()
    assert refresh.done.wait(5)
    assert cache.get(secret) == revoked
    assert len(store.lookups) == 2


def test_lookups_use_the_hash_never_the_secret(store: FakeStore, clock: Clock) -> None:
    secret, _ = store.add()
    make_cache(store, clock).get(secret)
    assert store.lookups == [hash_secret(secret)]


def test_unknown_secrets_are_remembered_briefly(store: FakeStore, clock: Clock) -> None:
    cache = make_cache(store, clock, ttl=5.0, negative_ttl=2.0)
    unknown = generate_secret()
    for _ in range(50):
        assert cache.get(unknown) is None
    assert len(store.lookups) == 1
    clock.now += 2.1
    assert cache.get(unknown) is None
    assert len(store.lookups) == 2


def test_a_key_created_after_a_miss_works_once_the_miss_is_forgotten(store: FakeStore,
                                                                     clock: Clock) -> None:
    cache = make_cache(store, clock, negative_ttl=1.0)
    secret = generate_secret()
    assert cache.get(secret) is None
    store.keys[hash_secret(secret)] = ProxyKey(id="key_00000000000000aa", prefix="p", name="n")
    clock.now += 1.01
    assert cache.get(secret) is not None


def test_the_negative_table_is_bounded(store: FakeStore, clock: Clock) -> None:
    cache = make_cache(store, clock, max_negative=100, lookups_per_second=1e9)
    secrets = [generate_secret() for _ in range(300)]
    for secret in secrets:
        assert cache.get(secret) is None
    assert len(cache._unknown) == 100  # noqa: SLF001 - the bound is the point of the test
    # The newest are the ones kept.
    assert cache.get(secrets[-1]) is None
    assert len(store.lookups) == 300


def test_a_flood_of_random_keys_is_held_to_the_lookup_budget(store: FakeStore,
                                                             clock: Clock) -> None:
    known, key = store.add()
    cache = make_cache(store, clock, lookups_per_second=50.0)
    assert cache.get(known) == key
    unavailable = 0
    for _ in range(1000):
        try:
            cache.get(generate_secret())
        except KeyLookupUnavailable as exc:
            assert exc.reason == "throttled"
            unavailable += 1
    assert len(store.lookups) <= 50
    assert unavailable >= 950
    assert cache.get(known) == key  # a cached key is not held up by the flood
    clock.now += 1.0  # the budget refills with time
    assert cache.get(generate_secret()) is None


def test_concurrent_misses_for_one_key_make_one_query(store: FakeStore, clock: Clock) -> None:
    secret, key = store.add()
    store.gate = threading.Event()
    cache = make_cache(store, clock)
    results: list[ProxyKey | None] = []
    threads = [threading.Thread(target=lambda: results.append(cache.get(secret)))
               for _ in range(20)]
    threads[0].start()
    assert store.entered.wait(5)
    for t in threads[1:]:
        t.start()
    # Every other caller is now waiting for the first one's query (or about to).
    store.gate.set()
    for t in threads:
        t.join(5)
    assert results == [key] * 20
    assert len(store.lookups) == 1


def test_an_outage_keeps_cached_keys_and_answers_unknown_ones_unavailable(
        store: FakeStore, clock: Clock) -> None:
    secret, key = store.add()
    cache = make_cache(store, clock, ttl=5.0, retry_after=1.0)
    assert cache.get(secret) == key
    store.down = True
    clock.now += 60  # long stale: still served while the store cannot answer
    assert cache.get(secret) == key
    with pytest.raises(KeyLookupUnavailable) as err:
        cache.get(generate_secret())
    assert err.value.reason == "store_down"
    # Within retry_after the store is not asked again, for any secret.
    asked = len(store.lookups)
    for _ in range(10):
        assert cache.get(secret) == key
        with pytest.raises(KeyLookupUnavailable):
            cache.get(generate_secret())
    assert len(store.lookups) == asked
    # Back up: the next lookup after retry_after refreshes the key.
    store.down = False
    clock.now += 1.5
    assert cache.get(secret) == key
    assert len(store.lookups) == asked + 1


def test_waiters_of_a_failed_lookup_get_unavailable(store: FakeStore, clock: Clock) -> None:
    store.gate = threading.Event()
    store.down = True
    cache = make_cache(store, clock)
    secret = generate_secret()
    errors: list[str] = []

    def get() -> None:
        try:
            cache.get(secret)
        except KeyLookupUnavailable as exc:
            errors.append(exc.reason)

    threads = [threading.Thread(target=get) for _ in range(5)]
    threads[0].start()
    assert store.entered.wait(5)
    for t in threads[1:]:
        t.start()
    store.gate.set()
    for t in threads:
        t.join(5)
    assert errors == ["store_down"] * 5
    assert len(store.lookups) == 1


def test_last_used_times_are_written_in_batches(store: FakeStore, clock: Clock) -> None:
    _, key = store.add()
    cache = make_cache(store, clock, touch_interval=30.0)
    for _ in range(100):
        cache.note_used(key.id)
    assert store.touched == []  # nothing written on the request path before the interval
    cache.flush_used()
    assert len(store.touched) == 1 and list(store.touched[0]) == [key.id]
    store.down = True
    cache.note_used(key.id)
    cache.flush_used()  # fails: the time is kept for the next batch
    store.down = False
    cache.flush_used()
    assert len(store.touched) == 2 and list(store.touched[1]) == [key.id]


def test_a_due_batch_is_written_by_a_background_thread(store: FakeStore, clock: Clock) -> None:
    _, key = store.add()
    cache = make_cache(store, clock, touch_interval=30.0)
    clock.now += 31
    written = threading.Event()
    original = store.touch

    def touch(used: dict[str, datetime]) -> None:
        original(used)
        written.set()

    store.touch = touch  # type: ignore[method-assign]
    cache.note_used(key.id)
    assert written.wait(5)
    assert list(store.touched[0]) == [key.id]
