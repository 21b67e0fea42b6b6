"""job groups and cancel flags (issue 16): `jobs cancel --task` marks one task of a job group, `--graceful` (with
its deadline) marks the job whose runs get SIGTERM and their MOUNT_CACHED uploads before the teardown.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("graceful_cancel", sa.Boolean(), nullable=False, server_default=sa.false()))
        batch.add_column(sa.Column("graceful_deadline", sa.Float(), nullable=True))
    with op.batch_alter_table("tasks") as batch:
        batch.add_column(sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table("tasks") as batch:
        batch.drop_column("cancel_requested")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("graceful_deadline")
        batch.drop_column("graceful_cancel")
