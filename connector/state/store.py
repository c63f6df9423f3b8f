"""The state store: one interface, one SQL implementation for SQLite (embedded default) and PostgreSQL.

Everything the engine must not lose lives here: links and their merge-base snapshots, cursors,
the outbox, dead letters, conflicts, the audit log, run leases and run records. Writes made inside
``with store.transaction():`` commit together (a cursor advances only with the records it covers);
outside a transaction each call commits on its own.
"""

from __future__ import annotations

import contextvars
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection, Engine

from connector.errors import ConfigError, ConfigProblem, RetryLater
from connector.state import tables as t
from connector.state.records import (
    AuditEntry,
    Conflict,
    DeadLetter,
    Link,
    LinkHead,
    OutboxEntry,
    OutboxState,
    RunRecord,
    System,
)

__all__ = ["SqlStateStore", "StateStore", "open_store"]

MIGRATIONS = Path(__file__).parent / "migrations"


T = TypeVar("T", str, int)


def _now() -> datetime:
    return datetime.now(UTC)


class StateStore(ABC):
    """What the engine, the CLI and the daemon need from persistent state."""

    # --- lifecycle
    @abstractmethod
    def migrate(self) -> None: ...
    @abstractmethod
    def close(self) -> None: ...
    @abstractmethod
    def transaction(self) -> AbstractContextManager[None]: ...
    @abstractmethod
    def ping(self) -> None: ...

    # --- links and snapshots
    @abstractmethod
    def link_by_crm(self, connection: str, crm_id: str) -> Link | None: ...
    @abstractmethod
    def link_by_referral(self, connection: str, referral_id: str) -> Link | None: ...
    @abstractmethod
    def links_by_crm_ids(self, connection: str, crm_ids: Sequence[str]) -> dict[str, Link]: ...
    @abstractmethod
    def links_by_referral_ids(self, connection: str, referral_ids: Sequence[str]) -> dict[str, Link]: ...
    @abstractmethod
    def link_heads_by_crm_ids(self, connection: str, crm_ids: Sequence[str]) -> dict[str, LinkHead]: ...
    @abstractmethod
    def link_heads_by_referral_ids(
        self, connection: str, referral_ids: Sequence[str]
    ) -> dict[str, LinkHead]: ...
    @abstractmethod
    def iter_link_heads(self, connection: str, batch: int = 5000) -> Iterator[LinkHead]: ...
    @abstractmethod
    def save_link(self, link: Link) -> Link: ...
    @abstractmethod
    def save_links(self, links: Sequence[Link]) -> None: ...
    @abstractmethod
    def forget_crm_writes(self, connection: str, crm_ids: Sequence[str]) -> None: ...
    @abstractmethod
    def iter_links(self, connection: str, batch: int = 1000) -> Iterator[Link]: ...
    @abstractmethod
    def count_links(self, connection: str) -> dict[str, int]: ...

    # --- cursors
    @abstractmethod
    def cursor(self, connection: str, source: str) -> str | None: ...
    @abstractmethod
    def set_cursor(self, connection: str, source: str, value: str | None) -> None: ...
    @abstractmethod
    def cursors(self, connection: str) -> dict[str, str]: ...

    # --- outbox
    @abstractmethod
    def enqueue(self, entry: OutboxEntry) -> OutboxEntry: ...
    @abstractmethod
    def enqueue_many(self, entries: Sequence[OutboxEntry]) -> list[OutboxEntry]: ...
    @abstractmethod
    def due(self, connection: str, now: datetime | None = None, limit: int = 1000) -> list[OutboxEntry]: ...
    @abstractmethod
    def outbox_entries(self, connection: str, states: Sequence[OutboxState] = ()) -> list[OutboxEntry]: ...
    @abstractmethod
    def mark_done(self, entry_id: int) -> None: ...
    @abstractmethod
    def mark_done_many(self, entry_ids: Sequence[int]) -> None: ...
    @abstractmethod
    def prune_outbox(self, connection: str, done_before: datetime) -> int: ...
    @abstractmethod
    def mark_waiting(self, entry_id: int, reason: str, retry_at: datetime | None = None) -> None: ...
    @abstractmethod
    def mark_attempt_failed(self, entry_id: int, error: str, retry_at: datetime) -> OutboxEntry: ...
    @abstractmethod
    def mark_dead(self, entry_id: int, error: str) -> None: ...
    @abstractmethod
    def complete_waiting(self, idempotency_keys: Sequence[str]) -> None: ...
    @abstractmethod
    def outbox_depth(self, connection: str) -> dict[str, int]: ...

    # --- dead letters
    @abstractmethod
    def add_dead_letter(self, letter: DeadLetter) -> DeadLetter: ...
    @abstractmethod
    def dead_letters(self, connection: str | None = None, state: str = "open") -> list[DeadLetter]: ...
    @abstractmethod
    def set_dead_letter_state(self, letter_id: int, state: str) -> None: ...
    @abstractmethod
    def clear_dead_letter(self, connection: str, system: System, record_id: str) -> None: ...

    # --- conflicts
    @abstractmethod
    def add_conflict(self, conflict: Conflict) -> Conflict: ...
    @abstractmethod
    def conflicts(self, connection: str | None = None, state: str = "open") -> list[Conflict]: ...
    @abstractmethod
    def resolve_conflict(self, conflict_id: int, resolution: str) -> Conflict: ...
    @abstractmethod
    def mark_conflict_applied(self, conflict_id: int) -> None: ...

    # --- audit
    @abstractmethod
    def append_audit(self, entries: Sequence[AuditEntry]) -> None: ...
    @abstractmethod
    def audit(
        self,
        connection: str | None = None,
        crm_id: str | None = None,
        referral_id: str | None = None,
        limit: int = 500,
    ) -> list[AuditEntry]: ...

    # --- leases and runs
    @abstractmethod
    def acquire_lease(
        self, connection: str, holder: str, ttl: timedelta, now: datetime | None = None
    ) -> bool: ...
    @abstractmethod
    def release_lease(self, connection: str, holder: str) -> None: ...
    @abstractmethod
    def lease_holder(self, connection: str, now: datetime | None = None) -> str | None: ...
    @abstractmethod
    def start_run(self, run: RunRecord) -> None: ...
    @abstractmethod
    def finish_run(self, run_id: str, outcome: str, counts: dict[str, int], error: str = "") -> None: ...
    @abstractmethod
    def last_run(self, connection: str) -> RunRecord | None: ...


class SqlStateStore(StateStore):
    """SQLAlchemy 2 Core implementation; the same code runs on SQLite and PostgreSQL."""

    def __init__(self, url: str) -> None:
        self.url = url
        kwargs: dict[str, Any] = {"future": True}
        if url.startswith("sqlite"):
            path = sa.engine.make_url(url).database
            if path and path != ":memory:":
                Path(path).parent.mkdir(parents=True, exist_ok=True)
            kwargs["connect_args"] = {"timeout": 30}
        self.engine: Engine = sa.create_engine(url, **kwargs)
        if self.engine.dialect.name == "sqlite":
            sa.event.listen(self.engine, "connect", _sqlite_pragmas)
        self._tx: contextvars.ContextVar[Connection | None] = contextvars.ContextVar(
            f"tx-{id(self)}", default=None
        )

    # --- plumbing ---------------------------------------------------------------------------------

    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (idempotent)."""
        try:
            current, head = self.schema_revision()
        except sa.exc.OperationalError as exc:
            raise _unreachable(self.url, exc) from None
        if current is not None and current == head:
            # nothing to do: `cosell status` and friends must not queue for the write lock a
            # running sync holds (BEGIN IMMEDIATE below) just to find that out
            return
        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS))
        engine = self.engine
        if engine.dialect.name == "sqlite" and sa.engine.make_url(self.url).database not in (
            None,
            "",
            ":memory:",
        ):
            # pysqlite emits no BEGIN before DDL, so each CREATE/ALTER committed on its own: a kill -9
            # during the first start's migration left half a schema ("table audit already exists"
            # at every start after). A migration engine of its own runs in one real transaction
            # (SQLAlchemy's documented pysqlite recipe: driver autocommit off, BEGIN emitted here).
            engine = sa.create_engine(self.url, poolclass=sa.pool.NullPool, connect_args={"timeout": 30})
            sa.event.listen(engine, "connect", _sqlite_transactional_ddl)
            sa.event.listen(engine, "begin", lambda conn: conn.exec_driver_sql("BEGIN IMMEDIATE"))
        try:
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
        except sa.exc.OperationalError as exc:
            raise _unreachable(self.url, exc) from None
        finally:
            if engine is not self.engine:
                engine.dispose()

    def schema_revision(self) -> tuple[str | None, str | None]:
        """(current revision in the database, newest revision shipped)."""
        head = ScriptDirectory(str(MIGRATIONS)).get_current_head()
        with self.engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision(), head

    def close(self) -> None:
        self.engine.dispose()

    def ping(self) -> None:
        try:
            with self.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except sa.exc.OperationalError as exc:
            raise _unreachable(self.url, exc) from None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """Everything inside commits together or not at all (nested calls join the outer one)."""
        if self._tx.get() is not None:
            yield
            return
        with self.engine.begin() as conn:
            token = self._tx.set(conn)
            try:
                yield
            finally:
                self._tx.reset(token)

    @contextmanager
    def _conn(self) -> Iterator[Connection]:
        current = self._tx.get()
        if current is not None:
            yield current
            return
        with self.engine.begin() as conn:
            yield conn

    # --- links ------------------------------------------------------------------------------------

    def link_by_crm(self, connection: str, crm_id: str) -> Link | None:
        return self._one_link(sa.and_(t.links.c.connection == connection, t.links.c.crm_id == crm_id))

    def link_by_referral(self, connection: str, referral_id: str) -> Link | None:
        return self._one_link(
            sa.and_(t.links.c.connection == connection, t.links.c.referral_id == referral_id)
        )

    def links_by_crm_ids(self, connection: str, crm_ids: Sequence[str]) -> dict[str, Link]:
        """One page's links in a few IN queries, keyed by CRM id (not one query per record)."""
        found = self._links_in(connection, t.links.c.crm_id, crm_ids)
        return {link.crm_id: link for link in found if link.crm_id}

    def links_by_referral_ids(self, connection: str, referral_ids: Sequence[str]) -> dict[str, Link]:
        found = self._links_in(connection, t.links.c.referral_id, referral_ids)
        return {link.referral_id: link for link in found if link.referral_id}

    def _links_in(self, connection: str, column: sa.Column[Any], values: Sequence[str]) -> list[Link]:
        out: list[Link] = []
        with self._conn() as conn:
            for chunk in _in_chunks(values):
                rows = conn.execute(
                    sa.select(t.links).where(t.links.c.connection == connection, column.in_(chunk))
                ).mappings()
                out += [_link(row) for row in rows]
        return out

    def link_heads_by_crm_ids(self, connection: str, crm_ids: Sequence[str]) -> dict[str, LinkHead]:
        """:meth:`links_by_crm_ids` without the merge base (nothing decoded)."""
        return {h.crm_id: h for h in self._heads(connection, t.links.c.crm_id, crm_ids) if h.crm_id}

    def link_heads_by_referral_ids(self, connection: str, referral_ids: Sequence[str]) -> dict[str, LinkHead]:
        return {
            h.referral_id: h
            for h in self._heads(connection, t.links.c.referral_id, referral_ids)
            if h.referral_id
        }

    def iter_link_heads(self, connection: str, batch: int = 5000) -> Iterator[LinkHead]:
        """Every link of a connection without its merge base, streamed in id order."""
        last = 0
        while True:
            with self._conn() as conn:
                rows = conn.execute(
                    sa.select(t.links.c.id, *_HEAD_COLUMNS)
                    .where(t.links.c.connection == connection, t.links.c.id > last)
                    .order_by(t.links.c.id)
                    .limit(batch)
                ).all()
            if not rows:
                return
            for row in rows:
                yield LinkHead(*row[1:])
            last = rows[-1][0]

    def _heads(self, connection: str, column: sa.Column[Any], values: Sequence[str]) -> list[LinkHead]:
        out: list[LinkHead] = []
        with self._conn() as conn:
            for chunk in _in_chunks(values):
                rows = conn.execute(
                    sa.select(*_HEAD_COLUMNS).where(t.links.c.connection == connection, column.in_(chunk))
                )
                out += [LinkHead(*row) for row in rows]
        return out

    def _one_link(self, where: sa.ColumnElement[bool]) -> Link | None:
        with self._conn() as conn:
            row = conn.execute(sa.select(t.links).where(where)).mappings().first()
        return _link(row) if row else None

    def save_link(self, link: Link) -> Link:
        """Insert or update by CRM id or referral id (whichever is known)."""
        now = _now()
        self.save_links([link], now=now)
        return replace(link, updated_at=now)

    def save_links(self, links: Sequence[Link], *, now: datetime | None = None) -> None:
        """Insert or update a page of links, each matched by CRM id first, then by referral id: a few
        IN queries and two executemany statements, not a round trip per record. The unique
        constraints turn an attempt to pair one referral with a second opportunity into an
        IntegrityError, never a silent relink."""
        if not links:
            return
        for link in links:
            if link.crm_id is None and link.referral_id is None:
                raise ValueError("a link needs a CRM id or a referral id")
        # one record saved twice in a batch: the later state wins, as with one save after the other
        last = {(k.connection, k.crm_id or "", "" if k.crm_id else k.referral_id): k for k in links}
        links = list(last.values())
        now = now or _now()
        with self._conn() as conn:
            existing: dict[tuple[str, str, str], int] = {}
            for column, attr in ((t.links.c.crm_id, "crm_id"), (t.links.c.referral_id, "referral_id")):
                by_connection: dict[str, set[str]] = {}
                for link in links:
                    value = getattr(link, attr)
                    if value is not None:
                        by_connection.setdefault(link.connection, set()).add(value)
                for connection, wanted in by_connection.items():
                    for chunk in _in_chunks(wanted):
                        rows = conn.execute(
                            sa.select(t.links.c.id, column).where(
                                t.links.c.connection == connection, column.in_(chunk)
                            )
                        )
                        existing.update({(connection, attr, value): row_id for row_id, value in rows})
            inserts: list[dict[str, Any]] = []
            updates: list[dict[str, Any]] = []
            for link in links:
                row_id = None
                for attr in ("crm_id", "referral_id"):
                    value = getattr(link, attr)
                    if row_id is None and value is not None:
                        row_id = existing.get((link.connection, attr, value))
                row = _link_values(link, now)
                if row_id is None:
                    inserts.append(row)
                else:
                    updates.append({"row_id": row_id, **{f"v_{k}": v for k, v in row.items()}})
            if inserts:
                conn.execute(sa.insert(t.links), inserts)
            if updates:
                conn.execute(
                    sa.update(t.links)
                    .where(t.links.c.id == sa.bindparam("row_id"))
                    # bind names differ from the column names: SQLAlchemy reserves those for SET
                    .values({k[2:]: sa.bindparam(k) for k in updates[0] if k != "row_id"}),
                    updates,
                )

    def forget_crm_writes(self, connection: str, crm_ids: Sequence[str]) -> None:
        """Our writes to these opportunities have been read back (echo or peer rewrite, both noted)."""
        with self._conn() as conn:
            for chunk in _in_chunks(crm_ids):
                conn.execute(
                    sa.update(t.links)
                    .where(t.links.c.connection == connection, t.links.c.crm_id.in_(chunk))
                    .values(crm_written_hash=None, crm_written_fields=None)
                )

    def iter_links(self, connection: str, batch: int = 1000) -> Iterator[Link]:
        """Every link of a connection, streamed in id order (keyset pages, never all in memory)."""
        last = 0
        while True:
            with self._conn() as conn:
                rows = (
                    conn.execute(
                        sa.select(t.links)
                        .where(t.links.c.connection == connection, t.links.c.id > last)
                        .order_by(t.links.c.id)
                        .limit(batch)
                    )
                    .mappings()
                    .all()
                )
            if not rows:
                return
            for row in rows:
                yield _link(row)
            last = rows[-1]["id"]

    def count_links(self, connection: str) -> dict[str, int]:
        with self._conn() as conn:
            rows = conn.execute(
                sa.select(t.links.c.status, sa.func.count())
                .where(t.links.c.connection == connection)
                .group_by(t.links.c.status)
            ).all()
        return {status: n for status, n in rows}

    # --- cursors ----------------------------------------------------------------------------------

    def cursor(self, connection: str, source: str) -> str | None:
        with self._conn() as conn:
            return conn.execute(
                sa.select(t.cursors.c.value).where(
                    t.cursors.c.connection == connection, t.cursors.c.source == source
                )
            ).scalar()

    def set_cursor(self, connection: str, source: str, value: str | None) -> None:
        with self._conn() as conn:
            conn.execute(
                sa.delete(t.cursors).where(t.cursors.c.connection == connection, t.cursors.c.source == source)
            )
            if value is not None:
                conn.execute(
                    sa.insert(t.cursors).values(
                        connection=connection, source=source, value=value, updated_at=_now()
                    )
                )

    def cursors(self, connection: str) -> dict[str, str]:
        with self._conn() as conn:
            rows = conn.execute(
                sa.select(t.cursors.c.source, t.cursors.c.value).where(t.cursors.c.connection == connection)
            ).all()
        return {source: value for source, value in rows}

    # --- outbox -----------------------------------------------------------------------------------

    def enqueue(self, entry: OutboxEntry) -> OutboxEntry:
        """Add a write; an entry with the same idempotency key is returned instead of duplicated."""
        with self._conn() as conn:
            existing = (
                conn.execute(sa.select(t.outbox).where(t.outbox.c.idempotency_key == entry.idempotency_key))
                .mappings()
                .first()
            )
            if existing is not None:
                return _outbox(existing)
            now = _now()
            result = conn.execute(
                sa.insert(t.outbox).values(
                    connection=entry.connection,
                    target=entry.target.value,
                    operation=entry.operation,
                    record_key=entry.record_key,
                    payload=entry.payload,
                    idempotency_key=entry.idempotency_key,
                    based_on=entry.based_on,
                    state=entry.state.value,
                    attempts=entry.attempts,
                    wait_reason=entry.wait_reason,
                    last_error=entry.last_error,
                    created_at=now,
                    next_attempt_at=entry.next_attempt_at or now,
                )
            )
            new_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        return replace(entry, id=new_id, created_at=now, next_attempt_at=entry.next_attempt_at or now)

    def enqueue_many(self, entries: Sequence[OutboxEntry]) -> list[OutboxEntry]:
        """A page's new writes in one statement; their ids come back in order (INSERT .. RETURNING,
        which SQLite 3.35+ and PostgreSQL both have). Keys must be new: a reused key is an error."""
        if not entries:
            return []
        now = _now()
        rows = [
            {
                "connection": e.connection,
                "target": e.target.value,
                "operation": e.operation,
                "record_key": e.record_key,
                "payload": e.payload,
                "idempotency_key": e.idempotency_key,
                "based_on": e.based_on,
                "state": e.state.value,
                "attempts": e.attempts,
                "wait_reason": e.wait_reason,
                "last_error": e.last_error,
                "created_at": now,
                "next_attempt_at": e.next_attempt_at or now,
            }
            for e in entries
        ]
        with self._conn() as conn:
            result = conn.execute(
                sa.insert(t.outbox).returning(t.outbox.c.id, sort_by_parameter_order=True), rows
            )
            ids = [row.id for row in result]
        return [
            replace(e, id=i, created_at=now, next_attempt_at=e.next_attempt_at or now)
            for e, i in zip(entries, ids, strict=True)
        ]

    def due(self, connection: str, now: datetime | None = None, limit: int = 1000) -> list[OutboxEntry]:
        """Pending and waiting entries whose time has come, oldest first."""
        when = now or _now()
        with self._conn() as conn:
            rows = (
                conn.execute(
                    sa.select(t.outbox)
                    .where(
                        t.outbox.c.connection == connection,
                        t.outbox.c.state.in_([OutboxState.PENDING.value, OutboxState.WAITING.value]),
                        t.outbox.c.next_attempt_at <= when,
                    )
                    .order_by(t.outbox.c.id)
                    .limit(limit)
                )
                .mappings()
                .all()
            )
        return [_outbox(r) for r in rows]

    def outbox_entries(self, connection: str, states: Sequence[OutboxState] = ()) -> list[OutboxEntry]:
        query = sa.select(t.outbox).where(t.outbox.c.connection == connection).order_by(t.outbox.c.id)
        if states:
            query = query.where(t.outbox.c.state.in_([s.value for s in states]))
        with self._conn() as conn:
            return [_outbox(r) for r in conn.execute(query).mappings().all()]

    def _set_outbox(self, entry_id: int, **values: Any) -> None:
        with self._conn() as conn:
            conn.execute(sa.update(t.outbox).where(t.outbox.c.id == entry_id).values(**values))

    def mark_done(self, entry_id: int) -> None:
        self._set_outbox(entry_id, state=OutboxState.DONE.value, last_error="", wait_reason="")

    def mark_done_many(self, entry_ids: Sequence[int]) -> None:
        with self._conn() as conn:
            for chunk in _in_chunks(entry_ids):
                conn.execute(
                    sa.update(t.outbox)
                    .where(t.outbox.c.id.in_(chunk))
                    .values(state=OutboxState.DONE.value, last_error="", wait_reason="")
                )

    def prune_outbox(self, connection: str, done_before: datetime) -> int:
        """Forget done entries older than ``done_before``: every Partner Center write leaves one, and a
        book of 100,000 deals would otherwise grow the table by that much per initial sync. Pending,
        waiting and dead entries are never pruned; the audit log keeps the history."""
        with self._conn() as conn:
            result = conn.execute(
                sa.delete(t.outbox).where(
                    t.outbox.c.connection == connection,
                    t.outbox.c.state == OutboxState.DONE.value,
                    t.outbox.c.created_at < done_before,
                )
            )
        return int(result.rowcount or 0)

    def mark_waiting(self, entry_id: int, reason: str, retry_at: datetime | None = None) -> None:
        self._set_outbox(
            entry_id, state=OutboxState.WAITING.value, wait_reason=reason, next_attempt_at=retry_at or _now()
        )

    def mark_attempt_failed(self, entry_id: int, error: str, retry_at: datetime) -> OutboxEntry:
        with self._conn() as conn:
            conn.execute(
                sa.update(t.outbox)
                .where(t.outbox.c.id == entry_id)
                .values(attempts=t.outbox.c.attempts + 1, last_error=error[:4000], next_attempt_at=retry_at)
            )
            row = conn.execute(sa.select(t.outbox).where(t.outbox.c.id == entry_id)).mappings().one()
        return _outbox(row)

    def mark_dead(self, entry_id: int, error: str) -> None:
        self._set_outbox(entry_id, state=OutboxState.DEAD.value, last_error=error[:4000])

    def complete_waiting(self, idempotency_keys: Sequence[str]) -> None:
        """Waiting entries whose rule no longer holds the change back (it went, or is no longer wanted)."""
        if not idempotency_keys:
            return
        with self._conn() as conn:
            conn.execute(
                sa.update(t.outbox)
                .where(
                    t.outbox.c.idempotency_key.in_(list(idempotency_keys)),
                    t.outbox.c.state == OutboxState.WAITING.value,
                )
                .values(state=OutboxState.DONE.value, wait_reason="")
            )

    def outbox_depth(self, connection: str) -> dict[str, int]:
        with self._conn() as conn:
            rows = conn.execute(
                sa.select(t.outbox.c.state, sa.func.count())
                .where(t.outbox.c.connection == connection, t.outbox.c.state != OutboxState.DONE.value)
                .group_by(t.outbox.c.state)
            ).all()
        return {state: n for state, n in rows}

    # --- dead letters -----------------------------------------------------------------------------

    def add_dead_letter(self, letter: DeadLetter) -> DeadLetter:
        """Record a failed record; a record already dead-lettered gets its attempt count bumped."""
        now = _now()
        key = sa.and_(
            t.dead_letters.c.connection == letter.connection,
            t.dead_letters.c.system == letter.system.value,
            t.dead_letters.c.record_id == letter.record_id,
        )
        with self._conn() as conn:
            existing = conn.execute(sa.select(t.dead_letters).where(key)).mappings().first()
            if existing is None:
                conn.execute(
                    sa.insert(t.dead_letters).values(
                        connection=letter.connection,
                        system=letter.system.value,
                        record_id=letter.record_id,
                        cause=letter.cause[:128],
                        detail=letter.detail[:4000],
                        payload=letter.payload,
                        attempts=letter.attempts,
                        state="open",
                        first_failed_at=now,
                        last_failed_at=now,
                    )
                )
            else:
                conn.execute(
                    sa.update(t.dead_letters)
                    .where(key)
                    .values(
                        cause=letter.cause[:128],
                        detail=letter.detail[:4000],
                        payload=letter.payload,
                        attempts=existing["attempts"] + 1,
                        state="open",
                        last_failed_at=now,
                    )
                )
            row = conn.execute(sa.select(t.dead_letters).where(key)).mappings().one()
        return _dead(row)

    def dead_letters(self, connection: str | None = None, state: str = "open") -> list[DeadLetter]:
        query = sa.select(t.dead_letters).where(t.dead_letters.c.state == state).order_by(t.dead_letters.c.id)
        if connection:
            query = query.where(t.dead_letters.c.connection == connection)
        with self._conn() as conn:
            return [_dead(r) for r in conn.execute(query).mappings().all()]

    def set_dead_letter_state(self, letter_id: int, state: str) -> None:
        if state not in ("open", "retry", "dropped"):
            raise ValueError(f"unknown dead-letter state {state!r}")
        with self._conn() as conn:
            done = conn.execute(
                sa.update(t.dead_letters).where(t.dead_letters.c.id == letter_id).values(state=state)
            ).rowcount
        if not done:
            raise LookupError(f"no dead letter with id {letter_id}")

    def clear_dead_letter(self, connection: str, system: System, record_id: str) -> None:
        with self._conn() as conn:
            conn.execute(
                sa.delete(t.dead_letters).where(
                    t.dead_letters.c.connection == connection,
                    t.dead_letters.c.system == system.value,
                    t.dead_letters.c.record_id == record_id,
                )
            )

    # --- conflicts --------------------------------------------------------------------------------

    def add_conflict(self, conflict: Conflict) -> Conflict:
        """Queue a conflict; the same open (record, field) conflict is updated, not duplicated."""
        now = _now()
        with self._conn() as conn:
            match = sa.and_(
                t.conflicts.c.connection == conflict.connection,
                t.conflicts.c.field == conflict.field,
                t.conflicts.c.state == "open",
                t.conflicts.c.crm_id == conflict.crm_id
                if conflict.crm_id
                else t.conflicts.c.crm_id.is_(None),
                t.conflicts.c.referral_id == conflict.referral_id
                if conflict.referral_id
                else t.conflicts.c.referral_id.is_(None),
            )
            existing = conn.execute(sa.select(t.conflicts.c.id).where(match)).first()
            values = {"base": conflict.base, "crm_value": conflict.crm_value, "pc_value": conflict.pc_value}
            if existing is not None:
                conn.execute(sa.update(t.conflicts).where(t.conflicts.c.id == existing.id).values(**values))
                new_id = existing.id
            else:
                result = conn.execute(
                    sa.insert(t.conflicts).values(
                        connection=conflict.connection,
                        crm_id=conflict.crm_id,
                        referral_id=conflict.referral_id,
                        field=conflict.field,
                        state="open",
                        resolution="",
                        created_at=now,
                        **values,
                    )
                )
                new_id = result.inserted_primary_key[0] if result.inserted_primary_key else None
        return replace(conflict, id=new_id, created_at=now, state="open")

    def conflicts(self, connection: str | None = None, state: str = "open") -> list[Conflict]:
        query = sa.select(t.conflicts).where(t.conflicts.c.state == state).order_by(t.conflicts.c.id)
        if connection:
            query = query.where(t.conflicts.c.connection == connection)
        with self._conn() as conn:
            return [_conflict(r) for r in conn.execute(query).mappings().all()]

    def resolve_conflict(self, conflict_id: int, resolution: str) -> Conflict:
        if resolution not in ("crm", "partner_center", "dismissed"):
            raise ValueError("resolution is one of crm, partner_center, dismissed")
        with self._conn() as conn:
            done = conn.execute(
                sa.update(t.conflicts)
                .where(t.conflicts.c.id == conflict_id, t.conflicts.c.state == "open")
                .values(state="resolved", resolution=resolution, resolved_at=_now())
            ).rowcount
            if not done:
                raise LookupError(f"no open conflict with id {conflict_id}")
            row = conn.execute(sa.select(t.conflicts).where(t.conflicts.c.id == conflict_id)).mappings().one()
        return _conflict(row)

    def mark_conflict_applied(self, conflict_id: int) -> None:
        """A resolved conflict whose chosen value the engine has written to both sides."""
        with self._conn() as conn:
            conn.execute(
                sa.update(t.conflicts)
                .where(t.conflicts.c.id == conflict_id, t.conflicts.c.state == "resolved")
                .values(state="applied")
            )

    # --- audit ------------------------------------------------------------------------------------

    def append_audit(self, entries: Sequence[AuditEntry]) -> None:
        if not entries:
            return
        now = _now()
        with self._conn() as conn:
            conn.execute(
                sa.insert(t.audit),
                [
                    {
                        "at": e.at or now,
                        "connection": e.connection,
                        "run_id": e.run_id,
                        "correlation_id": e.correlation_id,
                        "action": e.action,
                        "direction": e.direction,
                        "field": e.field,
                        "old": e.old,
                        "new": e.new,
                        "rule": e.rule,
                        "crm_id": e.crm_id,
                        "referral_id": e.referral_id,
                    }
                    for e in entries
                ],
            )

    def audit(
        self,
        connection: str | None = None,
        crm_id: str | None = None,
        referral_id: str | None = None,
        limit: int = 500,
    ) -> list[AuditEntry]:
        query = sa.select(t.audit).order_by(t.audit.c.id.desc()).limit(limit)
        if connection:
            query = query.where(t.audit.c.connection == connection)
        if crm_id:
            query = query.where(t.audit.c.crm_id == crm_id)
        if referral_id:
            query = query.where(t.audit.c.referral_id == referral_id)
        with self._conn() as conn:
            rows = conn.execute(query).mappings().all()
        return [_audit(r) for r in reversed(rows)]

    # --- leases and runs --------------------------------------------------------------------------

    def acquire_lease(
        self, connection: str, holder: str, ttl: timedelta, now: datetime | None = None
    ) -> bool:
        """Take (or renew) the run lease of a connection; an expired lease is taken over.

        One conditional UPDATE, then an INSERT that the primary key makes race-safe: two daemons on
        one database never both win (prior-art "safe multi-instance operation").
        """
        when = now or _now()
        with self.engine.begin() as conn:
            taken = conn.execute(
                sa.update(t.leases)
                .where(
                    t.leases.c.connection == connection,
                    sa.or_(t.leases.c.holder == holder, t.leases.c.expires_at < when),
                )
                .values(holder=holder, acquired_at=when, expires_at=when + ttl)
            ).rowcount
            if taken:
                return True
        try:
            with self.engine.begin() as conn:
                conn.execute(
                    sa.insert(t.leases).values(
                        connection=connection, holder=holder, acquired_at=when, expires_at=when + ttl
                    )
                )
            return True
        except sa.exc.IntegrityError:
            return False

    def release_lease(self, connection: str, holder: str) -> None:
        with self.engine.begin() as conn:
            conn.execute(
                sa.delete(t.leases).where(t.leases.c.connection == connection, t.leases.c.holder == holder)
            )

    def lease_holder(self, connection: str, now: datetime | None = None) -> str | None:
        with self._conn() as conn:
            return conn.execute(
                sa.select(t.leases.c.holder).where(
                    t.leases.c.connection == connection, t.leases.c.expires_at >= (now or _now())
                )
            ).scalar()

    def start_run(self, run: RunRecord) -> None:
        with self._conn() as conn:
            conn.execute(
                sa.insert(t.runs).values(
                    run_id=run.run_id,
                    connection=run.connection,
                    started_at=run.started_at,
                    outcome="running",
                    counts={},
                    error="",
                )
            )

    def finish_run(self, run_id: str, outcome: str, counts: dict[str, int], error: str = "") -> None:
        with self._conn() as conn:
            conn.execute(
                sa.update(t.runs)
                .where(t.runs.c.run_id == run_id)
                .values(finished_at=_now(), outcome=outcome, counts=counts, error=error[:4000])
            )

    def last_run(self, connection: str) -> RunRecord | None:
        with self._conn() as conn:
            row = (
                conn.execute(
                    sa.select(t.runs)
                    .where(t.runs.c.connection == connection)
                    .order_by(t.runs.c.started_at.desc())
                    .limit(1)
                )
                .mappings()
                .first()
            )
        if row is None:
            return None
        return RunRecord(
            run_id=row["run_id"],
            connection=row["connection"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            outcome=row["outcome"],
            counts=dict(row["counts"]),
            error=row["error"],
        )


def open_store(url: str, *, migrate: bool = True) -> SqlStateStore:
    """Open the state store at ``url`` and, by default, apply pending migrations."""
    try:
        store = SqlStateStore(url)
    except OSError as exc:  # the SQLite file's directory cannot be made (a file in the way, no permission)
        raise ConfigError(
            [
                ConfigProblem(
                    "configuration", "state.url", f"cannot create the state directory: {exc.strerror}"
                )
            ]
        ) from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as exc:
        raise ConfigError(
            [
                ConfigProblem(
                    "configuration",
                    "state.url",
                    f"not a usable database URL ({type(exc).__name__})",
                    "sqlite:///path/state.db or postgresql+psycopg://user@host/db",
                )
            ]
        ) from None
    if migrate:
        try:
            store.migrate()
        except sa.exc.DatabaseError as exc:
            if isinstance(exc, sa.exc.OperationalError):
                raise
            raise ConfigError(
                [ConfigProblem("configuration", "state.url", f"not a usable state database: {exc.orig}")]
            ) from None
    return store


def _unreachable(url: str, exc: Exception) -> RetryLater:
    safe = sa.engine.make_url(url).render_as_string(hide_password=True)
    return RetryLater(
        f"state store {safe} unreachable: {str(exc.orig if hasattr(exc, 'orig') else exc).strip()}",
        system="state",
    )


def _sqlite_transactional_ddl(dbapi_connection: Any, record: Any) -> None:
    _sqlite_pragmas(dbapi_connection, record)
    # https://docs.sqlalchemy.org/en/20/dialects/sqlite.html#serializable-isolation-savepoints-transactional-ddl
    dbapi_connection.isolation_level = None


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the daemon's HTTP endpoints read while a run writes; busy_timeout rides out the
    # short write locks of a second process (e.g. `cosell status` during a run).
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


# --- row -> record ---------------------------------------------------------------------------------


def _in_chunks(values: Iterable[T]) -> Iterator[list[T]]:
    """Distinct values in sorted chunks for IN (...): SQLite's bound-parameter limit is 32,766
    (999 before 3.32), so chunks of 500 fit every version and PostgreSQL alike."""
    ordered = sorted(set(values))
    for i in range(0, len(ordered), 500):
        yield ordered[i : i + 500]


#: LinkHead's fields, in order; the written fields are only asked whether they are there (not decoded)
_HEAD_COLUMNS = (
    t.links.c.crm_id,
    t.links.c.referral_id,
    t.links.c.status,
    t.links.c.pc_version,
    t.links.c.pc_fingerprint,
    t.links.c.crm_fingerprint,
    # Python None is stored as SQL NULL by rows older than 0002 and as JSON 'null' by the others
    sa.and_(
        t.links.c.crm_written_fields.is_not(None),
        sa.cast(t.links.c.crm_written_fields, sa.Text) != "null",
    ),
)


def _link_values(link: Link, now: datetime) -> dict[str, Any]:
    return {
        "connection": link.connection,
        "crm_id": link.crm_id,
        "referral_id": link.referral_id,
        "snapshot": link.snapshot,
        "crm_version": link.crm_version,
        "pc_version": link.pc_version,
        "crm_written_hash": link.crm_written_hash,
        "crm_written_fields": list(link.crm_written_fields) if link.crm_written_fields is not None else None,
        "pc_written_hash": link.pc_written_hash,
        "pc_fingerprint": link.pc_fingerprint,
        "crm_fingerprint": link.crm_fingerprint,
        "status": link.status,
        "status_detail": link.status_detail,
        "updated_at": now,
    }


def _link(row: Any) -> Link:
    return Link(
        connection=row["connection"],
        crm_id=row["crm_id"],
        referral_id=row["referral_id"],
        snapshot=dict(row["snapshot"] or {}),
        crm_version=row["crm_version"],
        pc_version=row["pc_version"],
        crm_written_hash=row["crm_written_hash"],
        crm_written_fields=tuple(row["crm_written_fields"])
        if row["crm_written_fields"] is not None
        else None,
        pc_written_hash=row["pc_written_hash"],
        pc_fingerprint=row["pc_fingerprint"],
        crm_fingerprint=row["crm_fingerprint"],
        status=row["status"],
        status_detail=row["status_detail"],
        updated_at=row["updated_at"],
    )


def _outbox(row: Any) -> OutboxEntry:
    return OutboxEntry(
        id=row["id"],
        connection=row["connection"],
        target=System(row["target"]),
        operation=row["operation"],
        record_key=row["record_key"],
        payload=dict(row["payload"] or {}),
        idempotency_key=row["idempotency_key"],
        based_on=row["based_on"],
        state=OutboxState(row["state"]),
        attempts=row["attempts"],
        wait_reason=row["wait_reason"],
        last_error=row["last_error"],
        created_at=row["created_at"],
        next_attempt_at=row["next_attempt_at"],
    )


def _dead(row: Any) -> DeadLetter:
    return DeadLetter(
        id=row["id"],
        connection=row["connection"],
        system=System(row["system"]),
        record_id=row["record_id"],
        cause=row["cause"],
        detail=row["detail"],
        payload=dict(row["payload"] or {}),
        attempts=row["attempts"],
        state=row["state"],
        first_failed_at=row["first_failed_at"],
        last_failed_at=row["last_failed_at"],
    )


def _conflict(row: Any) -> Conflict:
    return Conflict(
        id=row["id"],
        connection=row["connection"],
        crm_id=row["crm_id"],
        referral_id=row["referral_id"],
        field=row["field"],
        base=row["base"],
        crm_value=row["crm_value"],
        pc_value=row["pc_value"],
        state=row["state"],
        resolution=row["resolution"],
        created_at=row["created_at"],
        resolved_at=row["resolved_at"],
    )


def _audit(row: Any) -> AuditEntry:
    return AuditEntry(
        id=row["id"],
        at=row["at"],
        connection=row["connection"],
        run_id=row["run_id"],
        correlation_id=row["correlation_id"],
        action=row["action"],
        direction=row["direction"],
        field=row["field"],
        old=row["old"],
        new=row["new"],
        rule=row["rule"],
        crm_id=row["crm_id"],
        referral_id=row["referral_id"],
    )
