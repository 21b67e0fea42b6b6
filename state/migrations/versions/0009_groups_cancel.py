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
    # Plain ADD COLUMNs: a batch (copy-and-rename) of `jobs` on SQLite would drop the old table, and with foreign
    # keys on, its cascade would delete every job's tasks and attempts.
    op.add_column("jobs", sa.Column("graceful_cancel", sa.Boolean(), nullable=False, server_default=sa.false()))
    op.add_column("jobs", sa.Column("graceful_deadline", sa.Float(), nullable=True))
    op.add_column("tasks", sa.Column("cancel_requested", sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    op.drop_column("tasks", "cancel_requested")
    op.drop_column("jobs", "graceful_deadline")
    op.drop_column("jobs", "graceful_cancel")
