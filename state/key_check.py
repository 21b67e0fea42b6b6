"""Whether this controller's state key opens the secrets of the jobs in progress (issue 17, item 6)."""

from __future__ import annotations

from sqlalchemy import select

from state.machine import ACTIVE
from state.models import AttemptRow, JobRow
from state.secrets_box import key_problem
from state.store import StateStore

SAMPLES = 5


def state_key_problem(store: StateStore) -> str | None:
    """One line when the key opens none of the sealed values of jobs in progress (their secrets, their
    attempts' agent tokens), else None (also when there is nothing sealed to try)."""
    active = [s.value for s in ACTIVE]
    with store.session() as session:
        samples = list(session.scalars(select(JobRow.secrets_enc).where(
            JobRow.status.in_(active), JobRow.secrets_enc.is_not(None)).order_by(JobRow.id.desc()).limit(SAMPLES)))
        samples += list(session.scalars(select(AttemptRow.token_enc).join(JobRow, JobRow.id == AttemptRow.job_id)
                                        .where(JobRow.status.in_(active), AttemptRow.token_enc.is_not(None))
                                        .order_by(AttemptRow.id.desc()).limit(SAMPLES)))
    return key_problem(store.box, [s for s in samples if s])
