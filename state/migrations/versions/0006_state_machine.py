"""the state machine: attempt numbers unique per task, pool events, the unused attempts.zone dropped

Revision ID: 0006
Revises: 0005

Jobs in flight keep running across this upgrade: no status, phase or column the controller reads changes
meaning. Attempt numbers were allocated by counting; should an old database hold two attempts with one number
(the race this constraint closes), the later ones are renumbered after the highest first.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def _renumber_duplicates() -> None:
    conn = op.get_bind()
    rows = conn.execute(sa.text("SELECT id, job_id, task_index, number FROM attempts ORDER BY id")).fetchall()
    seen: dict[tuple[int, int], set[int]] = {}
    top: dict[tuple[int, int], int] = {}
    for _id, job_id, task_index, number in rows:
        top[(job_id, task_index)] = max(top.get((job_id, task_index), 0), number)
    for attempt_id, job_id, task_index, number in rows:
        key = (job_id, task_index)
        if number in seen.setdefault(key, set()):
            top[key] += 1
            conn.execute(sa.text("UPDATE attempts SET number = :n WHERE id = :id"), {"n": top[key], "id": attempt_id})
            number = top[key]
        seen[key].add(number)


def upgrade() -> None:
    _renumber_duplicates()
    with op.batch_alter_table("attempts") as batch:
        batch.create_unique_constraint("uq_attempts_job_task_number", ["job_id", "task_index", "number"])
        batch.drop_column("zone")
    op.create_table(
        "pool_events",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("pool", sa.String(63), nullable=False),
        sa.Column("worker", sa.Integer(), nullable=True),
        sa.Column("at", sa.Float(), nullable=False),
        sa.Column("who", sa.String(64), nullable=False),
        sa.Column("what", sa.String(64), nullable=False),
        sa.Column("why", sa.Text(), nullable=True),
    )
    op.create_index("ix_pool_events_pool_id", "pool_events", ["pool", "id"])


def downgrade() -> None:
    op.drop_index("ix_pool_events_pool_id", table_name="pool_events")
    op.drop_table("pool_events")
    with op.batch_alter_table("attempts") as batch:
        batch.add_column(sa.Column("zone", sa.String(64), nullable=True))
        batch.drop_constraint("uq_attempts_job_task_number", type_="unique")
