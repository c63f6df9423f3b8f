"""Links remember which CRM fields the connector last wrote, beside the hash of their values.

With the names, the first read-back after a write tells our own echo (same values) from a peer
automation that rewrote them (different values), which is counted and audited instead of looped.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26 01:45:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # batch mode: SQLite cannot ALTER a table in place beyond ADD COLUMN; Alembic copies it there
    with op.batch_alter_table("links") as batch:
        batch.add_column(sa.Column("crm_written_fields", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("links") as batch:
        batch.drop_column("crm_written_fields")
