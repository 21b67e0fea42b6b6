"""recovery: backoff rounds, waiting since, capacity rounds, placement hints

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("backoff_rounds", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("waiting_since", sa.Float(), nullable=True))
        batch.add_column(sa.Column("round_started_at", sa.Float(), nullable=True))
        batch.add_column(sa.Column("placement_hint", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("placement_hint")
        batch.drop_column("round_started_at")
        batch.drop_column("waiting_since")
        batch.drop_column("backoff_rounds")
