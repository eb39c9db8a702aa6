"""KeyStore against real SQLite and a real PostgreSQL: one suite, both backends."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from pg_server import PostgresServer

from llmproxy.budgets.model import Budget
from llmproxy.keys import schema
from llmproxy.keys.model import KeyValidationError, hash_secret
from llmproxy.keys.store import KeyStore, KeyStoreError, UnknownKeyError, _postgres_url

StoreFactory = Callable[[], KeyStore]
T0 = datetime(2030, 1, 1, tzinfo=timezone.utc)


def _all_stored_text(store: KeyStore) -> str:
    """Every value of every table, as text: what someone reading the database would see."""
    parts = []
    with store.engine.connect() as conn:
        for table in schema.metadata.sorted_tables:
            for row in conn.execute(sa.select(table)):
                parts.extend(str(v) for v in row)
    return "\n".join(parts)


def test_migrate_is_idempotent(store: KeyStore) -> None:
    assert store.migrate() == schema.LATEST
    assert store.migrate() == schema.LATEST
    with store.engine.connect() as conn:
        versions = conn.execute(sa.select(schema.schema_version.c.version)).scalars().all()
    assert versions == [v for v, _ in schema.MIGRATIONS]


def test_concurrent_migrations_from_many_processes_apply_each_step_once(
        make_store: StoreFactory) -> None:
    stores = [make_store() for _ in range(4)]  # one pool each, like separate processes
    start = threading.Barrier(len(stores))
    results: list[Any] = []

    def run(store: KeyStore) -> None:
        start.wait()
        try:
            results.append(store.migrate())
        except Exception as exc:  # collected and asserted below
            results.append(exc)

    threads = [threading.Thread(target=run, args=(s,)) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [schema.LATEST] * len(stores)
    with stores[0].engine.connect() as conn:
        count = conn.execute(sa.select(sa.func.count()).select_from(schema.schema_version))
        assert count.scalar() == len(schema.MIGRATIONS)


def test_opening_a_new_sqlite_file_from_many_processes_at_once_waits_for_the_lock(
        tmp_path: Path) -> None:
    """Switching a new file to WAL raced: SQLite said "database is locked" without waiting.

    One round lost the race about one time in eight; 25 rounds catch it nearly always.
    """
    for round_ in range(25):
        url = f"sqlite:///{tmp_path / f'keys{round_}.db'}"
        stores = [KeyStore.from_url(url, timeout=5) for _ in range(4)]
        start = threading.Barrier(len(stores))
        errors: list[BaseException] = []

        def run(store: KeyStore, start: threading.Barrier,
                errors: list[BaseException]) -> None:
            start.wait()
            try:
                store.migrate()  # one switches to WAL while another holds the write lock
            except Exception as exc:  # collected and asserted below
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(s, start, errors)) for s in stores]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        for store in stores:
            store.close()
        assert errors == []


def test_a_newer_schema_is_refused(store: KeyStore) -> None:
    store.migrate()
    with store.engine.begin() as conn:
        conn.execute(schema.schema_version.insert().values(version=schema.LATEST + 1,
                                                           applied_at=T0))
    with pytest.raises(KeyStoreError, match="newer than this llmproxy"):
        KeyStore(store.engine).migrate()


def test_first_use_creates_the_schema(store: KeyStore) -> None:
    assert store.list() == []  # no explicit migrate(): the store migrates on first use


def test_create_returns_the_secret_once_and_stores_only_its_hash(store: KeyStore,
                                                                  tmp_path: Path) -> None:
    key, secret = store.create("ci bot", user="alice", team="ml", providers=["openai"],
                               models=["gpt-4o*"], limits={"requests_per_minute": 10},
                               expires_at=T0, metadata={"ticket": "OPS-1"})
    assert secret.startswith("llmp-") and key.prefix == secret[:12]
    assert (key.name, key.user, key.team, key.providers, key.models) == \
        ("ci bot", "alice", "ml", ("openai",), ("gpt-4o*",))
    assert key.limits == {"requests_per_minute": 10} and key.expires_at == T0
    assert key.metadata == {"ticket": "OPS-1"} and not key.revoked
    assert store.get(key.id) == key
    stored = _all_stored_text(store)
    assert secret not in stored and secret[12:] not in stored
    assert hash_secret(secret) in stored and key.prefix in stored
    for path in tmp_path.glob("keys.db*"):  # the SQLite file and its WAL, when SQLite
        assert secret.encode() not in path.read_bytes()


def test_lookup_finds_the_key_by_hash_in_one_indexed_query(store: KeyStore) -> None:
    key, secret = store.create("k")
    store.create("other")
    statements: list[str] = []
    sa.event.listen(store.engine, "before_cursor_execute",
                    lambda conn, cursor, stmt, *a: statements.append(stmt))
    assert store.lookup(hash_secret(secret)) == key
    assert len(statements) == 1 and "secret_hash" in statements[0]
    assert store.lookup(hash_secret(secret + "x")) is None
    indexed = sa.inspect(store.engine)
    unique = [c["column_names"] for c in indexed.get_unique_constraints("llmproxy_keys")]
    unique += [i["column_names"] for i in indexed.get_indexes("llmproxy_keys") if i["unique"]]
    assert ["secret_hash"] in unique


def test_a_postgres_lookup_is_one_statement_on_the_server(postgres: PostgresServer,
                                                          postgres_url: str) -> None:
    """No BEGIN before it, no ROLLBACK after it, no ping: the server sees the SELECT only."""
    store = KeyStore.from_url(postgres_url)
    key, secret = store.create("k")
    assert store.lookup(hash_secret(secret)) == key  # the pool holds a connection now
    offset = postgres.log_size()
    assert store.lookup(hash_secret(secret)) == key
    assert store.lookup(hash_secret("unknown")) is None
    statements = postgres.statements_since(offset)
    assert len(statements) == 2, statements
    assert all(s.startswith("SELECT") and "secret_hash" in s for s in statements)
    offset = postgres.log_size()
    store.touch({key.id: T0})  # a write is a transaction
    statements = [s.split()[0].upper() for s in postgres.statements_since(offset)]
    assert statements == ["BEGIN", "UPDATE", "COMMIT"]
    store.close()


def test_lookup_also_returns_revoked_and_expired_keys(store: KeyStore) -> None:
    key, secret = store.create("k", expires_at=T0)
    revoked = store.revoke(key.id)
    found = store.lookup(hash_secret(secret))
    assert found == revoked and found is not None
    assert found.revoked and not found.usable(T0 - timedelta(days=1))


def test_list_update_revoke(store: KeyStore) -> None:
    a, _ = store.create("a")
    b, _ = store.create("b", user="bob")
    assert [k.id for k in store.list()] == [a.id, b.id]
    updated = store.update(b.id, team="ops", models=["claude-*"], user=None,
                           limits={"tokens_per_day": 1000}, expires_at="2030-01-01T00:00:00Z",
                           metadata={"x": 1})
    assert (updated.team, updated.models, updated.user) == ("ops", ("claude-*",), None)
    assert updated.limits == {"tokens_per_day": 1000} and updated.expires_at == T0
    assert updated.created_at == b.created_at and updated.metadata == {"x": 1}
    assert store.get(b.id) == updated
    assert store.update(b.id, name="renamed").name == "renamed"
    revoked = store.revoke(a.id)
    assert revoked.revoked and store.revoke(a.id) == revoked  # idempotent
    assert [k.id for k in store.list(include_revoked=False)] == [b.id]
    assert len(store.list()) == 2


@pytest.mark.parametrize("key_id", ["key_0000000000000000", "nonsense", "key_' OR 1=1 --"])
def test_unknown_ids(store: KeyStore, key_id: str) -> None:
    store.create("k")
    assert store.get(key_id) is None
    with pytest.raises(UnknownKeyError):
        store.update(key_id, team="t")
    with pytest.raises(UnknownKeyError):
        store.revoke(key_id)


def test_invalid_fields_are_refused_before_the_database(store: KeyStore) -> None:
    with pytest.raises(KeyValidationError):
        store.create("k", limits={"requests_per_hour": 1})
    key, _ = store.create("k")
    with pytest.raises(KeyValidationError):
        store.update(key.id, colour="red")
    with pytest.raises(KeyValidationError):
        store.update(key.id, name="")
    assert store.get(key.id) == key


def test_touch_batches_and_never_moves_back(store: KeyStore) -> None:
    a, _ = store.create("a")
    b, _ = store.create("b")
    statements: list[str] = []
    sa.event.listen(store.engine, "before_execute",
                    lambda conn, clause, *args: statements.append(str(clause)))
    store.touch({a.id: T0, b.id: T0 + timedelta(seconds=5), "key_0000000000000000": T0})
    assert sum(s.startswith("UPDATE") for s in statements) == 1  # one executemany
    store.touch({a.id: T0 - timedelta(hours=1)})  # an older time from a slower worker
    assert store.get(a.id).last_used_at == T0  # type: ignore[union-attr]
    assert store.get(b.id).last_used_at == T0 + timedelta(seconds=5)  # type: ignore[union-attr]
    store.touch({})


def test_two_stores_share_the_database(make_store: StoreFactory) -> None:
    first, second = make_store(), make_store()
    key, secret = first.create("shared")
    assert second.lookup(hash_secret(secret)) == key
    second.revoke(key.id)
    assert first.lookup(hash_secret(secret)).revoked  # type: ignore[union-attr]


def test_ping(store: KeyStore) -> None:
    store.ping()


# ------------------------------------------------------------------- failures, no secrets


def test_unreachable_postgres_is_a_keystore_error_without_the_password() -> None:
    from services import free_port

    store = KeyStore.from_url(f"postgresql://u:hunter2-secret@127.0.0.1:{free_port()}/db",
                              timeout=2)
    for call in (store.ping, store.migrate, lambda: store.lookup("0" * 64)):
        with pytest.raises(KeyStoreError) as err:
            call()
        assert "hunter2-secret" not in str(err.value)
    store.close()


def test_wrong_password_is_refused_without_echoing_it(postgres: PostgresServer) -> None:
    url = postgres.url("postgres").replace(postgres.password, "wrong-password-123")
    store = KeyStore.from_url(url, timeout=5)
    with pytest.raises(KeyStoreError) as err:
        store.ping()
    assert "wrong-password-123" not in str(err.value)
    assert "password authentication failed" in str(err.value)
    store.close()


def test_postgres_outage_and_recovery(postgres: PostgresServer, postgres_url: str) -> None:
    store = KeyStore.from_url(postgres_url, timeout=5)
    key, secret = store.create("k")
    postgres.stop("immediate")
    try:
        with pytest.raises(KeyStoreError) as err:
            store.lookup(hash_secret(secret))
        assert postgres.password not in str(err.value)
    finally:
        postgres.start()
    assert store.lookup(hash_secret(secret)) == key  # the pool recovers by itself
    store.close()


def test_sqlite_error_is_a_keystore_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises((KeyStoreError, OSError)):
        KeyStore.from_url(f"sqlite:///{blocker}/sub/keys.db").migrate()
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(KeyStoreError):
        KeyStore.from_url(f"sqlite:///{tmp_path / 'dir.db'}").migrate()


def test_sqlite_creates_the_parent_directory(tmp_path: Path) -> None:
    store = KeyStore.from_url(f"sqlite:///{tmp_path / 'a' / 'b' / 'keys.db'}")
    store.create("k")
    assert (tmp_path / "a" / "b" / "keys.db").exists()
    store.close()


@pytest.mark.parametrize("url", ["postgresql://u:hunter2@h:notaport/db", "mysql://u:hunter2@h/db",
                                 "postgresql://u:hunter2@h/db?sslmode=sometimes",
                                 "postgresql://u:hunter2@h/db?application=x"])
def test_bad_urls_are_refused_without_the_password(url: str) -> None:
    with pytest.raises(KeyStoreError) as err:
        KeyStore.from_url(url)
    assert "hunter2" not in str(err.value)


def test_postgres_urls_use_pg8000_and_sslmode_maps_to_tls() -> None:
    from sqlalchemy.engine import make_url

    url, args = _postgres_url(make_url("postgres://u:p@h:5433/db"))
    assert url.drivername == "postgresql+pg8000" and url.port == 5433
    assert args == {"ssl_context": False}  # plain: never pg8000's TLS attempt per connection
    _, args = _postgres_url(make_url("postgresql://u:p@h/db?sslmode=require"))
    context = args["ssl_context"]
    assert context.verify_mode == ssl.CERT_NONE and not context.check_hostname
    _, args = _postgres_url(make_url("postgresql://u:p@h/db?sslmode=verify-full"))
    assert args["ssl_context"].verify_mode == ssl.CERT_REQUIRED
    assert args["ssl_context"].check_hostname
    _, args = _postgres_url(make_url("postgresql://u:p@h/db?sslmode=prefer"))
    assert args == {"ssl_context": None}


def test_tls_required_against_a_server_without_tls_fails_cleanly(postgres: PostgresServer,
                                                                   postgres_url: str) -> None:
    store = KeyStore.from_url(postgres_url + "?sslmode=require", timeout=5)
    with pytest.raises(KeyStoreError, match="SSL"):
        store.ping()
    store.close()


class _CountingLock:
    """A lock that tells (through ``waiters``) each time someone starts a blocking acquire."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.waiters = threading.Semaphore(0)

    def acquire(self, blocking: bool = True, timeout: float = -1) -> bool:
        if blocking:
            self.waiters.release()
        return self._lock.acquire(blocking, timeout)

    def release(self) -> None:
        self._lock.release()

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def test_callers_waiting_on_a_failing_migration_share_its_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the database is down, one attempt at a time: the others get its error."""
    store = KeyStore.from_url(f"sqlite:///{tmp_path / 'keys.db'}")
    lock = _CountingLock()
    store._migrate_lock = lock  # type: ignore[assignment]
    entered, release = threading.Event(), threading.Event()
    attempts: list[int] = []

    def failing_migration() -> int:
        attempts.append(1)
        entered.set()
        release.wait(10)
        raise KeyStoreError("key database error (OperationalError: down)")

    monkeypatch.setattr(store, "_apply_migrations", failing_migration)
    errors: list[str] = []

    def lookup() -> None:
        try:
            store.lookup("0" * 64)
        except KeyStoreError as exc:
            errors.append(str(exc))

    first = threading.Thread(target=lookup)
    first.start()
    assert entered.wait(10)  # the first caller is inside the migration
    others = [threading.Thread(target=lookup) for _ in range(5)]
    for t in others:
        t.start()
    for _ in others:  # every other caller is waiting for the first one's outcome
        assert lock.waiters.acquire(timeout=10)
    release.set()
    for t in [first, *others]:
        t.join(10)
    assert len(attempts) == 1
    assert errors == ["key database error (OperationalError: down)"] * 6
    monkeypatch.undo()
    assert store.lookup("0" * 64) is None  # the next call tries again, and succeeds
    store.close()


# ------------------------------------------------------------------------ schema version 2


def test_a_version_1_database_with_a_key_migrates_to_version_2(
        store: KeyStore, monkeypatch: pytest.MonkeyPatch) -> None:
    with monkeypatch.context() as m:  # this code, as it was at version 1
        m.setattr(schema, "MIGRATIONS", schema.MIGRATIONS[:1])
        m.setattr(schema, "LATEST", 1)
        assert KeyStore(store.engine).migrate() == 1
    columns = {c["name"] for c in sa.inspect(store.engine).get_columns("llmproxy_keys")}
    assert "budgets" not in columns
    secret = "llmp-" + "v1" * 20
    with store.engine.begin() as conn:
        conn.execute(schema._proxy_keys_v1.insert().values(
            id="key_00000000000000a1", secret_hash=hash_secret(secret), prefix=secret[:12],
            name="old", user_name="alice", team_name=None, providers=["openai"], models=[],
            limits={"requests_per_minute": 3}, expires_at=None, revoked=False, created_at=T0,
            updated_at=T0, last_used_at=None, meta={"m": 1}))

    assert store.migrate() == 2
    key = store.lookup(hash_secret(secret))
    assert key is not None and (key.id, key.name, key.user, key.providers, key.limits,
                                key.metadata, key.budgets) == (
        "key_00000000000000a1", "old", "alice", ("openai",), {"requests_per_minute": 3},
        {"m": 1}, None)
    inspector = sa.inspect(store.engine)
    assert {"llmproxy_budgets", "llmproxy_spend"} <= set(inspector.get_table_names())
    indexes = {tuple(i["column_names"]) for i in inspector.get_indexes("llmproxy_spend")}
    assert {("key_id", "day"), ("user_name", "day"), ("team_name", "day")} <= indexes
    assert store.update(key.id, budgets={"day": 2.5}).budgets == Budget(day=2.5)
    assert store.get(key.id).budgets == Budget(day=2.5)  # type: ignore[union-attr]


def test_a_key_keeps_its_budgets(store: KeyStore) -> None:
    key, secret = store.create("k", budgets={"day": 1, "total": 100.5})
    assert key.budgets == Budget(day=1.0, total=100.5)
    assert store.lookup(hash_secret(secret)) == key
    assert key.public()["budgets"] == {"day": 1.0, "month": None, "total": 100.5}
    assert store.update(key.id, budgets=Budget(month=7)).budgets == Budget(month=7)
    assert store.update(key.id, budgets=None).budgets is None
    assert store.update(key.id, budgets={"day": None}).budgets is None  # no limit: none
    with pytest.raises(KeyValidationError) as err:
        store.update(key.id, budgets={"day": -1})
    assert err.value.field == "budgets.day"
    with pytest.raises(KeyValidationError) as err:
        store.create("k", budgets={"week": 1})
    assert err.value.field == "budgets.week"
