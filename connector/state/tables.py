"""SQLAlchemy Core tables of the state store. Schema changes go through Alembic migrations
(``migrations/versions``); this module is the model they are checked against."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = ["UtcDateTime", "metadata"]


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC in, aware UTC out, on every backend.

    SQLite has no time zone type and hands back naive values; a naive datetime leaking into the
    engine would be read as local time somewhere (prior-art failure class 2). So naive input is
    refused and output is always tagged UTC.
    """

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.utcoffset() is None:
            raise ValueError("naive datetimes are not stored; use an aware UTC datetime")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        stored: datetime = value
        return stored.replace(tzinfo=UTC) if stored.tzinfo is None else stored.astimezone(UTC)


metadata = sa.MetaData()

links = sa.Table(
    "links",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("connection", sa.String(64), nullable=False),
    sa.Column("crm_id", sa.String(64)),
    sa.Column("referral_id", sa.String(64)),
    sa.Column("snapshot", sa.JSON, nullable=False),
    sa.Column("crm_version", sa.String(128)),
    sa.Column("pc_version", sa.String(128)),
    sa.Column("crm_written_hash", sa.String(64)),
    sa.Column("crm_written_fields", sa.JSON),  # migration 0002
    sa.Column("pc_written_hash", sa.String(64)),
    sa.Column("pc_fingerprint", sa.String(64)),  # migration 0003
    sa.Column("crm_fingerprint", sa.String(64)),  # migration 0003
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("status_detail", sa.Text, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("connection", "crm_id", name="uq_links_crm"),
    sa.UniqueConstraint("connection", "referral_id", name="uq_links_referral"),
)

cursors = sa.Table(
    "cursors",
    metadata,
    sa.Column("connection", sa.String(64), primary_key=True),
    sa.Column("source", sa.String(32), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", UtcDateTime, nullable=False),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("connection", sa.String(64), nullable=False),
    sa.Column("target", sa.String(32), nullable=False),
    sa.Column("operation", sa.String(32), nullable=False),
    sa.Column("record_key", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("idempotency_key", sa.String(64), nullable=False, unique=True),
    sa.Column("based_on", sa.String(128)),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("wait_reason", sa.Text, nullable=False),
    sa.Column("last_error", sa.Text, nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("next_attempt_at", UtcDateTime, nullable=False),
    sa.Index("ix_outbox_due", "connection", "state", "next_attempt_at"),
)

dead_letters = sa.Table(
    "dead_letters",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("connection", sa.String(64), nullable=False),
    sa.Column("system", sa.String(32), nullable=False),
    sa.Column("record_id", sa.String(64), nullable=False),
    sa.Column("cause", sa.String(128), nullable=False),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("first_failed_at", UtcDateTime, nullable=False),
    sa.Column("last_failed_at", UtcDateTime, nullable=False),
    sa.UniqueConstraint("connection", "system", "record_id", name="uq_dead_letter_record"),
)

conflicts = sa.Table(
    "conflicts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("connection", sa.String(64), nullable=False),
    sa.Column("crm_id", sa.String(64)),
    sa.Column("referral_id", sa.String(64)),
    sa.Column("field", sa.String(64), nullable=False),
    sa.Column("base", sa.JSON),
    sa.Column("crm_value", sa.JSON),
    sa.Column("pc_value", sa.JSON),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("resolution", sa.String(32), nullable=False),
    sa.Column("created_at", UtcDateTime, nullable=False),
    sa.Column("resolved_at", UtcDateTime),
    sa.Index("ix_conflicts_open", "connection", "state"),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", UtcDateTime, nullable=False),
    sa.Column("connection", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(64), nullable=False),
    sa.Column("correlation_id", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False),
    sa.Column("direction", sa.String(16), nullable=False),
    sa.Column("field", sa.String(64), nullable=False),
    sa.Column("old", sa.JSON),
    sa.Column("new", sa.JSON),
    sa.Column("rule", sa.String(128), nullable=False),
    sa.Column("crm_id", sa.String(64)),
    sa.Column("referral_id", sa.String(64)),
    sa.Index("ix_audit_crm", "connection", "crm_id"),
    sa.Index("ix_audit_referral", "connection", "referral_id"),
)

leases = sa.Table(
    "leases",
    metadata,
    sa.Column("connection", sa.String(64), primary_key=True),
    sa.Column("holder", sa.String(128), nullable=False),
    sa.Column("acquired_at", UtcDateTime, nullable=False),
    sa.Column("expires_at", UtcDateTime, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_id", sa.String(64), primary_key=True),
    sa.Column("connection", sa.String(64), nullable=False),
    sa.Column("started_at", UtcDateTime, nullable=False),
    sa.Column("finished_at", UtcDateTime),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("counts", sa.JSON, nullable=False),
    sa.Column("error", sa.Text, nullable=False),
    sa.Index("ix_runs_connection", "connection", "started_at"),
)
