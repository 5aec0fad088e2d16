"""unit parameter values as TEXT on SQLite: a column declared JSON has numeric affinity
there, which stored the JSON text ``1.0`` as the integer 1 (``[rf] max_features = 1.0``,
all features, read back as 1, one feature)

Values stored before this revision keep what SQLite made of them; campaigns submitted
after it read back every number as it was written. PostgreSQL's ``json`` kept them
already: nothing changes there.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("unit_params") as batch:
        batch.alter_column("value", type_=sa.Text(), existing_type=sa.JSON())


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        return
    with op.batch_alter_table("unit_params") as batch:
        batch.alter_column("value", type_=sa.JSON(), existing_type=sa.Text())
