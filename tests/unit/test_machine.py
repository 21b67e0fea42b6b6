"""The state machine's table is the truth: every named transition, run through real lifecycles, moves rows only
along its own entry of `state.machine.TRANSITIONS`; a transition refuses a row that is not where it expects."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from state.machine import TRANSITIONS, JobStatus, Phase, TransitionError, legal
from state.models import AttemptRow, JobRow, PoolRow, StackRow, TaskRow, WorkerRow
from state.store import StateStore
from tests.unit.test_crash_points import LIFECYCLES, play

TABLES = {"job": (JobRow, "id", "status"), "task": (TaskRow, ("job_id", "task_index"), "status"),
          "attempt": (AttemptRow, "id", "phase"), "stack": (StackRow, "name", "status"),
          "worker": (WorkerRow, "id", "status"), "pool": (PoolRow, "name", "status")}


def snapshot(store: StateStore) -> dict[tuple[str, Any], str]:
    found = {}
    with store.session() as session:
        for table, (model, key, column) in TABLES.items():
            for row in session.scalars(select(model)):
                ident = tuple(getattr(row, k) for k in key) if isinstance(key, tuple) else getattr(row, key)
                found[(table, ident)] = getattr(row, column)
    return found


def test_every_transition_moves_rows_only_along_the_table(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    moves: list[tuple[str, str, str | None, str]] = []
    seen: set[str] = set()

    def watch(name: str, method: Any) -> Any:
        @functools.wraps(method)
        def wrapped(self: StateStore, *args: Any, **kwargs: Any) -> Any:
            before = snapshot(self)
            result = method(self, *args, **kwargs)
            after = snapshot(self)
            seen.add(name)
            for key, status in after.items():
                if before.get(key) != status:
                    moves.append((name, key[0], before.get(key), status))
            return result
        return wrapped

    for name in TRANSITIONS:
        if hasattr(StateStore, name):
            monkeypatch.setattr(StateStore, name, watch(name, getattr(StateStore, name)))
    monkeypatch.setenv("SORTIE_HOME", str(tmp_path))
    for lifecycle in LIFECYCLES:
        play(tmp_path, lifecycle, None)
    illegal = [m for m in moves if not legal(m[0], m[1], m[2], m[3])]
    assert not illegal, f"moves outside the table: {illegal}"
    assert len(moves) > 50
    exercised = {"submit", "place_attempt", "attempt_provisioned", "attempt_running", "begin_teardown", "end_attempt",
                 "request_cancel", "apply_pool", "pool_down", "pool_terminated", "create_worker", "worker_provisioned",
                 "worker_ready", "terminate_worker", "worker_terminated", "assign_worker"}
    assert exercised <= seen, f"not exercised: {exercised - seen}"


def test_every_transition_in_the_table_exists() -> None:
    missing = [name for name in TRANSITIONS if not hasattr(StateStore, name)]
    assert not missing


@pytest.fixture
def store(sortie_home: Path) -> StateStore:
    return StateStore(sortie_home)


def one_job(store: StateStore, tasks: int = 1) -> int:
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": f"t{i}", "run": "true", "num_nodes": 1,
                                                      "resources": [{}]} for i in range(tasks)]},
                             [{} for _ in range(tasks)], user="u")
    return job_id


def place(store: StateStore, job_id: int, task_index: int = 0) -> AttemptRow:
    return store.place_attempt(job_id, task_index, name_for=lambda n: f"s-{job_id}-{task_index}-{n}", infra="local",
                               region="region-a", num_nodes=1, use_spot=False, instance_type=None,
                               price_per_hour=0.0, token_enc="x", why="test")


def test_a_second_placement_of_a_task_is_refused(store: StateStore) -> None:
    job_id = one_job(store)
    first = place(store, job_id)
    with pytest.raises(TransitionError):
        place(store, job_id)  # an attempt is in progress
    assert [a.number for a in store.attempts(job_id)] == [first.number] == [1]


def test_transitions_refuse_rows_that_moved_on(store: StateStore) -> None:
    job_id = one_job(store)
    attempt = place(store, job_id)
    with pytest.raises(TransitionError):
        store.attempt_running(attempt.id, Phase.RUNNING, "synced", "x")  # still PROVISIONING
    with pytest.raises(TransitionError):
        store.finish_job(job_id, JobStatus.FAILED, "x")  # an attempt is in progress
    store.attempt_provisioned(attempt.id, [], "up")
    with pytest.raises(TransitionError):
        store.attempt_provisioned(attempt.id, [], "up again")
    events = [e.what for e in store.events(job_id)]
    assert events == ["submitted", "placed", "provisioned"]  # refused transitions wrote no event


def test_end_attempt_finishes_the_task_and_advances_the_pipeline_in_one_transaction(store: StateStore) -> None:
    job_id = one_job(store, tasks=2)
    attempt = place(store, job_id)
    store.attempt_provisioned(attempt.id, [], "up")
    store.attempt_running(attempt.id, Phase.RUNNING, "synced", "x")
    store.begin_teardown(attempt.id, why="ok", final=JobStatus.SUCCEEDED, exit_codes=(0,))
    store.end_attempt(attempt.id, why="destroyed")
    job = store.job(job_id)
    tasks = store.tasks([job_id])[job_id]
    assert (job.current_task, job.status, [t.status for t in tasks]) == (1, "STARTING", ["SUCCEEDED", "PENDING"])
    with pytest.raises(TransitionError):
        store.end_attempt(attempt.id, why="again")  # DONE already: a second end is refused, nothing advances twice
    assert store.job(job_id).current_task == 1
