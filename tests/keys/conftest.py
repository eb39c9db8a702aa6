"""Fixtures for the proxy-key tests: key stores parametrized over SQLite and PostgreSQL (the
PostgreSQL server, one per session, is in the top-level conftest)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmproxy.keys.store import KeyStore


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
