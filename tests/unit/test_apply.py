"""`state.apply`: the table of legal moves is the guard, at run time."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from state.apply import ANY, IllegalMove, apply, create, sources
from state.machine import JobStatus, PoolStatus, TransitionError
from state.models import EventRow, JobRow, PoolRow, TaskRow
from state.store import StateStore


@pytest.fixture
def store(sortie_home: Path) -> StateStore:
    return StateStore(sortie_home)


def one_job(store: StateStore) -> int:
    (job_id,) = store.submit({"name": "j", "tasks": [{"name": "t", "run": "true", "num_nodes": 1,
                                                     "resources": [{}]}]}, [{}], user="u")
    return job_id


def status(store: StateStore, job_id: int) -> str:
    row = store.job(job_id)
    assert row is not None
    return row.status


def test_sources_are_the_tables() -> None:
    assert sources("pool_down", "pool", "DOWN") == {"ACTIVE", "DOWN"}
    assert sources("attempt_running", "job", "RUNNING") == {"STARTING", "RECOVERING", "RUNNING"}


def test_a_move_the_table_does_not_have_is_refused_before_any_write(store: StateStore) -> None:
    job_id = one_job(store)
    with pytest.raises(IllegalMove), store.session() as session, session.begin():
        # the table has no PENDING -> RUNNING for attempt_running (only assign_worker makes it)
        apply(session, "attempt_running", "job", [JobRow.id == job_id], to=JobStatus.RUNNING,
              expect=[JobStatus.PENDING])
    with pytest.raises(IllegalMove), store.session() as session, session.begin():
        apply(session, "no_such_transition", "job", [JobRow.id == job_id], to=JobStatus.RUNNING)
    with pytest.raises(IllegalMove), store.session() as session, session.begin():
        apply(session, "pool_down", "pool", [PoolRow.name == "p"], to=PoolStatus.DOWN, status="DOWN")
    assert status(store, job_id) == "PENDING"


def test_a_row_where_the_table_does_not_allow_the_move_is_not_moved(store: StateStore) -> None:
    """The expected statuses are narrowed to the table's sources: a PENDING job asked to go RECOVERING by
    begin_teardown (STARTING, RUNNING or RECOVERING only) stays PENDING, and the transaction fails."""
    job_id = one_job(store)
    with pytest.raises(TransitionError), store.session() as session, session.begin():
        apply(session, "begin_teardown", "job", [JobRow.id == job_id], to=JobStatus.RECOVERING,
              expect=[JobStatus.PENDING, JobStatus.STARTING])
        session.add(EventRow(job_id=job_id, at=0.0, who="t", what="must-not-commit"))
    assert status(store, job_id) == "PENDING"
    assert "must-not-commit" not in [e.what for e in store.events(job_id)]
    with store.session() as session, session.begin():  # ANY: a batch, where no row to move is fine
        assert apply(session, "attempt_running", "task", [TaskRow.job_id == job_id], to=JobStatus.RUNNING,
                     rows=ANY) == 0


def test_create_refuses_a_new_row_in_a_status_the_table_does_not_start_it_in(store: StateStore) -> None:
    with pytest.raises(IllegalMove), store.session() as session, session.begin():
        create(session, "apply_pool", PoolRow(name="p", status=PoolStatus.DOWN, user="u", spec={}, spec_hash="h",
                                              workers=1, created_at=0.0, updated_at=0.0))
    with store.session() as session:
        assert session.scalars(select(PoolRow)).all() == []


def test_mark_cancelling_writes_its_event(store: StateStore) -> None:
    job_id = one_job(store)
    assert store.request_cancel(job_id, "u")
    store.mark_cancelling(job_id)
    store.mark_cancelling(job_id)  # again: CANCELLING stays, no second event
    assert status(store, job_id) == "CANCELLING"
    assert [e.what for e in store.events(job_id)] == ["submitted", "cancel-requested", "cancelling"]


def test_a_pool_going_down_is_not_applied_again(store: StateStore) -> None:
    policy = {"workers": 1, "min_workers": None, "max_workers": None, "idle_timeout": None, "jobs_per_worker": 1}
    store.apply_pool("p", user="u", spec={}, spec_hash="h1", policy=policy, plan={}, storage=None)
    store.pool_down("p", "u")
    with pytest.raises(TransitionError, match="going down"):
        store.apply_pool("p", user="u", spec={}, spec_hash="h2", policy=policy, plan={}, storage=None)
    pool = store.pool("p")
    assert pool is not None and (pool.status, pool.spec_hash) == ("DOWN", "h1")
    store.pool_terminated("p")
    store.apply_pool("p", user="u", spec={}, spec_hash="h3", policy=policy, plan={}, storage=None)
    pool = store.pool("p")
    assert pool is not None and (pool.status, pool.spec_hash) == ("ACTIVE", "h3")


def test_a_replica_without_the_jobs_lease_writes_no_observation(store: StateStore) -> None:
    """`add_event` and `record_missed_polls` are a replica's writes on a job it drives: guarded by its lease."""
    from state.leases import LeaseLost

    job_id = one_job(store)
    attempt = store.place_attempt(job_id, 0, name_for=lambda n: f"s-{n}", infra="local", region="r", num_nodes=1,
                                  use_spot=False, instance_type=None, price_per_hour=0.0, token_enc="x", why="t")
    replica = StateStore(store.home)
    replica.lease_owner = "replica-a"  # holds no lease: the job's lock_owner is nobody
    with pytest.raises(LeaseLost):
        replica.add_event(job_id, "agent-slow", "x")
    with pytest.raises(LeaseLost):
        replica.record_missed_polls(attempt.id, 3)
    assert "agent-slow" not in [e.what for e in store.events(job_id)]
    assert [a.missed_polls for a in store.attempts(job_id)] == [0]
    store.add_event(job_id, "agent-slow", "the CLI and the tests hold no lease: allowed")
    assert [e.what for e in store.events(job_id)][-1] == "agent-slow"
