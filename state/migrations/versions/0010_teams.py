"""teams (issue 23): API users, their hashed tokens, the audit log, and the workspace of jobs and pools.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Plain ADD COLUMNs (see 0009: a batch copy of `jobs` on SQLite would cascade-delete its tasks).
    op.add_column("jobs", sa.Column("workspace", sa.String(64), nullable=True))
    op.create_index("ix_jobs_workspace", "jobs", ["workspace"])
    op.add_column("pools", sa.Column("workspace", sa.String(64), nullable=True))
    op.create_table(
        "api_users",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("workspaces", sa.JSON(), nullable=False),
        sa.Column("service_account", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("user", sa.String(64), nullable=False, index=True),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("expires_at", sa.Float(), nullable=True),
        sa.Column("revoked_at", sa.Float(), nullable=True),
    )
    op.create_table(
        "audit_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("at", sa.Float(), nullable=False, index=True),
        sa.Column("user", sa.String(64), nullable=False),
        sa.Column("request_id", sa.String(64), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target", sa.String(255), nullable=False),
        sa.Column("workspace", sa.String(64), nullable=True),
        sa.Column("detail", sa.Text(), nullable=True),
    )


def downgrade() -> None:
    op.drop_table("audit_events")
    op.drop_table("api_tokens")
    op.drop_table("api_users")
    op.drop_column("pools", "workspace")
    op.drop_index("ix_jobs_workspace", "jobs")
    op.drop_column("jobs", "workspace")
