"""Fixtures for the rate-limit tests: a fake clock and store factories parametrized over both
backends (the redis-server comes from the shared ``redis_server`` fixture)."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from services import RedisServer

from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.redis import RedisStore, connect
from llmproxy.ratelimit.store import Store


class FakeClock:
    """A clock the tests move by hand (seconds, like time.monotonic)."""

    def __init__(self, start: float = 1_700_000_000.25) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


StoreFactory = Callable[[], Store]


# redis_deferred: corrections queued (a timer that never fires in a test) and carried by the
# next reservation, as a busy worker does; every store test must hold for it too.
@pytest.fixture(params=["memory", "redis", "redis_deferred"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def make_store(backend: str, clock: FakeClock,
               request: pytest.FixtureRequest) -> Iterator[StoreFactory]:
    """make_store() -> a store of the parametrized backend, driven by the fake clock."""
    made: list[Store] = []

    def factory() -> Store:
        store: Store
        if backend == "memory":
            store = MemoryStore(clock)
        else:
            server: RedisServer = request.getfixturevalue("redis_server")
            delay = 3600.0 if backend == "redis_deferred" else 0.0
            store = RedisStore(connect(server.url, 1000), "test:", clock=clock,
                               reconcile_delay=delay)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()
