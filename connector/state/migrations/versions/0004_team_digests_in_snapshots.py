"""Merge bases keep team members as digests, not their names, emails and phone numbers.

A set merge only asks whether a member was there before, so the state store needs no contact
details (connector.domain.merge.member_digest). Bases written before this held whole members; the
code reads either form, and this rewrites the stored ones. On SQLite the rewrite runs with
``secure_delete`` on, so the pages it frees are zeroed; PostgreSQL keeps the old row versions until
VACUUM reclaims them (run ``VACUUM`` on the state database once after upgrading to be rid of them).

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-26 07:30:00
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

#: the keys of a snapshot that list team members (``crm:team``: a CRM's own, when it is read-only)
TEAM_KEYS = ("team", "crm:team")

_links = sa.table("links", sa.column("id", sa.Integer), sa.column("snapshot", sa.JSON))


def member_digest(member: Any) -> str:
    """connector.domain.merge.member_digest as of this revision (a test keeps the two equal)."""
    if isinstance(member, str):
        return member
    return hashlib.sha256(json.dumps(member, sort_keys=True).encode()).hexdigest()


def digested(snapshot: dict[str, Any]) -> dict[str, Any] | None:
    """``snapshot`` with its team lists digested; None when it has no whole member to digest."""
    out = dict(snapshot)
    for key in TEAM_KEYS:
        members = out.get(key)
        if isinstance(members, list) and any(not isinstance(m, str) for m in members):
            out[key] = sorted({member_digest(m) for m in members})
    return out if out != snapshot else None


def upgrade() -> None:
    bind = op.get_bind()
    if bind.dialect.name == "sqlite":
        bind.exec_driver_sql("PRAGMA secure_delete=ON")  # the migration's own connection only
    last = 0
    while True:
        rows = bind.execute(
            sa.select(_links.c.id, _links.c.snapshot)
            .where(_links.c.id > last)
            .order_by(_links.c.id)
            .limit(1000)
        ).all()
        if not rows:
            return
        changed = [
            {"row_id": row.id, "new_snapshot": new}
            for row in rows
            if isinstance(row.snapshot, dict) and (new := digested(row.snapshot)) is not None
        ]
        if changed:
            bind.execute(
                _links.update()
                .where(_links.c.id == sa.bindparam("row_id"))
                .values(snapshot=sa.bindparam("new_snapshot")),
                changed,
            )
        last = rows[-1].id


def downgrade() -> None:
    """The details are gone. The code before 0004 reads a digested base as a team nobody is on any
    more: its next set merge of each pair is a union (a member removed on one side since comes back
    once), after which it keeps whole members again."""
