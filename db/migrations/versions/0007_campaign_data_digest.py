"""campaigns' data digest: the manifest's sha256 without where the dataset lies, so that
`submit --reuse` finds a campaign over the same images mounted at another path

Campaigns recorded before it keep NULL: they are found, as before, by their manifest
file's sha256 (the same root path).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # a nullable column without a default: no table rebuild on SQLite, no rewrite on
    # PostgreSQL
    op.add_column("campaigns", sa.Column("data_digest", sa.String(64), nullable=True))
    op.create_index("ix_campaigns_data_digest", "campaigns", ["data_digest"])


def downgrade() -> None:
    op.drop_index("ix_campaigns_data_digest", table_name="campaigns")
    with op.batch_alter_table("campaigns") as batch:
        batch.drop_column("data_digest")
