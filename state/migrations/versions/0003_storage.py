"""storage: the job's bucket plan, the upload heartbeat of `jobs launch`, when its storage was cleaned

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("storage", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("staging_heartbeat", sa.Float(), nullable=True))
        batch.add_column(sa.Column("storage_cleaned_at", sa.Float(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("storage_cleaned_at")
        batch.drop_column("staging_heartbeat")
        batch.drop_column("storage")
