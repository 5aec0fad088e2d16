"""indexes for stores with many campaigns: units by task id and by queue, artifacts by
campaign and kind and by kind and checksum (each of these lookups read every campaign's
rows)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05
"""

from __future__ import annotations

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

UNIT_INDEXES = {
    "ix_units_task_id": ["task_id"],
    "ix_units_queue_state": ["queue", "state"],
    "ix_units_queue_started_at": ["queue", "started_at"],
    "ix_units_queue_finished_at": ["queue", "finished_at"],
}


def upgrade() -> None:
    # plain CREATE INDEX on both databases: no table rebuild is needed for an index
    for name, columns in UNIT_INDEXES.items():
        op.create_index(name, "units", columns)
    op.create_index("ix_artifacts_campaign_kind", "artifacts", ["campaign_id", "kind"])
    op.create_index("ix_artifacts_kind_sha256", "artifacts", ["kind", "sha256"])


def downgrade() -> None:
    op.drop_index("ix_artifacts_kind_sha256", table_name="artifacts")
    op.drop_index("ix_artifacts_campaign_kind", table_name="artifacts")
    for name in reversed(UNIT_INDEXES):
        op.drop_index(name, table_name="units")
