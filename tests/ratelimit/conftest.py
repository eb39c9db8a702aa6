"""Fixtures for the rate-limit tests: a real redis-server on a free port, a fake clock, and
store factories parametrized over both backends."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from llmproxy.ratelimit.memory import MemoryStore
from llmproxy.ratelimit.redis import RedisStore, connect
from llmproxy.ratelimit.store import Store

START_TIMEOUT = 10.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """A throwaway redis-server: no persistence, loopback only; can be killed and restarted."""

    def __init__(self, binary: str, workdir: Path) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5)
        deadline = time.monotonic() + START_TIMEOUT
        try:
            while True:
                try:
                    if client.ping():
                        return self
                except redis.ConnectionError:
                    pass
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"redis-server did not start on port {self.port}")
                time.sleep(0.02)  # polling another process for readiness: no event to await
        finally:
            client.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """Kill -9: what a crashed Redis looks like to the proxy."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=1, socket_connect_timeout=1)


@pytest.fixture(scope="session")
def redis_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    binary = shutil.which("redis-server")
    if binary is None:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail("redis-server is not installed (required under CI=true)")
        pytest.skip("redis-server is not installed")
    server = RedisServer(binary, tmp_path_factory.mktemp("redis")).start()
    yield server
    server.kill()


@pytest.fixture
def redis_server(redis_session: RedisServer) -> Iterator[RedisServer]:
    """The session's redis-server, running and empty (restarted if a test killed it)."""
    if not redis_session.alive():
        redis_session.start()
    client = redis_session.client()
    client.flushall()
    client.close()
    yield redis_session
    if not redis_session.alive():
        redis_session.start()


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
