"""Leases between controller replicas (issue 14), on SQLite and on a real PostgreSQL: claims spread by
`max_jobs_per_replica`, never two holders, the lease guard inside every transition, takeover after expiry, pools
and janitors as lease rows, and the stale-lock and passphrase rules of a PostgreSQL Pulumi backend."""

from __future__ import annotations

import base64
import hashlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from orchestrator.infra.pulumi_pg import BackendLock, _opens, dsn_and_table, safe_url, stale_locks
from state.leases import LeaseLost, Leases, ReplicaConflict, replicas
from state.machine import JobStatus
from state.models import EventRow, JobRow, LeaseRow
from state.pool_transitions import pool_lease
from state.store import StateStore
from tests.support.factory import place, set_job

pytest_plugins = ["tests.support.pg"]
PIPE = {"name": "p", "tasks": [{"name": "t", "run": "true", "resources": []}]}


@pytest.fixture(params=["sqlite", "postgresql"])
def make_store(request: pytest.FixtureRequest, sortie_home: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], StateStore]]:
    """Stores on one state DB, as several replicas (and the CLI) open it."""
    monkeypatch.delenv("SORTIE_DB_URL", raising=False)
    if request.param == "postgresql":
        monkeypatch.setenv("SORTIE_DB_URL", request.getfixturevalue("pg_database_url"))
    made: list[StateStore] = []

    def factory() -> StateStore:
        made.append(StateStore(sortie_home))
        return made[-1]

    yield factory
    for store in made:
        store.engine.dispose()


def replica(make_store: Callable[[], StateStore], name: str, *, lease: float = 30.0,
            max_jobs: int = 100) -> Leases:
    store = make_store()
    store.lease_owner = name
    leases = Leases(store, name, lease, max_jobs)
    leases.register(host="host-" + name, pid=os.getpid(), home="/h/" + name, version="t")
    return leases


def submit(store: StateStore, count: int, pool: str | None = None) -> list[int]:
    return store.submit(PIPE, [], user="u", count=count, pool=pool)


def test_claims_spread_by_the_cap_and_never_overlap(make_store: Callable[[], StateStore]) -> None:
    user = make_store()
    ids = submit(user, 5)
    a, b = replica(make_store, "a", max_jobs=3), replica(make_store, "b", max_jobs=3)
    took_a, took_b = a.claim_jobs(set()), b.claim_jobs(set())
    assert took_a == ids[:3] and took_b == ids[3:]
    assert a.claim_jobs(set()) == [] and a.jobs_held() == set(ids[:3]) and b.jobs_held() == set(ids[3:])
    views = {v.id: v for v in replicas(user)}
    assert (views["a"].jobs_held, views["b"].jobs_held) == (3, 2) and views["a"].live


def test_a_transition_needs_the_lease_and_writes_nothing_without_it(make_store: Callable[[], StateStore]) -> None:
    user = make_store()
    (job,) = submit(user, 1)
    a, b = replica(make_store, "a"), replica(make_store, "b")
    assert a.claim_jobs(set()) == [job]
    events = len(user.events(job))
    with pytest.raises(LeaseLost, match="replica b does not hold"):
        b.store.finish_job(job, JobStatus.CANCELLED, "not mine")
    with pytest.raises(LeaseLost):
        b.store.set_waiting(job, "not mine")
    row = user.job(job)
    assert row is not None and row.status == JobStatus.PENDING and row.waiting_reason is None
    assert len(user.events(job)) == events
    attempt = place(a.store, job)  # the holder's transition goes through and names its replica
    with a.store.session() as session:
        placed = session.scalars(select(EventRow).where(EventRow.job_id == job, EventRow.what == "placed")).one()
    assert placed.replica == "a" and attempt.number == 1
    assert user.request_cancel(job, "someone")  # a request, not a move: the user (or any replica) may make it


def test_an_expired_lease_is_taken_over_and_the_old_holder_is_fenced(make_store: Callable[[], StateStore]) -> None:
    user = make_store()
    (job,) = submit(user, 1)
    a, b = replica(make_store, "a", lease=2), replica(make_store, "b", lease=2)
    assert a.claim_jobs(set()) == [job]
    assert b.claim_jobs(set()) == []  # a live lease is not taken
    assert a.still_holds_job(job)
    set_job(user, job, lock_expires_at=time.time() - 1)  # a paused past its lease
    assert not a.still_holds_job(job)
    assert b.claim_jobs(set()) == [job]
    with pytest.raises(LeaseLost):
        a.store.finish_job(job, JobStatus.CANCELLED, "stale write")
    a.renew(force=True)  # renewing does not win back what another replica took
    assert a.jobs_held() == set() and b.jobs_held() == {job}
    taken = [e for e in user.events(job) if e.what == "taken-over"]
    assert len(taken) == 1 and taken[0].replica == "b" and (taken[0].data or {}).get("from") == "a"
    b.store.finish_job(job, JobStatus.CANCELLED, "done by b")
    row = user.job(job)
    assert row is not None and row.status == JobStatus.CANCELLED


def test_renew_pushes_out_and_release_hands_back(make_store: Callable[[], StateStore]) -> None:
    user = make_store()
    ids = submit(user, 2)
    a = replica(make_store, "a", lease=30)
    a.claim_jobs(set())
    assert a.claim("janitor:stacks")
    assert a.renew()
    set_job(user, ids[0], lock_expires_at=time.time() + 1)
    assert not a.renew()  # at most every third of a lease
    assert a.renew(force=True)
    row = user.job(ids[0])
    assert row is not None and (row.lock_expires_at or 0) > time.time() + 20
    a.release()
    with user.session() as session:
        assert session.scalar(select(func.count()).select_from(JobRow).where(JobRow.lock_owner.is_not(None))) == 0
        assert session.get(LeaseRow, "janitor:stacks").owner is None  # type: ignore[union-attr]
    assert not next(v for v in replicas(user) if v.id == "a").live


def test_a_lease_row_has_one_holder_until_it_expires(make_store: Callable[[], StateStore]) -> None:
    a, b = replica(make_store, "a", lease=2), replica(make_store, "b", lease=2)
    assert a.claim("janitor:storage") and a.claim("janitor:storage")
    assert not b.claim("janitor:storage")
    with a.store.session() as session, session.begin():
        session.get(LeaseRow, "janitor:storage").expires_at = time.time() - 1  # type: ignore[union-attr]
    assert b.claim("janitor:storage") and not a.claim("janitor:storage")
    assert b.held("janitor:") == {"janitor:storage"} and a.held() == set()


def test_pool_jobs_go_to_the_holder_of_the_pool(make_store: Callable[[], StateStore]) -> None:
    user = make_store()
    ids = submit(user, 2, pool="gpus")
    a, b = replica(make_store, "a"), replica(make_store, "b")
    assert b.claim_jobs(set()) == []  # b does not hold the pool
    assert a.claim(pool_lease("gpus"))
    assert a.claim_jobs({"gpus"}) == ids
    with pytest.raises(LeaseLost):  # the pool's own transitions check its lease
        b.store.pool_busy("gpus")


def test_a_replica_id_in_use_elsewhere_is_refused(make_store: Callable[[], StateStore]) -> None:
    replica(make_store, "a")
    twin = Leases(make_store(), "a", 30, 10)
    with pytest.raises(ReplicaConflict, match="controller id a is in use"):
        twin.register(host="another-host", pid=os.getpid() + 1, home="/elsewhere", version="t")
    twin.register(host="host-a", pid=os.getpid() + 1, home="/h/a", version="t")  # its own restart: fine


def test_concurrent_claims_never_give_one_job_twice(make_store: Callable[[], StateStore]) -> None:
    user = make_store()
    ids = submit(user, 40)
    replicas_ = [replica(make_store, f"r{i}", max_jobs=40) for i in range(4)]
    taken: dict[str, list[int]] = {}
    barrier = threading.Barrier(len(replicas_))

    def claim(leases: Leases) -> None:
        barrier.wait()
        got: list[int] = []
        for _ in range(5):
            try:
                got += leases.claim_jobs(set())
            except Exception as exc:  # SQLite: a writer may find the DB busy; PostgreSQL skips locked rows
                assert "locked" in str(exc).lower(), exc
        taken[leases.me] = got

    threads = [threading.Thread(target=claim, args=(r,)) for r in replicas_]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [j for got in taken.values() for j in got]
    assert sorted(every) == ids  # each job once, none lost
    with user.session() as session:
        owners = dict(session.execute(select(JobRow.id, JobRow.lock_owner)).tuples().all())
    assert all(owners[j] == r for r, got in taken.items() for j in got)


# --- a PostgreSQL Pulumi backend: pure rules --------------------------------------------------------------

def test_a_lock_of_another_host_is_stale_only_without_a_live_replica_there() -> None:
    locks = [BackendLock("s1", "here", 11), BackendLock("s2", "here", 22), BackendLock("s3", "there", 33),
             BackendLock("s4", "gone", 44), BackendLock("s5", "gone", 55), BackendLock("s5", "here", 22)]
    stale = stale_locks(locks, live_hosts={"there"}, pid_alive=lambda pid: pid == 22, this_host="here")
    assert stale == ["s1", "s4"]  # s5: one of its locks is alive


def test_backend_url_parts() -> None:
    dsn, table = dsn_and_table("postgres://u:pw@db:5432/state?table=pulumi_x&sslmode=disable")
    assert table == "pulumi_x" and "table=" not in dsn and dsn.startswith("postgresql://u:pw@db:5432/state?")
    assert "sslmode=disable" in dsn and "connect_timeout=" in dsn
    assert safe_url("postgres://u:pw@db/state") == "postgres://u:***@db/state"
    with pytest.raises(Exception, match="table 'x;drop' must be"):
        dsn_and_table("postgres://db/state?table=x;drop")


def test_the_passphrase_check_matches_the_engine_s_scheme() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    salt, nonce = b"12345678", b"abcdefghijkl"
    key = hashlib.pbkdf2_hmac("sha256", b"right", salt, 1_000_000, 32)
    sealed = AESGCM(key).encrypt(nonce, b"pulumi", None)
    state = f"v1:{base64.b64encode(salt).decode()}:v1:{base64.b64encode(nonce).decode()}:" \
            f"{base64.b64encode(sealed).decode()}"
    assert _opens("right", state) and not _opens("wrong", state)
