"""pools: pools and their workers; pool jobs; attempts may share a (worker's) stack

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None
UNIQUE_NAMES = {"uq": "uq_%(table_name)s_%(column_0_name)s"}


def upgrade() -> None:
    op.create_table(
        "pools",
        sa.Column("name", sa.String(63), primary_key=True),
        sa.Column("user", sa.String(255), nullable=False, server_default=""),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("workers", sa.Integer(), nullable=False),
        sa.Column("min_workers", sa.Integer(), nullable=True),
        sa.Column("max_workers", sa.Integer(), nullable=True),
        sa.Column("idle_timeout", sa.Float(), nullable=True),
        sa.Column("jobs_per_worker", sa.Integer(), nullable=False, server_default="1"),
        sa.Column("status", sa.String(32), nullable=False, index=True),
        sa.Column("storage", sa.JSON(), nullable=True),
        sa.Column("last_plan", sa.JSON(), nullable=True),
        sa.Column("last_busy_at", sa.Float(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("updated_at", sa.Float(), nullable=False),
    )
    op.create_table(
        "workers",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("pool", sa.String(63), sa.ForeignKey("pools.name"), nullable=False, index=True),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("stack_name", sa.String(255), nullable=False, unique=True),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("status", sa.String(32), nullable=False, index=True),
        sa.Column("infra", sa.String(64), nullable=True),
        sa.Column("region", sa.String(64), nullable=True),
        sa.Column("use_spot", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("price_per_hour", sa.Float(), nullable=True),
        sa.Column("nodes", sa.JSON(), nullable=True),
        sa.Column("token_enc", sa.Text(), nullable=True),
        sa.Column("missed_polls", sa.Integer(), nullable=False, server_default="0"),
        sa.Column("failure_reason", sa.Text(), nullable=True),
        sa.Column("created_at", sa.Float(), nullable=False),
        sa.Column("ready_at", sa.Float(), nullable=True),
        sa.Column("idle_since", sa.Float(), nullable=True),
        sa.Column("ended_at", sa.Float(), nullable=True),
    )
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("pool", sa.String(63), nullable=True))
        batch.add_column(sa.Column("worker_id", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("job_rank", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("num_jobs", sa.Integer(), nullable=True))
        batch.create_index("ix_jobs_pool", ["pool"])
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("slot", sa.Integer(), nullable=True))
    # Pool jobs run on their worker's stack, one attempt each: stack names of attempts stop being unique. The
    # constraint was created unnamed: PostgreSQL named it attempts_stack_name_key; SQLite's is found by reflection.
    if op.get_bind().dialect.name == "postgresql":
        op.drop_constraint("attempts_stack_name_key", "attempts", type_="unique")
        op.create_index("ix_attempts_stack_name", "attempts", ["stack_name"])
    else:
        with op.batch_alter_table("attempts", naming_convention=UNIQUE_NAMES) as batch:
            batch.drop_constraint("uq_attempts_stack_name", type_="unique")
            batch.create_index("ix_attempts_stack_name", ["stack_name"])


def downgrade() -> None:
    with op.batch_alter_table("attempts") as batch:
        batch.drop_column("slot")
        batch.drop_index("ix_attempts_stack_name")
        batch.create_unique_constraint("attempts_stack_name_key", ["stack_name"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index("ix_jobs_pool")
        for column in ("num_jobs", "job_rank", "worker_id", "pool"):
            batch.drop_column(column)
    op.drop_table("workers")
    op.drop_table("pools")
