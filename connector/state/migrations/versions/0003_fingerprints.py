"""Links remember the fingerprints of each side's content last found in agreement with the merge base.

With them a listed referral (same eTag and fingerprint) or opportunity (same fingerprint) is known
settled without being validated and converted, nor its link's snapshot decoded: most of a full
reconciliation's CPU before.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-26 04:30:00
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("links") as batch:
        batch.add_column(sa.Column("pc_fingerprint", sa.String(64), nullable=True))
        batch.add_column(sa.Column("crm_fingerprint", sa.String(64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("links") as batch:
        batch.drop_column("crm_fingerprint")
        batch.drop_column("pc_fingerprint")
