"""replicas: several controllers share one PostgreSQL (issue 14). A row per controller replica (who, where, its
heartbeat), a lease row per piece of work that is not a job (a pool, a janitor), the replica named on every
event, and an index for claiming jobs whose lease expired.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "replicas",
        sa.Column("id", sa.String(128), primary_key=True),
        sa.Column("host", sa.String(255), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("home", sa.Text(), nullable=False),
        sa.Column("version", sa.String(64), nullable=True),
        sa.Column("started_at", sa.Float(), nullable=False),
        sa.Column("heartbeat_at", sa.Float(), nullable=False),
        sa.Column("lease_seconds", sa.Float(), nullable=False),
        sa.Column("stopped_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "leases",
        sa.Column("name", sa.String(255), primary_key=True),
        sa.Column("owner", sa.String(128), nullable=True),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("acquired_at", sa.Float(), nullable=True),
    )
    with op.batch_alter_table("events") as batch:
        batch.add_column(sa.Column("replica", sa.String(128), nullable=True))
    with op.batch_alter_table("pool_events") as batch:
        batch.add_column(sa.Column("replica", sa.String(128), nullable=True))
    op.create_index("ix_jobs_lock_owner", "jobs", ["lock_owner"])


def downgrade() -> None:
    op.drop_index("ix_jobs_lock_owner", "jobs")
    with op.batch_alter_table("pool_events") as batch:
        batch.drop_column("replica")
    with op.batch_alter_table("events") as batch:
        batch.drop_column("replica")
    op.drop_table("leases")
    op.drop_table("replicas")
