"""Persistent state behind one interface (:class:`StateStore`): SQLite by default, PostgreSQL by URL."""

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
from connector.state.store import SqlStateStore, StateStore, open_store

__all__ = [
    "AuditEntry",
    "Conflict",
    "DeadLetter",
    "Link",
    "LinkHead",
    "OutboxEntry",
    "OutboxState",
    "RunRecord",
    "SqlStateStore",
    "StateStore",
    "System",
    "open_store",
]
