"""Rows for unit tests, put straight into the tables (a test's setting of the scene, never the product's way:
the product writes only through the named transitions of `state`)."""

from __future__ import annotations

from typing import Any

from sqlalchemy import update

from state.models import AttemptRow, JobRow, StackRow, TaskRow
from state.store import StateStore


def set_row(store: StateStore, model: Any, where: list[Any], **values: Any) -> None:
    with store.session() as session, session.begin():
        assert session.execute(update(model).where(*where).values(**values)).rowcount == 1, (model, where)


def set_job(store: StateStore, job_id: int, **values: Any) -> None:
    set_row(store, JobRow, [JobRow.id == job_id], **values)


def set_task(store: StateStore, job_id: int, task_index: int, **values: Any) -> None:
    set_row(store, TaskRow, [TaskRow.job_id == job_id, TaskRow.task_index == task_index], **values)


def set_attempt(store: StateStore, attempt_id: int, **values: Any) -> None:
    set_row(store, AttemptRow, [AttemptRow.id == attempt_id], **values)


def set_stack(store: StateStore, name: str, **values: Any) -> None:
    set_row(store, StackRow, [StackRow.name == name], **values)


def place(store: StateStore, job_id: int, stack: str | None = None, *, task_index: int | None = None,
          infra: str = "local", region: str | None = "region-a", num_nodes: int = 1, use_spot: bool = False,
          instance_type: str | None = None, price_per_hour: float = 0.0, why: str = "test") -> AttemptRow:
    """An attempt of the job's current task, through the real transition."""
    job = store.job(job_id)
    assert job is not None
    index = job.current_task if task_index is None else task_index
    return store.place_attempt(job_id, index, name_for=lambda n: stack or f"sortie-job-{job_id}-t{index}-{n}",
                               infra=infra, region=region, num_nodes=num_nodes, use_spot=use_spot,
                               instance_type=instance_type, price_per_hour=price_per_hour, token_enc="", why=why)
