"""Fixtures for the proxy-key tests: a real PostgreSQL server started for the session, and key
stores parametrized over SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from conftest import in_ci
from pg_server import PostgresServer, find_binary

from llmproxy.keys.store import KeyStore


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # `-m "not postgres"` deselects every test that starts the server
        callspec = getattr(item, "callspec", None)
        backend = callspec.params.get("database_url") if callspec is not None else None
        if "postgres_session" in getattr(item, "fixturenames", ()) or backend == "postgresql":
            item.add_marker(pytest.mark.postgres)


@pytest.fixture(scope="session")
def postgres_session() -> Iterator[PostgresServer]:
    """A PostgreSQL server of our own; skipped without initdb/pg_ctl (fails under CI=true)."""
    initdb, pg_ctl = find_binary("initdb"), find_binary("pg_ctl")
    if initdb is None or pg_ctl is None:
        message = "PostgreSQL (initdb, pg_ctl) is not installed"
        if in_ci():
            pytest.fail(f"{message} (required under CI=true)")
        pytest.skip(message)
    server = PostgresServer(initdb, pg_ctl).start()
    yield server
    server.remove()


@pytest.fixture
def postgres(postgres_session: PostgresServer) -> Iterator[PostgresServer]:
    """The session's PostgreSQL, running (restarted if a test stopped it)."""
    if not postgres_session.alive():
        postgres_session.start()
    yield postgres_session
    if not postgres_session.alive():
        postgres_session.start()


@pytest.fixture
def postgres_url(postgres: PostgresServer) -> Iterator[str]:
    """A fresh, empty database of the session's server, dropped afterwards."""
    name = postgres.create_database()
    yield postgres.url(name)
    if postgres.alive():
        postgres.drop_database(name)


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty database of each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'keys.db'}"
    return str(request.getfixturevalue("postgres_url"))


StoreFactory = Callable[[], KeyStore]


@pytest.fixture
def make_store(database_url: str) -> Iterator[StoreFactory]:
    """make_store() -> a new KeyStore (own connection pool) on the test's database."""
    made: list[KeyStore] = []

    def factory() -> KeyStore:
        store = KeyStore.from_url(database_url, timeout=5)
        made.append(store)
        return store

    yield factory
    for store in made:
        store.close()


@pytest.fixture
def store(make_store: StoreFactory) -> KeyStore:
    return make_store()
