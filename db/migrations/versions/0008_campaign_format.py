"""campaigns' format: shared.spec.CAMPAIGN_FORMAT of the orchard that submitted each, so
that a worker of an older orchard (a host not yet updated) runs none of the units of a
campaign it would compute the old way

Campaigns recorded before it are format 1, this orchard's first.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a constant default: no table rebuild on SQLite, no rewrite on PostgreSQL (11+)
    op.add_column(
        "campaigns",
        sa.Column("format_version", sa.Integer(), nullable=False, server_default=sa.text("1")),
    )


def downgrade() -> None:
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("format_version")
