"""The key database: SQLite by default, PostgreSQL for several hosts (SQLAlchemy Core).

PostgreSQL is reached through pg8000, a pure-Python driver: its sockets are Python sockets,
so under gevent's monkey-patching a slow query yields to the worker's other greenlets instead
of blocking the whole worker as a C driver would. SQLite calls block, but they are local,
indexed and short (WAL mode: readers never wait for a writer).

Every database failure surfaces as :class:`KeyStoreError`, whose message never holds the
URL's password, a statement's parameters or a secret.
"""

from __future__ import annotations

import builtins
import logging
import sqlite3
import ssl
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import date, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.pool import StaticPool

from ..budgets.model import Budget, SpendRow, budget_from_json, to_usd
from ..config import PG_SSLMODES
from . import schema
from .model import (
    ProxyKey,
    display_prefix,
    generate_secret,
    hash_secret,
    is_key_id,
    new_key_id,
    parse_scope,
    utcnow,
    validate_fields,
)

log = logging.getLogger("llmproxy.keys")

#: Seconds a connection attempt, a query or a wait for a pooled connection may take.
DEFAULT_TIMEOUT = 10.0
SQLITE_BUSY_MS = 5000  # how long a writer waits for another process's write lock
# Any constant shared by every llmproxy process: the migration lock's id in PostgreSQL.
_PG_MIGRATION_LOCK = 0x6C6C6D70  # "llmp"


class KeyStoreError(Exception):
    """The key database failed or is unreachable; the message is safe to log and show."""


class UnknownKeyError(LookupError):
    """No key has this id."""

    def __init__(self, key_id: str) -> None:
        super().__init__(f"no key with id {key_id!r}")
        self.key_id = key_id


def _reason(exc: BaseException, password: str | None) -> str:
    """One short line about ``exc``: the driver's message, never the password."""
    orig = exc.orig if isinstance(exc, DBAPIError) else None
    if orig is not None:
        first = orig.args[0] if orig.args else None
        # pg8000 puts the server's fields in a dict: M is the message
        text = str(first.get("M", first)) if isinstance(first, dict) else str(orig)
        name = type(orig).__name__
    else:
        text, name = str(exc), type(exc).__name__
    text = text.splitlines()[0] if text else ""
    if password:
        text = text.replace(password, "***")
    return f"{name}: {text[:200]}" if text else name


def _postgres_url(url: URL) -> tuple[URL, dict[str, Any]]:
    """``url`` for pg8000, and its connect arguments (TLS from libpq's ``sslmode``).

    Without ``sslmode`` the connection is plain (``disable``): pg8000's own default tries TLS
    first and builds a new TLS context, loading every CA certificate, for each connection,
    which stalls a gevent worker for a good part of a second each time its pool grows. The
    contexts made here are made once per store.
    """
    query = dict(url.query)
    mode = query.pop("sslmode", "disable")
    if not isinstance(mode, str) or mode not in PG_SSLMODES:
        raise KeyStoreError(f"sslmode must be one of {', '.join(PG_SSLMODES)}")
    if query:
        raise KeyStoreError(f"unsupported database URL parameters: {', '.join(sorted(query))}")
    context: ssl.SSLContext | bool | None
    if mode == "disable":
        context = False
    elif mode in ("allow", "prefer"):
        context = None  # pg8000: TLS if the server offers it, unverified, else plain
    else:
        context = ssl.create_default_context()
        if mode != "verify-full":
            context.check_hostname = False
        if mode == "require":  # libpq's meaning: encrypted, certificate not checked
            context.verify_mode = ssl.CERT_NONE
    return url.set(drivername="postgresql+pg8000", query={}), {"ssl_context": context}


def _sqlite_engine(url: URL, timeout: float) -> Engine:
    database = url.database or ""
    memory = database in ("", ":memory:")
    if not memory:
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)
    engine = sa.create_engine(
        url, hide_parameters=True,
        connect_args={"timeout": SQLITE_BUSY_MS / 1000, "check_same_thread": False},
        # one in-memory database is one connection: share it
        **({"poolclass": StaticPool} if memory else {"pool_timeout": timeout}))

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Transactions are begun by _on_begin below: the sqlite3 module's own BEGIN comes
        # late and never before DDL, which would leave the migration unprotected.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        try:
            cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_MS}")
            if not memory:
                _switch_to_wal(cursor)
        finally:
            cursor.close()

    # A writer takes the write lock at BEGIN: two writers then queue on busy_timeout
    # instead of one failing when it upgrades a read lock.
    _begin_writes_only(engine, "BEGIN IMMEDIATE")
    return engine


def _switch_to_wal(cursor: Any) -> None:
    """``PRAGMA journal_mode=WAL``, retried while another process holds the database.

    The switch needs an exclusive lock, taken after a shared one: when several processes
    open a new file at once, SQLite answers "database is locked" at once instead of waiting
    out busy_timeout (waiting could deadlock two readers that both want to upgrade). So
    the wait is done here, with a short backoff, for up to SQLITE_BUSY_MS.
    """
    deadline = time.monotonic() + SQLITE_BUSY_MS / 1000
    pause = 0.005
    while True:
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(pause)  # cooperative under gevent's monkey-patching
        pause = min(pause * 2, 0.1)


def _begin_writes_only(engine: Engine, begin: str) -> None:
    """Open a transaction for writes only; a read is one statement, atomic by itself.

    The connections are in autocommit mode, so a read costs one round trip: no BEGIN before
    it, no ROLLBACK when its connection goes back to the pool.
    """

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        if conn.get_execution_options().get("llmproxy_write", False):
            conn.exec_driver_sql(begin)


def _row_to_key(row: sa.Row[Any]) -> ProxyKey:
    m = row._mapping
    return ProxyKey(
        id=m["id"], prefix=m["prefix"], name=m["name"], user=m["user_name"],
        team=m["team_name"], providers=tuple(m["providers"] or ()),
        models=tuple(m["models"] or ()), limits=dict(m["limits"] or {}),
        expires_at=m["expires_at"], revoked=bool(m["revoked"]), created_at=m["created_at"],
        last_used_at=m["last_used_at"], metadata=dict(m["meta"] or {}),
        budgets=budget_from_json(m["budgets"]),
    )


#: ProxyKey field -> column, for the fields a caller may set.
_COLUMNS = {"name": "name", "user": "user_name", "team": "team_name", "providers": "providers",
            "models": "models", "limits": "limits", "expires_at": "expires_at",
            "metadata": "meta", "budgets": "budgets"}


def _values(fields: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in fields.items():
        if name in ("providers", "models"):
            value = list(value)
        elif name == "budgets":
            value = None if value is None else value.public()
        out[_COLUMNS[name]] = value
    return out


#: What spend_rows groups by.
SPEND_GROUPS = ("key", "user", "team", "model", "provider")
#: Scope kind -> ledger column.
_SPEND_SCOPES = {"key": "key_id", "user": "user_name", "team": "team_name"}
_SPEND_KEY = ("day", "key_id", "user_name", "team_name", "model", "provider")  # as identity
_SPEND_SUMS = ("cost_nanos", "requests", "input_tokens", "output_tokens")


def _spend_kind(kind: str) -> str:
    if kind not in _SPEND_SCOPES:
        raise ValueError(f"kind must be one of {', '.join(_SPEND_SCOPES)}")
    return kind


def _row_to_budget(row: sa.Row[Any]) -> Budget:
    m = row._mapping
    return Budget(day=m["day_usd"], month=m["month_usd"], total=m["total_usd"])


class KeyStore:
    """Proxy keys in a SQL database; one per process (the engine holds a connection pool)."""

    def __init__(self, engine: Engine, password: str | None = None) -> None:
        self.engine = engine
        self._password = password
        self._migrated = False
        self._schema_error: str | None = None
        self._migrate_lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, *, timeout: float = DEFAULT_TIMEOUT,
                 pool_size: int = 5) -> KeyStore:
        """A store for ``sqlite:///path`` or ``postgresql://user:pass@host:port/db``.

        Nothing is connected yet: the first query (or :meth:`migrate`) does.
        """
        try:
            parsed = make_url(url)
        except (ArgumentError, ValueError):
            raise KeyStoreError("invalid database URL") from None  # it may hold a password
        backend = parsed.get_backend_name()
        if backend == "sqlite":
            engine = _sqlite_engine(parsed, timeout)
        elif backend in ("postgresql", "postgres"):
            pg_url, connect_args = _postgres_url(parsed)
            # No pool_pre_ping (a round trip per checkout): a read on a connection that died
            # with a database restart is retried once instead (see _select).
            engine = sa.create_engine(
                pg_url, hide_parameters=True, isolation_level="AUTOCOMMIT",
                pool_size=pool_size, max_overflow=pool_size, pool_timeout=timeout,
                connect_args={"timeout": timeout, **connect_args})
            _begin_writes_only(engine, "BEGIN")
        else:
            raise KeyStoreError("database URL must start with sqlite:/// or postgresql://")
        return cls(engine, parsed.password)

    @property
    def backend(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return str(self.engine.dialect.name)

    @property
    def url(self) -> str:
        """The database URL without its password, for messages."""
        return self.engine.url.render_as_string(hide_password=True)

    # -- plumbing --------------------------------------------------------------------------

    @contextmanager
    def _errors(self) -> Iterator[None]:
        try:
            yield
        except SQLAlchemyError as exc:
            raise KeyStoreError(f"key database error ({_reason(exc, self._password)})") \
                from exc

    def _select(self, query: sa.Select[Any]) -> builtins.list[sa.Row[Any]]:
        """The rows of one read-only query; retried once on a connection found dead."""
        self._ensure_schema()
        with self._errors():
            try:
                with self.engine.connect() as conn:
                    return builtins.list(conn.execute(query))
            except DBAPIError as exc:
                if not exc.connection_invalidated:
                    raise
            # The pool was emptied on seeing the dead connection: this one is new.
            with self.engine.connect() as conn:
                return builtins.list(conn.execute(query))

    @contextmanager
    def _write(self) -> Iterator[Connection]:
        self._ensure_schema()
        with self._errors(), self.engine.connect() as conn:
            conn = conn.execution_options(llmproxy_write=True)
            with conn.begin():
                yield conn

    def _ensure_schema(self) -> None:
        if self._migrated:
            return
        if self._migrate_lock.acquire(blocking=False):
            try:
                self._migrate()
            finally:
                self._migrate_lock.release()
            return
        # Another greenlet is migrating: share its outcome instead of queueing one more
        # attempt behind it (each could wait out the timeout while the database is down).
        with self._migrate_lock:
            pass
        if not self._migrated:
            raise KeyStoreError(self._schema_error or "key database schema not ready")

    # -- schema ----------------------------------------------------------------------------

    def migrate(self) -> int:
        """Create or upgrade the tables; idempotent and safe to run from many processes.

        Returns the schema version. Refuses a database newer than this code.
        """
        with self._migrate_lock:
            return self._migrate()

    def _migrate(self) -> int:
        try:
            version = self._apply_migrations()
        except KeyStoreError as exc:
            self._schema_error = str(exc)
            raise
        self._migrated = True
        return version

    def _apply_migrations(self) -> int:
        with self._errors(), self.engine.connect() as conn:
            conn = conn.execution_options(llmproxy_write=True)
            with conn.begin():
                if self.backend == "postgresql":
                    # held to the end of the transaction: one migrating process at a time
                    conn.execute(sa.select(sa.func.pg_advisory_xact_lock(_PG_MIGRATION_LOCK)))
                schema.schema_version.create(conn, checkfirst=True)
                current = conn.execute(
                    sa.select(sa.func.max(schema.schema_version.c.version))).scalar() or 0
                if current > schema.LATEST:
                    raise KeyStoreError(f"the key database has schema version {current}, newer "
                                        f"than this llmproxy knows ({schema.LATEST})")
                for version, step in schema.MIGRATIONS:
                    if version > current:
                        step(conn)
                        conn.execute(schema.schema_version.insert().values(
                            version=version, applied_at=utcnow()))
                        log.info("key database migrated to schema version %d", version)
            return max(current, schema.LATEST)

    # -- keys ------------------------------------------------------------------------------

    def create(self, name: str, user: str | None = None, team: str | None = None,
               providers: tuple[str, ...] | builtins.list[str] = (),
               models: tuple[str, ...] | builtins.list[str] = (),
               limits: Mapping[str, int] | None = None, expires_at: datetime | None = None,
               metadata: Mapping[str, Any] | None = None,
               budgets: Budget | Mapping[str, Any] | None = None) -> tuple[ProxyKey, str]:
        """A new key and its secret: the only time the secret is available."""
        fields = validate_fields({"name": name, "user": user, "team": team,
                                  "providers": providers, "models": models,
                                  "limits": limits, "expires_at": expires_at,
                                  "metadata": metadata, "budgets": budgets})
        secret = generate_secret()
        now = utcnow()
        key = ProxyKey(id=new_key_id(), prefix=display_prefix(secret), created_at=now,
                       **fields)
        with self._write() as conn:
            conn.execute(schema.proxy_keys.insert().values(
                id=key.id, secret_hash=hash_secret(secret), prefix=key.prefix,
                revoked=False, created_at=now, updated_at=now, last_used_at=None,
                **_values(fields)))
        return key, secret

    def get(self, key_id: str) -> ProxyKey | None:
        if not is_key_id(key_id):
            return None
        t = schema.proxy_keys
        rows = self._select(sa.select(t).where(t.c.id == key_id))
        return _row_to_key(rows[0]) if rows else None

    def list(self, *, include_revoked: bool = True) -> builtins.list[ProxyKey]:
        """Every key, oldest first."""
        t = schema.proxy_keys
        query = sa.select(t).order_by(t.c.created_at, t.c.id)
        if not include_revoked:
            query = query.where(t.c.revoked == sa.false())
        return [_row_to_key(row) for row in self._select(query)]

    def update(self, key_id: str, **fields: Any) -> ProxyKey:
        """Change the given fields (any of model.FIELDS); raises UnknownKeyError."""
        values = _values(validate_fields(fields, partial=True))
        t = schema.proxy_keys
        if not is_key_id(key_id):
            raise UnknownKeyError(key_id)
        with self._write() as conn:
            done = conn.execute(t.update().where(t.c.id == key_id)
                                .values(updated_at=utcnow(), **values))
            if done.rowcount != 1:
                raise UnknownKeyError(key_id)
            row = conn.execute(sa.select(t).where(t.c.id == key_id)).one()
        return _row_to_key(row)

    def revoke(self, key_id: str) -> ProxyKey:
        """Revoke for good (idempotent); raises UnknownKeyError."""
        t = schema.proxy_keys
        if not is_key_id(key_id):
            raise UnknownKeyError(key_id)
        with self._write() as conn:
            conn.execute(t.update().where(t.c.id == key_id, t.c.revoked == sa.false())
                         .values(revoked=True, updated_at=utcnow()))
            row = conn.execute(sa.select(t).where(t.c.id == key_id)).first()
        if row is None:
            raise UnknownKeyError(key_id)
        return _row_to_key(row)

    def lookup(self, secret_hash: str) -> ProxyKey | None:
        """The key whose secret hashes to ``secret_hash`` (revoked or expired too): one query."""
        t = schema.proxy_keys
        rows = self._select(sa.select(t).where(t.c.secret_hash == secret_hash))
        return _row_to_key(rows[0]) if rows else None

    def touch(self, used: Mapping[str, datetime]) -> None:
        """Record last-used times (key id -> time), in one transaction; never moves back."""
        if not used:
            return
        t = schema.proxy_keys
        stmt = (t.update()
                .where(t.c.id == sa.bindparam("key_id"),
                       sa.or_(t.c.last_used_at.is_(None),
                              t.c.last_used_at < sa.bindparam("used_at", type_=schema.UTCDateTime)))
                .values(last_used_at=sa.bindparam("used_at", type_=schema.UTCDateTime)))
        with self._write() as conn:
            conn.execute(stmt, [{"key_id": k, "used_at": when} for k, when in used.items()])

    # -- budgets ---------------------------------------------------------------------------

    def _upsert(self, table: sa.Table) -> Any:
        """``INSERT`` of ``table`` in this backend's dialect, with ``on_conflict_do_update``."""
        if self.backend == "postgresql":
            return postgresql.insert(table)
        return sqlite.insert(table)

    def set_budget(self, kind: str, name: str, budget: Budget | None) -> None:
        """Set the budget of ``user``/``team`` ``name``; ``None`` (or no limit) deletes it."""
        kind, name = parse_scope(f"{kind}:{name}")
        t = schema.budgets
        with self._write() as conn:
            if budget is None or budget.is_empty():
                conn.execute(t.delete().where(t.c.scope_kind == kind, t.c.scope_name == name))
                return
            values = {"day_usd": budget.day, "month_usd": budget.month,
                      "total_usd": budget.total, "updated_at": utcnow()}
            stmt = self._upsert(t).values(scope_kind=kind, scope_name=name, **values)
            conn.execute(stmt.on_conflict_do_update(
                index_elements=[t.c.scope_kind, t.c.scope_name], set_=values))

    def get_budget(self, kind: str, name: str) -> Budget | None:
        """The budget of ``user``/``team`` ``name``, or None."""
        t = schema.budgets
        rows = self._select(sa.select(t).where(t.c.scope_kind == kind, t.c.scope_name == name))
        return _row_to_budget(rows[0]) if rows else None

    def budgets(self) -> dict[tuple[str, str], Budget]:
        """Every user and team budget, by ``(kind, name)``: one query, for a worker's cache."""
        t = schema.budgets
        rows = self._select(sa.select(t).order_by(t.c.scope_kind, t.c.scope_name))
        return {(r.scope_kind, r.scope_name): _row_to_budget(r) for r in rows}

    # -- the spend ledger --------------------------------------------------------------------

    def add_spend(self, rows: Sequence[SpendRow]) -> None:
        """Add ``rows`` to the ledger in one transaction, summed into existing rows.

        Safe while other processes add to the same rows: the database adds under its row
        lock (ON CONFLICT DO UPDATE), so no increment is lost.
        """
        merged: dict[tuple[date, str, str, str, str, str], list[int]] = {}
        for row in rows:
            sums = merged.setdefault(row.identity, [0, 0, 0, 0])
            for i, value in enumerate((row.cost_nanos, row.requests, row.input_tokens,
                                       row.output_tokens)):
                sums[i] += value
        if not merged:
            return
        t = schema.spend
        # Rows in one order in every process: two batches sharing rows then lock them in
        # the same order and cannot deadlock (PostgreSQL).
        params = [dict(zip(_SPEND_KEY, identity, strict=True))
                  | dict(zip(_SPEND_SUMS, sums, strict=True))
                  for identity, sums in sorted(merged.items())]
        stmt = self._upsert(t)
        stmt = stmt.on_conflict_do_update(
            index_elements=[t.c[name] for name in _SPEND_KEY],
            set_={name: t.c[name] + stmt.excluded[name] for name in _SPEND_SUMS})
        with self._write() as conn:
            conn.execute(stmt, params)

    def spent(self, kind: str, name: str, since: date | None) -> int:
        """Nano-dollars spent by key/user/team ``name`` on UTC days >= ``since`` (None: ever).

        One query on the index of that kind (a budget counter rebuilt after a restart).
        """
        t = schema.spend
        column = t.c[_SPEND_SCOPES[_spend_kind(kind)]]
        query = sa.select(sa.func.coalesce(sa.func.sum(t.c.cost_nanos), 0)).where(column == name)
        if since is not None:
            query = query.where(t.c.day >= since)
        return int(self._select(query)[0][0])

    def spend_summary(self, kind: str, name: str, today: date) -> dict[str, int]:
        """Nano-dollars spent by ``name`` on ``today``, in its month up to it, and ever: one
        query (conditional sums over the scope's rows)."""
        t = schema.spend
        column = t.c[_SPEND_SCOPES[_spend_kind(kind)]]

        def between(first: date) -> Any:
            return sa.func.coalesce(sa.func.sum(sa.case(
                (sa.and_(t.c.day >= first, t.c.day <= today), t.c.cost_nanos), else_=0)), 0)

        query = sa.select(between(today).label("day"),
                          between(today.replace(day=1)).label("month"),
                          sa.func.coalesce(sa.func.sum(t.c.cost_nanos), 0).label("total")
                          ).where(column == name)
        m = self._select(query)[0]._mapping
        return {window: int(m[window]) for window in ("day", "month", "total")}

    def spend_rows(self, group_by: str, start: date | None,
                   end: date | None) -> builtins.list[dict[str, Any]]:
        """Spend per key/user/team/model/provider over UTC days ``start``..``end`` (inclusive,
        None: unbounded), most expensive first. An unknown identity is ``None``."""
        if group_by not in SPEND_GROUPS:
            raise ValueError(f"group_by must be one of {', '.join(SPEND_GROUPS)}")
        t = schema.spend
        column = t.c[_SPEND_SCOPES.get(group_by, group_by)]
        cost = sa.func.sum(t.c.cost_nanos)
        query = (sa.select(column.label("value"), cost.label("cost_nanos"),
                           *(sa.func.sum(t.c[n]).label(n) for n in _SPEND_SUMS[1:]))
                 .group_by(column).order_by(cost.desc(), column))
        if start is not None:
            query = query.where(t.c.day >= start)
        if end is not None:
            query = query.where(t.c.day <= end)
        out: builtins.list[dict[str, Any]] = []
        for row in self._select(query):
            m = row._mapping
            out.append({group_by: m["value"] or None, "cost_usd": to_usd(int(m["cost_nanos"])),
                        **{n: int(m[n]) for n in _SPEND_SUMS[1:]}})
        return out

    def ping(self) -> None:
        """One round trip to the database; raises KeyStoreError when it is unreachable."""
        with self._errors(), self.engine.connect() as conn:
            conn.execute(sa.text("SELECT 1"))

    def close(self) -> None:
        self.engine.dispose()
