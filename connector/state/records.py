"""Frozen records the state store reads and writes. Times are aware UTC; payloads are JSON-ready."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any

__all__ = [
    "AuditEntry",
    "Conflict",
    "DeadLetter",
    "Link",
    "LinkHead",
    "OutboxEntry",
    "OutboxState",
    "RunRecord",
    "System",
]


class System(StrEnum):
    CRM = "crm"
    PARTNER_CENTER = "partner_center"


@dataclass(frozen=True)
class Link:
    """A CRM opportunity paired with a referral, with the last-synced snapshot (the merge base).

    ``crm_written_hash`` / ``pc_written_hash`` are hashes of the values the connector itself last
    wrote to each side: reading them back is an echo, not a change (prior-art failure class 9).
    ``crm_written_fields`` names the fields behind ``crm_written_hash`` until the write is read back.
    """

    connection: str
    crm_id: str | None
    referral_id: str | None
    snapshot: dict[str, Any] = field(default_factory=dict)
    crm_version: str | None = None
    pc_version: str | None = None
    crm_written_hash: str | None = None
    pc_written_hash: str | None = None
    crm_written_fields: tuple[str, ...] | None = None
    #: digests of each side's content as last found in agreement with ``snapshot``
    pc_fingerprint: str | None = None
    crm_fingerprint: str | None = None
    status: str = "linked"  # linked | blocked | orphaned
    status_detail: str = ""
    updated_at: datetime | None = None

    @property
    def awaiting_read_back(self) -> bool:
        """Our last CRM write is not read back yet."""
        return self.crm_written_fields is not None


@dataclass(frozen=True)
class LinkHead:
    """A link without its merge base: what tells a listed record is as its last sync left it, read
    without decoding the snapshot (most of a settled page's cost when every link was read whole)."""

    crm_id: str | None
    referral_id: str | None
    status: str
    pc_version: str | None
    pc_fingerprint: str | None
    crm_fingerprint: str | None
    #: our last CRM write is not read back yet (``Link.crm_written_fields`` is set)
    awaiting_read_back: bool


class OutboxState(StrEnum):
    PENDING = "pending"  # committed before the request; replayed after a crash
    WAITING = "waiting"  # a rule forbids it now but may allow it later (e.g. referral not accepted)
    DONE = "done"
    DEAD = "dead"  # moved to the dead-letter table


@dataclass(frozen=True)
class OutboxEntry:
    """A write the connector owes one side. ``idempotency_key`` doubles as ``MS-RequestId``."""

    connection: str
    target: System
    operation: str  # create | update | accept | decline | win | lose | ...
    record_key: str  # the link's key: crm id or referral id
    payload: dict[str, Any]
    idempotency_key: str
    based_on: str | None = None  # eTag / modstamp the change was computed from
    state: OutboxState = OutboxState.PENDING
    attempts: int = 0
    wait_reason: str = ""
    last_error: str = ""
    id: int | None = None
    created_at: datetime | None = None
    next_attempt_at: datetime | None = None


@dataclass(frozen=True)
class DeadLetter:
    connection: str
    system: System
    record_id: str
    cause: str
    detail: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    attempts: int = 1
    state: str = "open"  # open | retry | dropped
    id: int | None = None
    first_failed_at: datetime | None = None
    last_failed_at: datetime | None = None


@dataclass(frozen=True)
class Conflict:
    """Both sides changed one field differently and the policy said "manual": nothing was overwritten."""

    connection: str
    crm_id: str | None
    referral_id: str | None
    field: str
    base: Any
    crm_value: Any
    pc_value: Any
    state: str = "open"  # open | resolved
    resolution: str = ""
    id: int | None = None
    created_at: datetime | None = None
    resolved_at: datetime | None = None


@dataclass(frozen=True)
class AuditEntry:
    """One change the connector made (or refused), and the rule or policy that decided it."""

    connection: str
    run_id: str
    correlation_id: str
    action: str  # set | create | refused | conflict | echo | ...
    direction: str  # crm->pc | pc->crm | none
    field: str = ""
    old: Any = None
    new: Any = None
    rule: str = ""
    crm_id: str | None = None
    referral_id: str | None = None
    at: datetime | None = None
    id: int | None = None


@dataclass(frozen=True)
class RunRecord:
    run_id: str
    connection: str
    started_at: datetime
    finished_at: datetime | None = None
    outcome: str = "running"  # running | ok | partial | failed
    counts: dict[str, int] = field(default_factory=dict)
    error: str = ""
