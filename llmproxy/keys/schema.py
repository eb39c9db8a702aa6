"""The key database's tables and its migrations, one numbered step each.

Table names start with ``llmproxy_`` so the proxy can share a database with other
applications. Every step runs inside the migration's transaction, under a lock that only one
process holds at a time (see ``KeyStore.migrate``).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect


class UTCDateTime(sa.types.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on every backend.

    PostgreSQL keeps the offset (timestamptz); SQLite has no time zone type, so UTC is
    stored without an offset and put back on reading.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the key database")
        value = value.astimezone(timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


metadata = sa.MetaData()

schema_version = sa.Table(
    "llmproxy_schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("applied_at", UTCDateTime, nullable=False),
)

def _keys_table(meta: sa.MetaData, *extra: sa.Column[Any]) -> sa.Table:
    return sa.Table(
        "llmproxy_keys", meta,
        sa.Column("id", sa.String(32), primary_key=True),
        # The lookup on the request path is by this column: unique, so indexed.
        sa.Column("secret_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("prefix", sa.String(16), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("user_name", sa.String(200)),
        sa.Column("team_name", sa.String(200)),
        sa.Column("providers", sa.JSON, nullable=False),
        sa.Column("models", sa.JSON, nullable=False),
        sa.Column("limits", sa.JSON, nullable=False),
        sa.Column("expires_at", UTCDateTime),
        sa.Column("revoked", sa.Boolean, nullable=False),
        sa.Column("created_at", UTCDateTime, nullable=False),
        sa.Column("updated_at", UTCDateTime, nullable=False),
        sa.Column("last_used_at", UTCDateTime),
        sa.Column("meta", sa.JSON, nullable=False),
        *extra,
    )


#: The keys table as version 1 created it (its own MetaData: never queried, only created).
_proxy_keys_v1 = _keys_table(sa.MetaData())

proxy_keys = _keys_table(
    metadata,
    # The key's own spend budget: Budget.public() or NULL (version 2).
    sa.Column("budgets", sa.JSON),
)

#: Spend budgets of users and teams (a key's own is in llmproxy_keys.budgets).
budgets = sa.Table(
    "llmproxy_budgets", metadata,
    sa.Column("scope_kind", sa.String(16), primary_key=True),  # user | team
    sa.Column("scope_name", sa.String(200), primary_key=True),
    sa.Column("day_usd", sa.Float),
    sa.Column("month_usd", sa.Float),
    sa.Column("total_usd", sa.Float),
    sa.Column("updated_at", UTCDateTime, nullable=False),
)

#: The ledger: spend summed per UTC day and identity. Unknown identities are '' (not NULL,
#: which a primary key cannot hold and ON CONFLICT would never match).
spend = sa.Table(
    "llmproxy_spend", metadata,
    sa.Column("day", sa.Date, primary_key=True),
    sa.Column("key_id", sa.String(32), primary_key=True),
    sa.Column("user_name", sa.String(200), primary_key=True),
    sa.Column("team_name", sa.String(200), primary_key=True),
    sa.Column("model", sa.String(200), primary_key=True),
    sa.Column("provider", sa.String(64), primary_key=True),
    sa.Column("cost_nanos", sa.BigInteger, nullable=False),
    sa.Column("requests", sa.BigInteger, nullable=False),
    sa.Column("input_tokens", sa.BigInteger, nullable=False),
    sa.Column("output_tokens", sa.BigInteger, nullable=False),
    # A budget counter missing from the limiter's store is rebuilt with one sum per scope
    # since a day: each of these serves one kind of scope.
    sa.Index("llmproxy_spend_key_day", "key_id", "day"),
    sa.Index("llmproxy_spend_user_day", "user_name", "day"),
    sa.Index("llmproxy_spend_team_day", "team_name", "day"),
)


def _v1_keys(conn: Connection) -> None:
    # The version-1 shape, whatever later steps add to the table.
    _proxy_keys_v1.create(conn)


def _v2_budgets(conn: Connection) -> None:
    column_type = sa.JSON().compile(dialect=conn.dialect)
    conn.execute(sa.text(f"ALTER TABLE llmproxy_keys ADD COLUMN budgets {column_type}"))
    budgets.create(conn)
    spend.create(conn)


Migration = Callable[[Connection], Any]

#: (version, step): applied in order, each once, recorded in llmproxy_schema_version.
MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, _v1_keys),
    (2, _v2_budgets),
)
LATEST = MIGRATIONS[-1][0]
