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

proxy_keys = sa.Table(
    "llmproxy_keys", metadata,
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
)


def _v1_keys(conn: Connection) -> None:
    # Creates the table as defined above. When a later step alters it, this step must keep
    # creating the version-1 shape: copy that shape here first.
    proxy_keys.create(conn)


Migration = Callable[[Connection], Any]

#: (version, step): applied in order, each once, recorded in llmproxy_schema_version.
MIGRATIONS: tuple[tuple[int, Migration], ...] = (
    (1, _v1_keys),
)
LATEST = MIGRATIONS[-1][0]
