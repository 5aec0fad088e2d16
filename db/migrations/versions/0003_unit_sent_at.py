"""unit sent_at: a claimed unit whose message never reached the broker can be told apart

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-05
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("units") as batch:
        batch.add_column(sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True))
    # units queued before this revision were sent when they were claimed
    op.execute("UPDATE units SET sent_at = queued_at WHERE state IN ('QUEUED', 'RUNNING')")


def downgrade() -> None:
    with op.batch_alter_table("units") as batch:
        batch.drop_column("sent_at")
